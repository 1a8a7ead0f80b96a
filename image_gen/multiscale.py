"""MuLo-SD's multi-scale drafter: a low-resolution AR model drafts whole rows for the high-resolution target.

Paper: Peruzzo, Sautière, Habibian, "Multi-Scale Local Speculative Decoding for Image Generation"
(CVPR 2026); notes in ``docs/design/mulo_sd.md``.

Glossary:
    scale r      high-res grid side / low-res grid side (2 or 4); the same VQ codebook serves both
                 resolutions (one convolutional tokenizer at two image sizes)
    down-sample  final high-res rows -> decode -> resize by 1/r -> re-encode: the low-res prefix the
                 drafter conditions on (r high-res rows per low-res row)
    up-sample    low-res rows -> decode -> resize by r -> re-encode: high-res candidate rows; needs no
                 training (the paper's learned up-sampler is an option for later)
    block        one low-res row drafted per step = r high-res rows = r * W candidates
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmspec.config import SamplingParams
from mmspec.errors import MMSpecError
from mmspec.sampling import logits_to_probs

from .mulo import GuidedContext, draw_keyed, guided_logits
from .tokenizer import VQTokenizer


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 3, h, w] in [-1, 1] -> [B, 3, size, size] (bicubic, antialiased when shrinking)."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class MultiScaleDrafter:
    """Drafts r high-res rows per step with ``low_ctx.model`` at 1/r resolution."""

    def __init__(self, low_ctx: GuidedContext, tokenizer: VQTokenizer, scale: int, sampling: SamplingParams,
                 seed: int = 0):
        hi_grid = tokenizer.grid_size[0]
        lo_grid = low_ctx.model.config.grid_size
        if scale < 2 or hi_grid != lo_grid * scale:
            raise MMSpecError(f"scale {scale}: the low-res model's grid {lo_grid} x {scale} must equal the "
                              f"tokenizer's grid {hi_grid}")
        if low_ctx.model.config.codebook_size != tokenizer.vocab_size:
            raise MMSpecError("the low-res model and the tokenizer must share the codebook")
        # resolution changes re-encode with one nearest-code pass (a proposal: the target verifies it)
        self.low, self.hi_tok = low_ctx, VQTokenizer(tokenizer.vq_model, tokenizer.image_size)
        self.lo_tok = VQTokenizer(tokenizer.vq_model, tokenizer.image_size // scale)
        self.scale, self.sampling, self.seed = scale, sampling, seed
        self.hi_grid, self.lo_grid = hi_grid, lo_grid

    @torch.no_grad()
    def downsample(self, hi_tokens: torch.Tensor) -> torch.Tensor:
        """long [H, W] high-res grid -> long [H/r, W/r] low-res grid."""
        img = self.hi_tok.decode_tensor(hi_tokens.unsqueeze(0))
        return self.lo_tok.encode(resize_images(img, self.lo_tok.image_size))[0]

    @torch.no_grad()
    def upsample(self, lo_tokens: torch.Tensor) -> torch.Tensor:
        """long [H/r, W/r] low-res grid -> long [H, W] high-res grid."""
        img = self.lo_tok.decode_tensor(lo_tokens.unsqueeze(0))
        return self.hi_tok.encode(resize_images(img, self.hi_tok.image_size))[0]

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor, t0: int, m: int) -> torch.Tensor:
        """The ``propose_block`` of :func:`~mmspec.image_gen.mulo.decode_mulo`: m = r * W candidates."""
        W, r = self.hi_grid, self.scale
        if t0 % (r * W) or m != r * W and t0 + m != W * W:
            raise MMSpecError(f"the multi-scale drafter drafts {r} whole rows per step (t0={t0}, m={m})")
        hi = torch.zeros(W * W, dtype=torch.long)
        hi[:t0] = prefix
        lo_rows_done = t0 // (r * W)
        lo = self.downsample(hi.view(W, W)).flatten() if t0 else torch.zeros(self.lo_grid ** 2, dtype=torch.long)
        n_lo = self.lo_grid
        for u in range(lo_rows_done * n_lo, (lo_rows_done + 1) * n_lo):  # draft one low-res row
            vis = torch.zeros(n_lo * n_lo, dtype=torch.bool)
            vis[:u] = True
            probs = logits_to_probs(guided_logits(self.low, lo.unsqueeze(0), vis.unsqueeze(0))[0, u], self.sampling)
            lo[u] = draw_keyed(probs, self.sampling, self.seed + 2_000_029 + 7919 * t0, u)
        up = self.upsample(lo.view(n_lo, n_lo)).flatten()
        return up[t0:t0 + m]
