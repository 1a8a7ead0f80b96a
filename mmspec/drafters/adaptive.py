"""Draft-length policies (how many tokens to draft next step).

Glossary:
    FixedDraftLength       always k
    HeuristicDraftLength   HF transformers' assisted-generation schedule: +2 after a step in
                           which every drafted token was accepted, otherwise -1 (minimum 1)
    ConfidenceDraftLength  drafting of a row stops once the drafter's probability of the token
                           it just drafted falls below ``threshold`` (HF's
                           ``assistant_confidence_threshold``); drafting stops when every row
                           has stopped or ``max_tokens`` is reached
    CostAwareDraftLength   each step, the k in 1 .. max_k with the most expected tokens per unit of time
                           for the batch, from a measured cost model of the target (verify(w): the cost of a
                           w-token forward in 1-token forwards) and a running estimate ``a`` of the chance a
                           drafted token is accepted given the ones before it were (geometric model):
                           k = argmax B (1 + a + ... + a^k) / (verify(B (1 + k)) + k c), B the batch's rows,
                           c a drafter forward in target forwards (the cost model's level_cost); ``a`` is
                           the decayed count of accepted drafts over accepted + rejected ones (a row step
                           that accepts n of d drafts adds n successes and, if n < d, one failure);
                           Leviathan et al. (ICML 2023, section 3.4) choose k by the same expression
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidDraftLengthError


def _check_k(k: int, name: str = "num_draft_tokens") -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidDraftLengthError(f"{name} must be an int >= 1, got {k!r}")
    return k


class DraftLengthPolicy:
    """Base: a fixed length; subclasses adapt it in :meth:`update` or stop early."""

    def current(self) -> int:
        raise NotImplementedError

    def stop_rows(self, confidence: torch.Tensor) -> torch.Tensor:
        """bool [B]: rows whose drafting stops after the token with this confidence [B]."""
        return torch.zeros_like(confidence, dtype=torch.bool)

    def update(self, num_accepted: torch.Tensor, num_draft: torch.Tensor) -> None:
        """Observe accepted / drafted counts (long [B]) of the last step."""


@dataclass
class FixedDraftLength(DraftLengthPolicy):
    k: int

    def __post_init__(self) -> None:
        _check_k(self.k)

    def current(self) -> int:
        return self.k


@dataclass
class HeuristicDraftLength(DraftLengthPolicy):
    k: int
    max_k: int = 64
    _k: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_k(self.k)
        _check_k(self.max_k, "max_k")
        self._k = self.k

    def current(self) -> int:
        return self._k

    def update(self, num_accepted: torch.Tensor, num_draft: torch.Tensor) -> None:
        if bool((num_accepted >= num_draft).all()):
            self._k = min(self._k + 2, self.max_k)
        else:
            self._k = max(1, self._k - 1)


@dataclass
class ConfidenceDraftLength(DraftLengthPolicy):
    k: int
    threshold: float = 0.4

    def __post_init__(self) -> None:
        _check_k(self.k)
        if not (0.0 <= self.threshold <= 1.0):
            raise InvalidDraftLengthError(f"threshold must be in [0, 1], got {self.threshold!r}")

    def current(self) -> int:
        return self.k

    def stop_rows(self, confidence: torch.Tensor) -> torch.Tensor:
        return confidence < self.threshold


@dataclass
class CostAwareDraftLength(DraftLengthPolicy):
    """``CostAwareDraftLength(cost_model, max_k=10)``: see the module glossary. ``cost_model``: anything with
    ``relative(w)`` (a :class:`~mmspec.drafters.cost_model.CostModel`, e.g. a calibration's ``cost``);
    ``prior``: the acceptance assumed before any draft was verified; ``decay``: per step, how much of the past
    the estimate keeps."""

    cost_model: object
    max_k: int = 10
    prior: float = 0.5
    decay: float = 0.95
    _accepted: float = field(init=False, repr=False, default=0.0)
    _rejected: float = field(init=False, repr=False, default=0.0)
    _rows: int = field(init=False, repr=False, default=1)

    def __post_init__(self) -> None:
        _check_k(self.max_k, "max_k")
        if not callable(getattr(self.cost_model, "relative", None)):
            raise InvalidDraftLengthError(
                f"cost_model must have relative(w) (a CostModel), got {type(self.cost_model).__name__}")
        if not (0.0 <= self.prior <= 1.0) or not (0.0 < self.decay <= 1.0):
            raise InvalidDraftLengthError(f"need prior in [0, 1] and decay in (0, 1], got {self.prior!r}, {self.decay!r}")

    @property
    def acceptance(self) -> float:
        """The running estimate ``a`` (the prior, weighted as two observations, until drafts are verified)."""
        return (self._accepted + 2 * self.prior) / (self._accepted + self._rejected + 2)

    def best_k(self, acceptance: float, rows: int) -> int:
        """argmax_k rows (1 + a + ... + a^k) / (verify(rows (1 + k)) + k c) over k = 1 .. max_k, c the cost model's
        ``level_cost`` (one drafter forward in target forwards; 0 for prompt lookup)."""
        best, best_rate, gain = 1, -1.0, 1.0
        level = float(getattr(self.cost_model, "level_cost", 0.0) or 0.0)  # a drafter forward, in target forwards
        for k in range(1, self.max_k + 1):
            gain += acceptance ** k
            rate = rows * gain / (self.cost_model.relative(rows * (1 + k)) + k * level)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def current(self) -> int:
        return self.best_k(self.acceptance, self._rows)

    def update(self, num_accepted: torch.Tensor, num_draft: torch.Tensor) -> None:
        drafted = num_draft > 0
        self._rows = max(int(num_draft.numel()), 1)  # the rows of the step seen (rows finishing now count once more)
        if not bool(drafted.any()):  # a step with nothing drafted (no lookup match) says nothing about acceptance
            return
        self._accepted = self.decay * self._accepted + float(num_accepted[drafted].sum())
        self._rejected = self.decay * self._rejected + float((num_accepted[drafted] < num_draft[drafted]).sum())


def as_policy(spec: int | DraftLengthPolicy) -> DraftLengthPolicy:
    """An int means a fixed draft length."""
    if isinstance(spec, DraftLengthPolicy):
        return spec
    return FixedDraftLength(_check_k(spec))
