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
                           w-token forward in 1-token forwards) and running estimates a_i of the chance the
                           i-th drafted token is accepted given the ones before it were (the acceptance
                           profile): k = argmax B (1 + a_1 + a_1 a_2 + ... + a_1 ... a_k) / (verify(B (1 + k))
                           + k c), B the batch's rows, c a drafter forward in target forwards (the cost
                           model's level_cost). a_i is a decayed count: a row step that accepts n of d drafts
                           tried depths 1 .. min(n + 1, d) and passed depths 1 .. n; a depth seen little leans
                           on the pooled rate ``a`` (all passes over all tries, the geometric model's single
                           rate). Prompt lookup's profile rises with depth (a copy that starts tends to go on),
                           so it drafts longer than the geometric model would. Leviathan et al. (ICML 2023,
                           section 3.4) choose k by the same expression with one rate. With ``min_k=0`` (prompt
                           lookup: a drafter that costs nothing) k = 0, no drafts, is a choice too (its rate is
                           B / verify(B)); while it wins, every ``probe_every``-th step still drafts 1 token so
                           the estimates keep learning when the text turns copyable
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
    the estimates keep; ``profile``: estimate a rate per depth (default) or one rate for every depth (geometric);
    ``prior_weight``: how many tries of the pooled rate each depth's estimate starts from; ``min_k``: 0 lets the
    policy choose no drafts (drafters that accept k = 0, such as prompt lookup), probing with 1 token every
    ``probe_every`` steps while it does."""

    cost_model: object
    max_k: int = 10
    prior: float = 0.5
    decay: float = 0.95
    profile: bool = True
    prior_weight: float = 2.0
    min_k: int = 1
    probe_every: int = 8
    _abstained: int = field(init=False, repr=False, default=0)  # steps in a row the policy chose no drafts
    _tried: list = field(init=False, repr=False, default=None)  # [max_k] decayed tries per depth
    _passed: list = field(init=False, repr=False, default=None)  # [max_k] decayed passes per depth
    _rows: int = field(init=False, repr=False, default=1)

    def __post_init__(self) -> None:
        _check_k(self.max_k, "max_k")
        if not callable(getattr(self.cost_model, "relative", None)):
            raise InvalidDraftLengthError(
                f"cost_model must have relative(w) (a CostModel), got {type(self.cost_model).__name__}")
        if not (0.0 <= self.prior <= 1.0) or not (0.0 < self.decay <= 1.0):
            raise InvalidDraftLengthError(f"need prior in [0, 1] and decay in (0, 1], got {self.prior!r}, {self.decay!r}")
        if not self.prior_weight > 0:
            raise InvalidDraftLengthError(f"need prior_weight > 0, got {self.prior_weight!r}")
        if self.min_k not in (0, 1) or not (isinstance(self.probe_every, int) and self.probe_every >= 1):
            raise InvalidDraftLengthError(f"need min_k 0 or 1 and probe_every an int >= 1, got {self.min_k!r}, "
                                          f"{self.probe_every!r}")
        self._tried = [0.0] * self.max_k
        self._passed = [0.0] * self.max_k

    @property
    def acceptance(self) -> float:
        """The pooled rate ``a``: all passes over all tries (the prior, weighted as ``prior_weight`` tries, until
        drafts are verified)."""
        w = self.prior_weight
        return (sum(self._passed) + w * self.prior) / (sum(self._tried) + w)

    @property
    def acceptance_by_depth(self) -> list[float]:
        """[max_k] a_i: the chance the i-th drafted token is accepted given the ones before it were; each depth's
        counts start from ``prior_weight`` tries at the pooled rate (every a_i is the pooled rate when ``profile``
        is off)."""
        a, w = self.acceptance, self.prior_weight
        if not self.profile:
            return [a] * self.max_k
        return [(p + w * a) / (t + w) for p, t in zip(self._passed, self._tried)]

    def best_k(self, acceptance: float | list[float], rows: int) -> int:
        """argmax_k rows (1 + a_1 + a_1 a_2 + ... + a_1 ... a_k) / (verify(rows (1 + k)) + k c) over k = 1 ..
        max_k; ``acceptance``: one rate for every depth, or one per depth; c the cost model's ``level_cost`` (one
        drafter forward in target forwards; 0 for prompt lookup); k = 0 (rate rows / verify(rows)) is a candidate
        when ``min_k`` is 0."""
        rates = [float(acceptance)] * self.max_k if isinstance(acceptance, (int, float)) else list(acceptance)
        best, best_rate, gain, reach = 1, -1.0, 1.0, 1.0
        if self.min_k == 0:
            best, best_rate = 0, rows / self.cost_model.relative(rows)
        level = float(getattr(self.cost_model, "level_cost", 0.0) or 0.0)  # a drafter forward, in target forwards
        for k in range(1, self.max_k + 1):
            reach *= rates[k - 1]  # P(the first k drafts are all accepted)
            gain += reach
            rate = rows * gain / (self.cost_model.relative(rows * (1 + k)) + k * level)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def current(self) -> int:
        k = self.best_k(self.acceptance_by_depth, self._rows)
        if k > 0:
            self._abstained = 0
            return k
        self._abstained += 1
        return 1 if self._abstained % self.probe_every == 0 else 0  # a probe keeps the estimates learning

    def update(self, num_accepted: torch.Tensor, num_draft: torch.Tensor) -> None:
        drafted = num_draft > 0
        self._rows = max(int(num_draft.numel()), 1)  # the rows of the step seen (rows finishing now count once more)
        if not bool(drafted.any()):  # a step with nothing drafted (no lookup match) says nothing about acceptance
            return
        n = num_accepted[drafted].clamp(min=0).tolist()
        d = num_draft[drafted].tolist()
        self._tried = [self.decay * t for t in self._tried]
        self._passed = [self.decay * p for p in self._passed]
        for acc, dr in zip(n, d):
            for i in range(min(acc + 1, dr, self.max_k)):  # depth i + 1 was tried; passed if i < acc
                self._tried[i] += 1.0
                self._passed[i] += float(i < acc)


def as_policy(spec: int | DraftLengthPolicy) -> DraftLengthPolicy:
    """An int means a fixed draft length."""
    if isinstance(spec, DraftLengthPolicy):
        return spec
    return FixedDraftLength(_check_k(spec))
