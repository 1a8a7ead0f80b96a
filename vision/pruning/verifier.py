"""Verifier-guided pruning (SpecVLM).

Paper: Ji et al., "SpecVLM: Fast Speculative Decoding in Vision-Language Models" (EMNLP 2025).

Glossary:
    target attention   per visual token, the target's prefill attention from the text tokens after
                       the image, averaged over layers, heads and those text queries (captured
                       under SDPA by :mod:`mmspec.vision.attention_capture`)
    top set            the highest-scoring tokens, taken in order until they hold ``mass`` (40 %)
                       of the total visual attention (never more than the budget)
    fill               the rest of the budget by uniform stride over the tokens not in the top set
"""

from __future__ import annotations

import torch

from .base import PruningError, PruningInputs, PruningStrategy, uniform_stride


def select_top_mass_then_stride(scores: torch.Tensor, budget: int, mass: float = 0.4) -> torch.Tensor:
    """scores float [N] -> ascending kept indices long [budget]."""
    n = scores.shape[0]
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    if budget >= n:
        return torch.arange(n)
    s = scores.double().clamp_min(0)
    total = s.sum()
    order = torch.argsort(s, descending=True, stable=True)
    if total > 0:
        cum = s[order].cumsum(0) / total
        n_top = int((cum < mass).sum()) + 1  # smallest prefix reaching the mass
    else:
        n_top = 0
    n_top = min(n_top, budget)
    top = order[:n_top]
    rest_mask = torch.ones(n, dtype=torch.bool)
    rest_mask[top] = False
    rest = torch.arange(n)[rest_mask]
    fill = uniform_stride(rest, budget - n_top)
    return torch.sort(torch.cat([top, fill])).values


class VerifierGuidedPruning(PruningStrategy):
    name = "verifier"
    needs = ("target_attention",)

    def __init__(self, mass: float = 0.4):
        if not 0.0 <= mass <= 1.0:
            raise PruningError(f"mass must be in [0, 1], got {mass}")
        self.mass = mass

    def select(self, inputs: PruningInputs, budget: int) -> torch.Tensor:
        if inputs.target_attention is None:
            raise PruningError("verifier-guided pruning needs the target's prefill attention")
        return select_top_mass_then_stride(inputs.target_attention, budget, self.mass)
