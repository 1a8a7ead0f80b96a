"""Draft-length policies (how many tokens to draft next step).

Glossary:
    FixedDraftLength       always k
    HeuristicDraftLength   HF transformers' assisted-generation schedule: +2 after a step in
                           which every drafted token was accepted, otherwise -1 (minimum 1)
    ConfidenceDraftLength  drafting of a row stops once the drafter's probability of the token
                           it just drafted falls below ``threshold`` (HF's
                           ``assistant_confidence_threshold``); drafting stops when every row
                           has stopped or ``max_tokens`` is reached
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


def as_policy(spec: int | DraftLengthPolicy) -> DraftLengthPolicy:
    """An int means a fixed draft length."""
    if isinstance(spec, DraftLengthPolicy):
        return spec
    return FixedDraftLength(_check_k(spec))
