"""Classifier-free guidance as a target-session wrapper (one cache, conditional and unconditional halves).

Paper: Ho & Salimans, "Classifier-Free Diffusion Guidance" (2022), in the logit form LlamaGen uses
for AR image models: guided = uncond + s * (cond - uncond).

Glossary:
    halves      rows [0, B) of the wrapped cache carry the condition, rows [B, 2B) its unconditional
                twin (null class / null prompt); both halves always receive the same generated tokens
    schedule    the scale s per generated position: "constant" (s everywhere) or "linear" (1 at the
                first token rising to s at the last)
    position    the index (0-based, among generated tokens) of the token a column's logits predict;
                the session counts the tokens it was fed since the prompt, so callers never pass it
    Guidance    what a caller gives: the unconditional prompts, the scale, the schedule and the
                number of generated tokens the schedule spans

:class:`GuidedSession` has the interface of :class:`~mmspec.cache.CacheSession` (``extend``,
``rollback``, ``select_rows``, ``calls``, ``batch_size``), in per-sequence terms, so the one decoding
loop and the model drafter use it unchanged; :func:`open_session` builds either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CacheSession, right_align
from .errors import MMSpecError, NonFiniteError
from .session import TargetSession

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Guidance:
    uncond: list[list[int]]  # per sequence: the unconditional prompt's ids
    scale: float
    schedule: str = "constant"
    num_tokens: int = 1  # generated tokens the schedule spans

    def __post_init__(self) -> None:
        check_guidance_scale(self.scale)
        if self.schedule not in SCHEDULES:
            raise MMSpecError(f"unknown cfg schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if any(len(u) == 0 for u in self.uncond):
            raise MMSpecError("an unconditional prompt is empty")


def check_guidance_scale(scale: Any, name: str = "cfg_scale") -> float:
    """A finite number >= 0, else a named error."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise MMSpecError(f"{name} must be a number >= 0, got {scale!r}")
    if not math.isfinite(scale):
        raise NonFiniteError(f"{name} must be finite, got {scale!r}")
    if scale < 0:
        raise MMSpecError(f"{name} must be >= 0, got {scale!r}")
    return float(scale)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond) (LlamaGen's form).

    ``scale`` is a float or a tensor broadcastable to the logits (e.g. [B, w, 1] for a schedule).
    """
    return uncond + (cond - uncond) * scale


def guidance_scale(cfg_scale: float, schedule: str, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-position CFG scale. positions long [...] (0-based generated-token index) -> float [...]."""
    if schedule == "constant":
        return torch.full(positions.shape, float(cfg_scale), dtype=torch.float32, device=positions.device)
    if schedule == "linear":
        frac = positions.to(torch.float32) / max(num_tokens - 1, 1)
        return 1.0 + (cfg_scale - 1.0) * frac
    raise MMSpecError(f"unknown cfg schedule {schedule!r}; expected one of {SCHEDULES}")


def guide_halves(logits: torch.Tensor, guidance: Guidance, predicts: torch.Tensor) -> torch.Tensor:
    """Logits of both halves [2B, ..., V] (conditional rows first) -> guided logits [B, ..., V] at the scale of
    the generated index each column predicts, ``predicts`` long [B, ...]."""
    batch = logits.shape[0] // 2
    g = guidance
    scale = guidance_scale(g.scale, g.schedule, predicts.clamp_min(0), g.num_tokens).unsqueeze(-1)
    return guide(logits[:batch].float(), logits[batch:].float(), scale.to(logits.device))


class GuidedSession(TargetSession):
    """One model's cache over 2B rows (both halves) returning guided logits [B, w, V]."""

    def __init__(self, model: torch.nn.Module, cond: list[list[int]], guidance: Guidance, device: torch.device,
                 *, record_hidden: tuple[int, ...] = ()):
        if len(guidance.uncond) != len(cond):
            raise MMSpecError(f"{len(cond)} prompts but {len(guidance.uncond)} unconditional prompts")
        self.guidance = guidance
        self.batch = len(cond)
        ids, mask = guided_rows(cond, guidance, device)
        self.inner = CacheSession(model, ids.shape[0], device)
        if ids.shape[1] > 1:  # ``record_hidden``: a feature drafter reads the prompt's hidden states (both halves)
            self.inner.extend(ids[:, :-1], mask[:, :-1], num_logits=1, hidden_layers=record_hidden)
        # while nothing was fed since the prompt, the first fed column is each half's last prompt token:
        # the caller feeds the condition's, the unconditional half gets its own here
        self.uncond_last = ids[self.batch:, -1]  # [B]
        self.fed = torch.zeros((self.batch,), dtype=torch.long, device=device)  # tokens fed since the prompt

    # -- CacheSession interface ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def model(self) -> torch.nn.Module:
        return self.inner.model

    @property
    def calls(self) -> int:
        return self.inner.calls

    @property
    def batch_size(self) -> int:
        return self.batch

    def both(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sequence [B, ...] -> per-row [2B, ...]."""
        return torch.cat([t, t], dim=0)

    @property
    def last_hidden(self) -> dict[int, torch.Tensor] | None:
        """Hidden states of the last forward over both halves (layer -> [2B, w, d]: rows [0, B) conditional,
        [B, 2B) unconditional; see CacheSession.extend): a guided feature drafter runs both halves too."""
        return self.inner.last_hidden

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *,
               num_logits: int | None = None, positions: torch.Tensor | None = None,
               **model_inputs: Any) -> torch.Tensor:
        """Feed tokens [B, w] (both halves); returns guided logits [B, n, V] (n = ``num_logits`` or w).

        ``positions`` long [B, w] (optional): the generated index of each column's token, for blocks
        whose invalid columns keep their positions (holes that still count); by default the valid
        columns are numbered consecutively."""
        valid = torch.ones_like(tokens) if valid is None else valid.to(torch.long)
        rows = self._first_column_fix(self.both(tokens), valid)
        if positions is None:
            pos = self.fed.unsqueeze(1) + valid.cumsum(dim=1) - 1  # [B, w]: generated index each column predicts
        else:
            pos = positions
            model_inputs["position_ids"] = self._model_positions(positions)
        logits = self.inner.extend(rows, self.both(valid), num_logits=num_logits, **model_inputs)
        self.fed = self.fed + valid.sum(dim=1)
        return self._guided(logits, pos[:, -logits.shape[1]:])

    def extend_masked(self, tokens: torch.Tensor, allowed_tail: torch.Tensor, tail_start: int,
                      positions: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B, w] in both halves with per-query attention (:meth:`CacheSession.extend_masked`;
        ``tail_start`` is a slot index of the inner session, common to both halves); ``positions`` long
        [B, w]: the generated index each slot predicts (its own token's index + 1, as in :meth:`extend`).
        Returns guided logits [B, w, V]."""
        logits = self.inner.extend_masked(self.both(tokens), self.both(allowed_tail), tail_start,
                                          self._model_positions(positions))
        self.fed = self.fed + tokens.shape[1]
        return self._guided(logits, positions)

    def _model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Generated indices [B, w] (as :meth:`extend` takes them) -> the model's position ids [2B, w]: each
        half's prompt length plus the index."""
        base = self.inner.next_pos - self.both(self.fed)  # [2B]: prompt tokens per row, both halves
        return base.unsqueeze(1) + self.both(positions)

    def fork(self, rows: torch.Tensor) -> "GuidedSession":
        """A new session over copies of sequences ``rows`` (long [R], repeats allowed), both halves."""
        import copy

        fork = copy.copy(self)
        fork.inner = self.inner.fork(torch.cat([rows, rows + self.batch]))
        fork.batch, fork.fed, fork.uncond_last = rows.numel(), self.fed[rows], self.uncond_last[rows]
        return fork

    def _first_column_fix(self, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        fresh = self.fed == 0  # [B]: the first fed column is the last prompt token
        if not bool(fresh.any()):
            return rows
        first = valid.argmax(dim=1)  # [B]: first valid column
        b = torch.nonzero(fresh).flatten()
        rows = rows.clone()
        rows[self.batch + b, first[b]] = self.uncond_last[b]
        return rows

    def _guided(self, logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return guide_halves(logits, self.guidance, pos)

    # -- draft trees (see CacheSession.extend_tree) ---------------------------------------------
    def begin_tree(self) -> None:
        self.inner.begin_tree()

    def extend_tree(self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor | None = None,
                    **model_inputs: Any) -> torch.Tensor:
        """Tree nodes [B, w] in both halves; guided logits [B, w, V] (a node at tree depth d predicts
        generated index fed + d)."""
        valid = torch.ones_like(tokens) if valid is None else valid.to(torch.long)
        rows = self._first_column_fix(self.both(tokens), valid)
        logits = self.inner.extend_tree(rows, self.both(parents), self.both(valid), **model_inputs)
        depth = self.inner._tree_depth[: self.batch, -tokens.shape[1]:]
        return self._guided(logits, self.fed.unsqueeze(1) + depth)

    def keep_path(self, path: torch.Tensor, num_keep: torch.Tensor) -> None:
        self.inner.keep_path(self.both(path), self.both(num_keep))
        self.fed = self.fed + num_keep

    def rollback(self, num_remove: torch.Tensor) -> None:
        """Remove the last num_remove[b] tokens of sequence b (long [B]) from both halves."""
        self.inner.rollback(self.both(num_remove))
        self.fed = self.fed - num_remove

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only sequences ``rows`` (long [B'])."""
        self.inner.select_rows(torch.cat([rows, rows + self.batch]))
        self.fed = self.fed[rows]
        self.uncond_last = self.uncond_last[rows]
        self.batch = rows.numel()


def guided_rows(cond: list[list[int]], guidance: Guidance, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2B prompt rows of a guided session (conditional prompts, then their unconditional twins), right
    aligned: (ids long [2B, W], valid long [2B, W]). A guided feature drafter lays its rows out the same way."""
    return right_align(cond + guidance.uncond, device)


def conditional_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Left-padded prompts [B, L] -> each row's token list."""
    return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]


def open_session(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 guidance: Guidance | None = None, record_hidden: tuple[int, ...] = ()) -> CacheSession | GuidedSession:
    """A session holding every prompt token but the last (which stays pending): a plain cache, or a
    CFG pair of halves when ``guidance`` is given. input_ids / attention_mask long [B, L], left padded.
    ``record_hidden``: hidden-state layers the prompt's forward keeps in ``last_hidden``."""
    device = input_ids.device
    if guidance is None:
        session = CacheSession(model, input_ids.shape[0], device)
        if input_ids.shape[1] > 1:
            session.extend(input_ids[:, :-1], attention_mask[:, :-1], num_logits=1, hidden_layers=record_hidden)
        return session
    return GuidedSession(model, conditional_prompts(input_ids, attention_mask), guidance, device,
                         record_hidden=record_hidden)
