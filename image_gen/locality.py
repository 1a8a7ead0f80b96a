"""Locality-aware rejection on the 2-D token grid (MuLo-SD).

Paper: MuLo-SD (CVPR 2026): after verifying a block of drafted image tokens, only the spatial
neighbourhoods of the rejected tokens are resampled instead of the whole raster suffix.

Glossary:
    t0        raster index of the first token of the verified block; tokens before it are final
    N(t, l)   {u : |row_u - row_t| <= l, |col_u - col_t| <= l, u >= t0}: the (2l+1) x (2l+1) square
              around a rejected token t, clipped to the grid and to the block (u >= t0)
    resample  the union of N(t, l) over the rejected tokens; every other token of the block is kept
    islands   8-connected components of the resample mask; they are conditionally independent
              given the kept tokens and can be resampled together in one batched target forward
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmspec.errors import MMSpecError


def expand_rejections(rejected: torch.Tensor, l: int, t0: int = 0) -> torch.Tensor:
    """bool [..., H, W] rejected tokens -> bool [..., H, W] tokens to resample (union of N(t, l), u >= t0)."""
    if rejected.dim() < 2:
        raise MMSpecError(f"rejected must be [..., H, W], got shape {tuple(rejected.shape)}")
    if not isinstance(l, int) or l < 0:
        raise MMSpecError(f"neighbourhood radius l must be an int >= 0, got {l!r}")
    h, w = rejected.shape[-2:]
    x = rejected.reshape(-1, 1, h, w).to(torch.float32)
    grown = F.max_pool2d(x, kernel_size=2 * l + 1, stride=1, padding=l) > 0 if l > 0 else x > 0
    grown = grown.reshape(rejected.shape)
    raster = torch.arange(h * w, device=rejected.device).view(h, w)
    return grown & (raster >= t0)


def rejection_islands(mask: torch.Tensor) -> torch.Tensor:
    """bool [H, W] -> long [H, W] labels of the 8-connected components (0, 1, ... in raster order of
    each component's first token; -1 outside the mask)."""
    if mask.dim() != 2:
        raise MMSpecError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    h, w = mask.shape
    cells = mask.cpu().tolist()
    labels = [[-1] * w for _ in range(h)]
    count = 0
    for r in range(h):
        for c in range(w):
            if not cells[r][c] or labels[r][c] >= 0:
                continue
            stack = [(r, c)]
            labels[r][c] = count
            while stack:
                y, x = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and cells[ny][nx] and labels[ny][nx] < 0:
                            labels[ny][nx] = count
                            stack.append((ny, nx))
            count += 1
    return torch.tensor(labels, dtype=torch.long, device=mask.device)
