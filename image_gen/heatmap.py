"""Acceptance heat-maps of image generation, as PIL images.

Glossary:
    accepted map   float [H, W] in [0, 1] (``GenerationStats.accepted_map`` of image generation): per grid
                   position, the fraction of images whose token there was drafted and accepted
    colours        dark blue (0: every image sampled this token from the target) to yellow (1: drafted and
                   accepted in every image), linear in between
    cell           each grid position becomes a ``cell`` x ``cell`` block of pixels (nearest resampling)

Used by ``mmspec imagegen`` / ``mmspec run`` (``acceptance_heatmap.png``) and the image-generation demo.
"""

from __future__ import annotations

import torch

#: RGB of a grid position whose token the target sampled (value 0) and one drafted and accepted (value 1)
TARGET_RGB = (30.0, 30.0, 110.0)
ACCEPTED_RGB = (250.0, 220.0, 40.0)


def heatmap_image(accepted_map: torch.Tensor, cell: int = 24):
    """[H, W] in [0, 1] -> PIL RGB image of size (W * cell, H * cell); values outside [0, 1] are clipped."""
    from PIL import Image

    m = accepted_map.detach().to("cpu", torch.float32).clamp(0, 1)
    lo, hi = torch.tensor(TARGET_RGB), torch.tensor(ACCEPTED_RGB)
    rgb = (lo + (hi - lo) * m.unsqueeze(-1)).round().to(torch.uint8)  # [H, W, 3]
    img = Image.fromarray(rgb.numpy(), "RGB")
    return img.resize((img.width * cell, img.height * cell), Image.NEAREST)


__all__ = ["heatmap_image"]
