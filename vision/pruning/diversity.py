"""Diversity-based pruning (DivPrune).

Paper: Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models" (CVPR 2025).

Glossary:
    distance   1 - cos(f_i, f_j) between projected visual embeddings
    max-min    greedy solution of the max-min diversity problem: start with the token whose
               nearest other token is farthest, then repeatedly add the token whose distance to
               the kept set (its nearest kept token) is largest
"""

from __future__ import annotations

import torch

from .base import PruningError, PruningInputs, PruningStrategy


def select_max_min(features: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy max-min selection; features float [N, d] -> ascending indices long [budget]."""
    n = features.shape[0]
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    if budget >= n:
        return torch.arange(n)
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    dist = 1.0 - x @ x.T  # [N, N]
    off_diag = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype))
    first = int(off_diag.min(dim=1).values.argmax())
    chosen = [first]
    nearest = dist[first].clone()  # [N]: distance of each token to its nearest kept token
    nearest[first] = -1.0
    for _ in range(budget - 1):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
        nearest[chosen] = -1.0
    return torch.tensor(sorted(chosen), dtype=torch.long)


class DiversityPruning(PruningStrategy):
    name = "diversity"
    needs = ("features",)

    def select(self, inputs: PruningInputs, budget: int) -> torch.Tensor:
        if inputs.features is None:
            raise PruningError("diversity pruning needs the projected visual features")
        return select_max_min(inputs.features, budget)
