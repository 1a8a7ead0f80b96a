"""Visual-token pruning strategies for the drafter VLM."""

from __future__ import annotations

from .base import (NoPruning, PruningError, PruningInputs, PruningStrategy, keep_budget, select_visual_tokens,
                   uniform_stride)
from .cls_attention import ClsAttentionPruning, cls_scores_per_token
from .diversity import DiversityPruning, select_max_min
from .uniform import UniformPruning
from .verifier import VerifierGuidedPruning, select_top_mass_then_stride

STRATEGIES = {
    "none": NoPruning, "uniform": UniformPruning, "diversity": DiversityPruning,
    "cls": ClsAttentionPruning, "verifier": VerifierGuidedPruning,
}


def get_strategy(spec: str | PruningStrategy) -> PruningStrategy:
    """A strategy object from its name (none, uniform, diversity, cls, verifier) or as given."""
    if isinstance(spec, PruningStrategy):
        return spec
    if spec not in STRATEGIES:
        raise PruningError(f"unknown pruning strategy {spec!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[spec]()


__all__ = [
    "ClsAttentionPruning", "DiversityPruning", "NoPruning", "PruningError", "PruningInputs", "PruningStrategy",
    "STRATEGIES", "UniformPruning", "VerifierGuidedPruning", "cls_scores_per_token", "get_strategy", "keep_budget",
    "select_max_min", "select_visual_tokens", "select_top_mass_then_stride", "uniform_stride",
]
