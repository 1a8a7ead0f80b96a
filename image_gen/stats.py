"""Statistics of image-token generation on the one decoding loop (:func:`mmspec.engine.decode`).

Glossary:
    acceptance map  float [H, W]: fraction of images whose token at (h, w) was a drafted token the
                    rule accepted (the rest were sampled by the target: recovered or bonus)
    target forward  one batched call of the target (both CFG halves run in the same call)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.stats import GenerationStats


@dataclass
class ImageGenerationStats(GenerationStats):
    accepted_map: torch.Tensor | None = None  # float [H, W]: fraction of images with a drafted token kept
    target_forwards: int = 0  # batched target calls including the prefill
    images: int = 0

    @property
    def tokens_per_forward(self) -> float:
        """Image tokens emitted per target forward an image took part in (tau for chain methods)."""
        return self.emitted_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def target_forwards_per_image(self) -> float:
        """Target forward passes each image took part in (verification steps, plus the prefill
        when the prefix has more than one token), averaged over images; batch-size independent."""
        prefill = self.target_forwards - self.steps
        return self.row_steps / self.images + prefill if self.images else 0.0

    def as_dict(self) -> dict:
        d = super().as_dict()
        d["accepted_map"] = None if self.accepted_map is None else self.accepted_map.tolist()
        d["target_forwards_per_image"] = self.target_forwards_per_image
        d["tokens_per_forward"] = self.tokens_per_forward
        return d


class AcceptanceMap:
    """Accumulates the acceptance map from the loop's events (rows = images)."""

    def __init__(self, num_images: int, grid: int):
        self.grid = grid
        self.flags = torch.zeros((num_images, grid * grid), dtype=torch.float32)
        self.filled = [0] * num_images

    def add(self, rows: list[int], tokens: list[list[int]], num_accepted: list[int],
            kept: list[list[bool]] | None = None) -> None:
        """``kept`` (per row and token) when the kept drafts are not simply the first ``num_accepted``."""
        for i, (r, toks, n) in enumerate(zip(rows, tokens, num_accepted)):
            start = self.filled[r]
            if kept is None:
                self.flags[r, start: start + min(n, len(toks))] = 1.0
            else:
                self.flags[r, start: start + len(toks)] = torch.tensor(kept[i], dtype=torch.float32)
            self.filled[r] += len(toks)

    def mean(self) -> torch.Tensor:
        return self.flags.mean(dim=0).view(self.grid, self.grid)
