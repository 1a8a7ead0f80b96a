"""Test-Time Speculation: a feature head distilled online from the target distributions verification already computed.

Paper: Kumar, Sanghavi, Das, "Test-Time Speculation" (arXiv 2605.09329); related: OSD (Liu et al., arXiv
2310.07177: online distillation of the draft model on the tokens it got wrong) and DVI (arXiv 2510.05421).

Glossary:
    trace        per row, the generated sequence as the target saw it: each position's token, the target's
                 features there (the head's input) and its final hidden state (whose LM-head distribution is
                 the teacher for the next token); one entry per verified position, appended one step late
                 (a step's bonus token is verified as the next step's pending column). The prompt's entries
                 (from the prefill) give context and are never scored
    update       every ``update_every`` steps, one AdamW step on the last ``window`` entries of every row:
                 EAGLE-3's training-time test (:func:`~mmspec.heads.ttt.ttt_loss`), soft
                 cross-entropy to the target's own distribution restricted to the draft vocabulary, as the
                 head was trained offline; no extra target forward
    params       what is updated: ``"all"`` (every trainable head weight) or ``"lora"`` (peft LoRA adapters
                 of rank ``lora_rank`` on the head's projections; the base weights stay frozen)
    scope        ``"request"``: the head is reset to its starting weights (and a fresh optimiser) at every
                 ``start``; ``"persistent"``: what it learnt carries over to later requests until
                 :meth:`TTSDrafter.reset`. The wrapper learns on its own copy of the head (``.head``); the
                 head it was given never changes
    stale cache  the head's KV cache keeps the keys and values computed before an update; they are refreshed
                 as new tokens arrive (the target's output never depends on them)

The target verifies every draft with the usual lossless rules, so greedy output stays token-identical and
sampled output keeps the target's distribution; only the drafts (and so the acceptance) change. A row's
drafts depend on the other rows of its batch (one head learns from all of them); its output does not.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..heads.ttt import HeadBatch, ttt_loss
from ..errors import MMSpecError
from .base import Draft, Drafter, StepOutcome
from .feature import FeatureDrafter

PARAMS = ("all", "lora")
SCOPES = ("request", "persistent")
_FINAL = -1  # HF hidden_states index of the final (normed) hidden state: the teacher's input


class TTSConfigError(MMSpecError):
    """A Test-Time Speculation setting out of range (update period, window, learning rate, params, scope)."""


@dataclass(frozen=True)
class TTSConfig:
    update_every: int = 4  # verification steps between updates
    window: int = 64  # trace entries per row an update learns from (the most recent)
    lr: float = 3e-4
    ttt_steps: int = 2  # training-time-test depth of the update's loss
    step_decay: float = 0.8
    params: str = "all"
    lora_rank: int = 8
    scope: str = "request"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name, lo in (("update_every", 1), ("window", 2), ("ttt_steps", 1), ("lora_rank", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise TTSConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        for name in ("lr", "step_decay", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise TTSConfigError(f"{name} must be a finite number > 0, got {v!r}")
        if self.params not in PARAMS:
            raise TTSConfigError(f"params must be one of {PARAMS}, got {self.params!r}")
        if self.scope not in SCOPES:
            raise TTSConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")


class TTSDrafter(Drafter):
    """``TTSDrafter(FeatureDrafter(head, 5), TTSConfig(...))``: the feature drafter, its head learning as it goes."""

    def __init__(self, drafter: FeatureDrafter, config: TTSConfig | None = None):
        if not isinstance(drafter, FeatureDrafter):
            raise TypeError(f"Test-Time Speculation wraps a FeatureDrafter, got {type(drafter).__name__}")
        # a private copy of the head (the borrowed target embedding stays shared): the caller's head never changes
        head = copy.deepcopy(drafter.head, memo={id(drafter.head._embed): drafter.head._embed})
        self.inner = copy.copy(drafter)
        self.inner.head = self.inner.model = head
        self.head = head
        self.config = config if config is not None else TTSConfig()
        self.vocab_size = drafter.vocab_size
        layers = tuple(drafter.hidden_layers)
        self.hidden_layers = layers if _FINAL in layers else layers + (_FINAL,)
        if self.config.params == "lora":
            self._add_lora()
        self._trainable = [p for n, p in self.head.named_parameters() if self._is_trainable(n)]
        for n, p in self.head.named_parameters():
            p.requires_grad_(self._is_trainable(n))
        self._initial = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        self._new_optimizer()
        self.updates, self.update_time, self.steps = 0, 0.0, 0

    # ------------------------------------------------------------------------------ what is learnt
    def _is_trainable(self, name: str) -> bool:
        return "lora_" in name if self.config.params == "lora" else True

    def _add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if not any("lora_" in n for n, _ in self.head.named_parameters()):
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            inject_adapter_in_model(LoraConfig(r=self.config.lora_rank, lora_alpha=2 * self.config.lora_rank,
                                               target_modules=targets, lora_dropout=0.0), self.head)
            self.head.to(self.head.fc.weight.dtype)

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self._trainable, lr=self.config.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def reset(self) -> None:
        """Back to the starting weights, with a fresh optimiser."""
        with torch.no_grad():
            self.head.load_state_dict(self._initial)
        self._new_optimizer()

    # ------------------------------------------------------------------------------- the protocol
    def check_compatible(self, target: torch.nn.Module) -> None:
        self.inner.check_compatible(target)

    def start(self, input_ids, attention_mask, *, sampling, rng, guidance=None, **model_inputs: Any) -> None:
        if guidance is not None:
            raise ValueError("Test-Time Speculation learns from an unguided target; classifier-free guidance "
                             "is not supported")
        if self.config.scope == "request":
            self.reset()
        self.updates, self.update_time, self.steps = 0, 0.0, 0
        self.inner.start(input_ids, attention_mask, sampling=sampling, rng=rng, guidance=guidance, **model_inputs)
        batch = input_ids.shape[0]
        self._prompt = (input_ids, attention_mask.to(torch.long))
        # per row: tokens, features [3d], finals [d], scored flags, positions of the trace entries
        self._trace: list[dict[str, list]] = [dict(tok=[], feat=[], final=[], scored=[]) for _ in range(batch)]
        self._pending = input_ids[:, -1].tolist()  # the token whose hidden states the next step's column 0 brings

    def observe_prefill(self, target_hidden: dict[int, torch.Tensor] | None) -> None:
        self.inner.observe_prefill(target_hidden)
        input_ids, mask = self._prompt
        del self._prompt
        if target_hidden is None:
            return
        feats, final = self._features(target_hidden)  # [B, L-1, 3d], [B, L-1, d]
        for b, row in enumerate(self._trace):
            cols = mask[b, :-1].nonzero().flatten().tolist()
            self._append(row, input_ids[b, cols].tolist(), feats[b, cols], final[b, cols], False)

    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        return self.inner.propose(max_tokens)

    def observe(self, outcome: StepOutcome) -> None:
        self.inner.observe(outcome)
        feats, final = self._features(outcome.target_hidden)  # [B, 1 + k, 3d] over [pending, drafts or nodes]
        n_acc = outcome.result.num_accepted.tolist()
        nodes = outcome.result.accepted_nodes if outcome.draft.is_tree else None
        for b, row in enumerate(self._trace):
            n = n_acc[b]
            if nodes is not None:  # the accepted root-to-leaf path's columns (node i sits in column i + 1)
                path = nodes[b, :n].tolist()
                cols, drafted = [0] + [i + 1 for i in path], [int(outcome.draft.tokens[b, i]) for i in path]
            else:
                cols, drafted = list(range(n + 1)), outcome.draft.tokens[b, :n].tolist()
            # the pending token is a prompt token in the first step (its entry is context, not scored)
            self._append(row, [self._pending[b]] + drafted, feats[b, cols], final[b, cols],
                         [self.steps > 0] + [True] * n)
            if outcome.committed[b]:
                self._pending[b] = outcome.committed[b][-1]
        self.steps += 1
        if self.steps % self.config.update_every == 0:
            self._update()

    def select_rows(self, rows: torch.Tensor) -> None:
        self.inner.select_rows(rows)
        keep = rows.tolist()
        self._trace = [self._trace[r] for r in keep]
        self._pending = [self._pending[r] for r in keep]

    def set_default_length(self, k: Any) -> None:
        self.inner.set_default_length(k)

    @property
    def num_calls(self) -> int:
        return self.inner.num_calls

    @property
    def info(self) -> dict[str, Any]:
        return {"tts_updates": self.updates, "tts_update_time": self.update_time}

    # ----------------------------------------------------------------------------------- learning
    def _features(self, hidden: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.head.fc.weight.dtype
        feats = self.inner._features(hidden)
        return feats.detach().to(dtype).cpu(), hidden[_FINAL].detach().to(dtype).cpu()

    def _append(self, row: dict, tokens: list[int], feats: torch.Tensor, final: torch.Tensor, scored) -> None:
        flags = scored if isinstance(scored, list) else [scored] * len(tokens)
        row["tok"] += tokens
        row["feat"] += list(feats.unbind(0))
        row["final"] += list(final.unbind(0))
        row["scored"] += flags
        extra = len(row["tok"]) - self.config.window
        if extra > 0:  # keep only what an update reads
            for key in row:
                del row[key][:extra]

    def _batch(self) -> HeadBatch | None:
        rows = [r for r in self._trace if any(r["scored"])]
        if not rows:
            return None
        width = max(len(r["tok"]) for r in rows)
        b = len(rows)
        d3, d = rows[0]["feat"][0].shape[-1], rows[0]["final"][0].shape[-1]
        dtype = rows[0]["feat"][0].dtype
        tokens = torch.zeros((b, width), dtype=torch.long)
        valid = torch.zeros((b, width), dtype=torch.long)
        scored = torch.zeros((b, width), dtype=torch.bool)
        feats, final = torch.zeros((b, width, d3), dtype=dtype), torch.zeros((b, width, d), dtype=dtype)
        for i, r in enumerate(rows):
            m = len(r["tok"])
            tokens[i, :m] = torch.tensor(r["tok"])
            valid[i, :m] = 1
            scored[i, :m] = torch.tensor(r["scored"])
            feats[i, :m] = torch.stack(r["feat"])
            final[i, :m] = torch.stack(r["final"])
        return HeadBatch(tokens, valid, scored, feats, final, torch.arange(width).repeat(b, 1))

    def _update(self) -> None:
        t0 = time.perf_counter()
        batch = self._batch()
        if batch is None:
            return
        device = self.head.fc.weight.device
        batch = HeadBatch(*(t.to(device) for t in batch))
        with torch.enable_grad():
            loss, _ = ttt_loss(self.head, batch, self.config.ttt_steps, self.config.step_decay)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self._trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        self.update_time += time.perf_counter() - t0
