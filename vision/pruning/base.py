"""Visual-token pruning strategies for the drafter (interface, budget, the "none" baseline).

Glossary:
    N            visual (image) tokens of one row of the drafter's prompt
    keep ratio   r in [0, 1]; the drafter keeps ceil(r * N) visual tokens (r = 0: none, a
                 text-only draft context, Gagrani et al. 2024)
    scores       per-token evidence a strategy may use, gathered once at prefill:
                 ``features`` (the drafter's projected visual embeddings [N, d]),
                 ``target_attention`` (the target's text->image prefill attention [N]),
                 ``cls_attention`` (vision encoder [CLS]->patch attention [N])

Pruning never touches the target, so verification stays lossless whatever is kept.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from mmspec.errors import MMSpecError


class PruningError(MMSpecError):
    """A strategy cannot run on this model or input (e.g. [CLS] attention without a [CLS] token)."""


@dataclass(frozen=True)
class PruningInputs:
    """Evidence for one row's N visual tokens (any field may be None if not gathered)."""

    features: torch.Tensor | None = None  # float [N, d]
    target_attention: torch.Tensor | None = None  # float [N]
    cls_attention: torch.Tensor | None = None  # float [N]

    @property
    def num_tokens(self) -> int:
        for t in (self.features, self.target_attention, self.cls_attention):
            if t is not None:
                return int(t.shape[0])
        raise PruningError("no pruning evidence was gathered")


def keep_budget(num_tokens: int, keep_ratio: float) -> int:
    """ceil(r * N) (with a tolerance so that 0.1 * 30 keeps 3, not 4)."""
    return min(num_tokens, math.ceil(keep_ratio * num_tokens - 1e-9))


def uniform_stride(candidates: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced entries of the ordered 1-D tensor ``candidates``."""
    n = candidates.numel()
    if count <= 0 or n == 0:
        return candidates[:0]
    if count >= n:
        return candidates
    idx = (torch.arange(count, dtype=torch.long) * n) // count
    return candidates[idx.to(candidates.device)]


def select_visual_tokens(image: torch.Tensor, strategy: "PruningStrategy", keep_ratio: float,
                         evidence: Callable[[int, torch.Tensor], PruningInputs]
                         ) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """Apply ``strategy`` row by row: image bool [B, L] (the visual positions) -> (kept bool [B, L], kept
    count per row, kept visual indices per row, ascending). ``evidence(b, cols)`` gathers row ``b``'s
    evidence for its visual columns ``cols`` (called only when the strategy must choose)."""
    kept = torch.zeros_like(image)
    counts, indices = [], []
    for b in range(image.shape[0]):
        cols = image[b].nonzero().flatten()
        n = cols.numel()
        budget = n if strategy.name == "none" else keep_budget(n, keep_ratio)
        if budget >= n:
            chosen = torch.arange(n, device=cols.device)
        elif budget == 0:
            chosen = cols[:0]
        else:
            chosen = strategy.select(evidence(b, cols), budget).to(cols.device)
        kept[b, cols[chosen]] = True
        counts.append(int(chosen.numel()))
        indices.append(sorted(int(i) for i in chosen.tolist()))
    return kept, counts, indices


class PruningStrategy(ABC):
    """Chooses which visual tokens the drafter keeps."""

    name: str = "?"
    #: evidence the strategy needs: any of "features", "target_attention", "cls_attention"
    needs: tuple[str, ...] = ()

    @abstractmethod
    def select(self, inputs: PruningInputs, budget: int) -> torch.Tensor:
        """Indices (long [budget], ascending) of the visual tokens to keep."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoPruning(PruningStrategy):
    """Keep every visual token (the full-token drafter baseline); ignores the keep ratio."""

    name = "none"

    def select(self, inputs: PruningInputs, budget: int) -> torch.Tensor:
        return torch.arange(inputs.num_tokens)
