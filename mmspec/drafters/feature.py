"""Feature-level drafting (EAGLE family): a draft head reading the target's hidden states drafts chains or
dynamic trees through the one loop.

Paper: Li et al., EAGLE (ICML 2024), EAGLE-2 (EMNLP 2024), EAGLE-3 (arXiv 2503.01840).

Glossary:
    pair          the head's input slot: (feature of position t, token t + 1), predicting token t + 2;
                  the head's cache holds one pair per committed token, built from the target's
                  hidden states (``Drafter.hidden_layers``), which the loop hands over after the prefill
                  (``observe_prefill``) and after every verification (``StepOutcome.target_hidden``)
    next          after the last pair of a row the head already knows the distribution of the first
                  draft token (``next_logits`` [B, Vd]) and the hidden state its children will read
                  (``next_feature`` [B, d]); drafting k tokens costs k - 1 head forwards
    draft slots   pairs fed while drafting use the head's own hidden state as feature; ``observe``
                  drops them all and feeds the committed tokens with the target's real features
    draft vocab   the head predicts over an FR-Spec subset; ``to_target_ids`` maps its indices through
                  ``head.d2t``; sampled drafts carry their distribution scattered onto the target
                  vocabulary (zero outside the subset), so rejection sampling stays exact
    guided        under classifier-free guidance (AR image targets) the head keeps 2B rows laid out as the
                  target's :class:`~mmspec.guidance.GuidedSession` (conditional prompts, then their
                  unconditional twins), reads both halves' features, and drafts (chains or trees) from the
                  guided logits uncond + s (cond - uncond) of its own two halves

Rows whose prompt has a single token have no pair yet and draft nothing in their first step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache import CacheSession
from ..config import SamplingParams
from ..errors import DeviceMismatchError, MMSpecError, VocabularyMismatchError
from ..guidance import Guidance, conditional_prompts, guide_halves, guided_rows
from ..heads.eagle3 import Eagle3Head
from ..rng import DRAFT, RowRandom
from ..sampling import logits_to_probs, sample_inverse_cdf
from .adaptive import DraftLengthPolicy
from .base import Draft, StepOutcome, widest_budget
from .model import ModelDrafter, model_device, model_vocab_size

_OWN = (-1,)  # the head's own output hidden state (its only "layer")


class FeatureDrafter(ModelDrafter):
    """Drafts with an :class:`~mmspec.heads.eagle3.Eagle3Head` over the target's features:
    ``FeatureDrafter(head, 5)`` (chains) or ``FeatureDrafter(head, tree=DynamicTree(...))``."""

    def __init__(self, head: Eagle3Head, draft_length: int | DraftLengthPolicy | None = None, *, tree: Any = None):
        if not isinstance(head, Eagle3Head):
            raise TypeError(f"head must be an Eagle3Head, got {type(head).__name__}")
        super().__init__(head, draft_length, tree=tree)
        self.head = head
        self.vocab_size = head.config.target_vocab_size
        self.hidden_layers = tuple(head.config.feature_layers)

    def check_compatible(self, target: torch.nn.Module) -> None:
        target_vocab = model_vocab_size(target)
        if target_vocab != self.vocab_size:
            raise VocabularyMismatchError(
                f"the head drafts for a vocabulary of {self.vocab_size}, the target has {target_vocab}")
        if model_device(self.head) != model_device(target):
            raise DeviceMismatchError(f"head is on {model_device(self.head)} but target is on {model_device(target)}")
        if not self.head.attached:
            self.head.attach(target)

    # -------------------------------------------------------------------------------------- state
    def start(self, input_ids, attention_mask, *, sampling: SamplingParams, rng: RowRandom,
              guidance: Guidance | None = None, **model_inputs: Any) -> None:
        if self.policy is None:
            raise RuntimeError("FeatureDrafter has no draft length: pass draft_length or num_draft_tokens")
        self.sampling, self.rng, self.guidance = sampling, rng, guidance
        self.device = input_ids.device
        self.position = torch.zeros((input_ids.shape[0],), dtype=torch.long)
        if guidance is None:
            ids, mask = input_ids, attention_mask.to(torch.long)
        else:  # both halves, laid out as the target's guided session
            ids, mask = guided_rows(conditional_prompts(input_ids, attention_mask), guidance, self.device)
        rows = ids.shape[0]
        self.session = CacheSession(self.head, rows, input_ids.device)
        self._prompt = (ids, mask)
        self.has_context = torch.zeros((rows,), dtype=torch.bool, device=self.device)
        dtype = self.head.fc.weight.dtype
        self.next_logits = torch.zeros((rows, self.head.config.draft_vocab_size), device=self.device)
        self.next_feature = torch.zeros((rows, self.head.config.hidden_size), dtype=dtype, device=self.device)
        self.fed = 0

    # the head's rows: one per sequence, or (guided) conditional rows [0, B) then unconditional rows [B, 2B)
    @property
    def batch(self) -> int:
        return self.position.shape[0]

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sequence [B, ...] -> per head row [R, ...]."""
        return t if self.guidance is None else torch.cat([t, t], dim=0)

    def _row_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Sequence indices long [B'] -> head-row indices [R']."""
        return rows if self.guidance is None else torch.cat([rows, rows + self.batch])

    def _sequence_logits(self, logits: torch.Tensor, predicts: torch.Tensor) -> torch.Tensor:
        """Head-row logits [R, ..., Vd] -> each sequence's drafting logits [B, ..., Vd]: the guided combination of
        its two halves at the CFG scale of the generated index ``predicts`` long [B, ...] (the identity unguided)."""
        return logits if self.guidance is None else guide_halves(logits, self.guidance, predicts)

    def _ready(self) -> torch.Tensor:
        """bool [B]: sequences whose head rows all hold a pair (they can draft)."""
        return self.has_context if self.guidance is None else self.has_context[: self.batch] & self.has_context[self.batch:]

    def observe_prefill(self, target_hidden: dict[int, torch.Tensor] | None) -> None:
        input_ids, mask = self._prompt
        del self._prompt
        if target_hidden is None or input_ids.shape[1] < 2:
            return
        # pair t = (feature of prompt position t, prompt token t + 1); left padding: valid iff t is
        self._feed(input_ids[:, 1:], self._features(target_hidden), mask[:, :-1])

    def _features(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([hidden[layer] for layer in self.head.config.feature_layers], dim=-1)  # [B, w, 3d]

    def _feed(self, tokens: torch.Tensor, target_features: torch.Tensor, valid: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> None:
        """Append real pairs (right aligned: the last column is valid for every row that has one; explicit
        ``position_ids`` [B, w] or None for the session's count-based positions)."""
        fused = self.head.fuse(target_features)
        logits = self.session.extend(tokens, valid, features=fused, num_logits=1, hidden_layers=_OWN,
                                     position_ids=position_ids)
        has = valid[:, -1].bool()
        self.next_logits = torch.where(has.unsqueeze(1), logits[:, -1].float(), self.next_logits)
        self.next_feature = torch.where(has.unsqueeze(1), self.session.last_hidden[-1][:, -1], self.next_feature)
        self.has_context = self.has_context | has

    # ------------------------------------------------------------------------------------ drafting
    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.d2t[ids]

    def _pick(self, logits: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(draft-vocab index long [B], processed draft-vocab distribution [B, Vd] or None when greedy)."""
        if self.sampling.is_greedy:
            return logits.argmax(dim=-1), None
        p = logits_to_probs(logits, self.sampling)
        u = self.rng.uniform(DRAFT, (self.position + i).unsqueeze(1), device=self.device)[:, 0]
        return sample_inverse_cdf(p, u), p

    def _on_target_vocab(self, p: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((*p.shape[:-1], self.vocab_size), dtype=p.dtype, device=p.device)
        return full.index_copy_(-1, self.head.d2t, p)

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        assert self.session is not None and self.policy is not None
        if self.tree is not None:
            from .tree import propose_tree

            draft = propose_tree(self, self.tree, max_tokens)
            return self._without_context(draft)
        k = max(1, min(self.policy.current(), widest_budget(max_tokens)))
        logits, feature = self.next_logits, self.next_feature  # [R, Vd], [R, d]
        position = self.position.to(self.device)
        tokens, probs = [], []
        for i in range(k):
            idx, p = self._pick(self._sequence_logits(logits, position + i), i)
            tok = self.to_target_ids(idx)
            tokens.append(tok)
            probs.append(p)
            if i == k - 1:
                break
            logits = self.session.extend(self._rows(tok).unsqueeze(1), features=feature.unsqueeze(1), num_logits=1,
                                         hidden_layers=_OWN)[:, -1].float()
            feature = self.session.last_hidden[-1][:, -1]
        self.fed = k - 1
        num_draft = torch.where(self._ready(), k, 0)
        draft_probs = None if self.sampling.is_greedy else self._on_target_vocab(torch.stack(probs, dim=1))
        return Draft(tokens=torch.stack(tokens, dim=1), probs=draft_probs, num_draft=num_draft)

    def _without_context(self, draft: Draft) -> Draft:
        ready = self._ready()
        if bool(ready.all()):
            return draft
        import dataclasses

        return dataclasses.replace(draft, num_draft=torch.where(ready, draft.num_draft, 0))

    # tree hooks (propose_tree): the root's children come from next_logits, a node reads its parent's hidden
    @property
    def tree_batch(self) -> int:
        return self.batch

    def tree_root_logits(self) -> torch.Tensor:
        rows = self.session.batch_size
        self._node_hidden = self.next_feature.new_zeros((rows, 0, self.head.config.hidden_size))
        return self._sequence_logits(self.next_logits, self.position.to(self.device))

    def tree_expand(self, tokens: torch.Tensor, parent_slots: torch.Tensor) -> torch.Tensor:
        """Sequence-level nodes tokens / parent_slots long [B, F] -> guided logits [B, F, Vd] of their children."""
        tokens, parent_slots = self._rows(tokens), self._rows(parent_slots)
        par = parent_slots.clamp_min(0).unsqueeze(-1).expand(-1, -1, self.next_feature.shape[-1])
        from_nodes = self._node_hidden.gather(1, par) if self._node_hidden.shape[1] else torch.zeros_like(
            par, dtype=self.next_feature.dtype)
        feature = torch.where((parent_slots >= 0).unsqueeze(-1), from_nodes, self.next_feature.unsqueeze(1))
        logits = self.session.extend_tree(tokens, parent_slots, features=feature, hidden_layers=_OWN)
        self._node_hidden = torch.cat([self._node_hidden, self.session.last_hidden[-1]], dim=1)
        # a node at tree depth d (0: a child of the committed context) predicts generated index position + d + 1
        depth = self.session._tree_depth[: self.batch, -tokens.shape[1]:]
        return self._sequence_logits(logits.float(), self.position.to(self.device).unsqueeze(1) + depth + 1)

    # ----------------------------------------------------------------------------------- observing
    def observe(self, outcome: StepOutcome) -> None:
        assert self.session is not None and self.policy is not None
        self.position = self.position + torch.tensor([len(c) for c in outcome.committed], dtype=torch.long)
        committed = outcome.committed if self.guidance is None else outcome.committed * 2  # per head row
        batch = len(committed)
        feats = self._features(outcome.target_hidden)  # [R, 1 + k, 3d] over [pending, drafts or nodes]
        if outcome.draft.is_tree:
            self.session.keep_path(torch.zeros((batch, 0), dtype=torch.long, device=self.device),
                                   torch.zeros((batch,), dtype=torch.long, device=self.device))
            nodes = self._rows(outcome.result.accepted_nodes)  # [R, D] node ids, -1 padded
            cols = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=self.device),
                              (nodes + 1).clamp_min(0)], dim=1)
            feats = feats.gather(1, cols.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        else:
            self.session.rollback(torch.full((batch,), self.fed, dtype=torch.long, device=self.device))
            self.policy.update(outcome.result.num_accepted, outcome.draft.num_draft)
        self.fed = 0
        # the committed tokens with the real features of the positions before them, right aligned
        width = max(len(c) for c in committed)
        tok = torch.zeros((batch, width), dtype=torch.long)
        valid = torch.zeros((batch, width), dtype=torch.long)
        index = torch.zeros((batch, width), dtype=torch.long)
        for b, c in enumerate(committed):
            m = len(c)
            if m:
                tok[b, width - m:] = torch.tensor(c, dtype=torch.long)
                valid[b, width - m:] = 1
                index[b, width - m:] = torch.arange(m)
        index = index.to(self.device)
        f = feats.gather(1, index.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        self._feed(tok.to(self.device), f, valid.to(self.device))

    def add_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_hidden: dict[int, torch.Tensor] | None = None) -> None:
        """Continuous batching: the new prompts' (feature, next token) pairs are fed to a head session of their
        own, which is merged into the running one (its rows after the batch's), as :meth:`observe_prefill` does
        for the first rows."""
        if self.guidance is not None:
            raise MMSpecError("rows cannot join a guided (CFG) batch")
        if target_hidden is None or input_ids.shape[1] < 2:
            raise MMSpecError("a joining row needs a prompt of at least two tokens and the target's hidden states "
                              "over its prefill")
        ids, mask = input_ids.to(self.device), attention_mask.to(device=self.device, dtype=torch.long)
        n = ids.shape[0]
        running = (self.session, self.has_context, self.next_logits, self.next_feature)
        self.session = CacheSession(self.head, n, self.device)
        self.has_context = torch.zeros((n,), dtype=torch.bool, device=self.device)
        self.next_logits = running[2].new_zeros((n, running[2].shape[1]))
        self.next_feature = running[3].new_zeros((n, running[3].shape[1]))
        self._feed(ids[:, 1:], self._features(target_hidden), mask[:, :-1])
        fresh, has, logits, feature = self.session, self.has_context, self.next_logits, self.next_feature
        self.session = running[0]
        self.session.merge(fresh)
        self.has_context = torch.cat([running[1], has])
        self.next_logits = torch.cat([running[2], logits])
        self.next_feature = torch.cat([running[3], feature])
        self.position = torch.cat([self.position, torch.zeros((n,), dtype=torch.long)])

    def select_rows(self, rows: torch.Tensor) -> None:
        assert self.session is not None
        head_rows = self._row_index(rows)
        self.session.select_rows(head_rows)
        self.position = self.position[rows.cpu()]
        self.has_context = self.has_context[head_rows]
        self.next_logits = self.next_logits[head_rows]
        self.next_feature = self.next_feature[head_rows]
