"""Configuration dataclasses.

Glossary:
    sampling params   temperature / top-k / top-p, applied exactly as HF's logits warpers
                      (``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``).
    greedy            temperature == 0: argmax decoding, no randomness consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidSamplingError


@dataclass(frozen=True)
class SamplingParams:
    """How the target (and the drafter) turn logits into a distribution.

    ``temperature=0`` means greedy decoding. ``top_k=None``/``0`` and ``top_p=None``/``1.0``
    disable the respective filter (unlike HF's ``generate``, there is no hidden default
    ``top_k=50``; pass it explicitly to match a HF run that used the default).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or t != t or t < 0:
            raise InvalidSamplingError(f"temperature must be a number >= 0, got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise InvalidSamplingError(f"top_k must be a non-negative int or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
