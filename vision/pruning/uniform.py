"""Uniform-stride visual-token pruning (baseline).

Glossary: keep ``budget`` tokens evenly spaced in raster order (indices floor(i * N / budget)).
"""

from __future__ import annotations

import torch

from .base import PruningInputs, PruningStrategy, uniform_stride


class UniformPruning(PruningStrategy):
    name = "uniform"

    def select(self, inputs: PruningInputs, budget: int) -> torch.Tensor:
        return uniform_stride(torch.arange(inputs.num_tokens), budget)
