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

A :class:`~mmspec.drafters.base.Drafter` of the one loop: each step it re-derives the low-res prefix
from the committed high-res tokens, prefills it in one cached forward of the low-res model (with the
target's classifier-free guidance, :class:`~mmspec.guidance.GuidedSession`) and drafts the next
low-res row token by token on that cache. Token u of image b is drawn with noise keyed by
(seed_b + 2_000_029 + 7919 * t0, u), so an image never depends on its batch neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmspec.config import SamplingParams
from mmspec.drafters.base import Draft, Drafter, StepOutcome
from mmspec.errors import MMSpecError
from mmspec.guidance import Guidance, open_session
from mmspec.rng import RowRandom
from mmspec.sampling import logits_to_probs

from .mulo import draw_keyed
from .tokenizer import VQTokenizer


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 3, h, w] in [-1, 1] -> [B, 3, size, size] (bicubic, antialiased when shrinking)."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class MultiScaleDrafter(Drafter):
    """Drafts r high-res rows per step with ``low_model`` at 1/r resolution."""

    def __init__(self, low_model: torch.nn.Module, tokenizer: VQTokenizer, scale: int):
        hi_grid = tokenizer.grid_size[0]
        lo_grid = low_model.config.grid_size
        if scale < 2 or hi_grid != lo_grid * scale:
            raise MMSpecError(f"scale {scale}: the low-res model's grid {lo_grid} x {scale} must equal the "
                              f"tokenizer's grid {hi_grid}")
        if low_model.config.codebook_size != tokenizer.vocab_size:
            raise MMSpecError("the low-res model and the tokenizer must share the codebook")
        # resolution changes re-encode with one nearest-code pass (a proposal: the target verifies it)
        self.low = low_model
        self.hi_tok = VQTokenizer(tokenizer.vq_model, tokenizer.image_size)
        self.lo_tok = VQTokenizer(tokenizer.vq_model, tokenizer.image_size // scale)
        self.scale, self.hi_grid, self.lo_grid = scale, hi_grid, lo_grid
        self.vocab_size = low_model.config.codebook_size
        self.num_calls = 0

    def check_compatible(self, target: torch.nn.Module) -> None:
        from .ar_drafter import check_image_drafter

        check_image_drafter(target, self.low)

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

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: SamplingParams,
              rng: RowRandom, guidance: Guidance | None = None, **model_inputs: Any) -> None:
        self.sampling, self.rng = sampling, rng
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask
        self.guidance = None if guidance is None else Guidance(
            uncond=guidance.uncond, scale=guidance.scale, schedule=guidance.schedule, num_tokens=self.lo_grid ** 2)
        self.committed = [[] for _ in range(input_ids.shape[0])]

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        W, r, n_lo = self.hi_grid, self.scale, self.lo_grid
        batch = len(self.committed)
        device = self.prompt_ids.device
        t0 = len(self.committed[0])
        if any(len(c) != t0 for c in self.committed) or t0 % (r * W):
            raise MMSpecError(f"the multi-scale drafter drafts {r} whole rows per step (t0={t0})")
        m = min(r * W, W * W - t0)
        lo_start = (t0 // (r * W)) * n_lo
        lo = torch.zeros((batch, n_lo * n_lo), dtype=torch.long)
        if t0:
            for b in range(batch):  # one image at a time: batched convolutions round differently
                hi = torch.zeros(W * W, dtype=torch.long)
                hi[:t0] = torch.tensor(self.committed[b])
                lo[b] = self.downsample(hi.view(W, W)).flatten()
        session = open_session(self.low, self.prompt_ids, self.prompt_mask, guidance=self.guidance)
        feed = torch.cat([self.prompt_ids[:, -1:], lo[:, :lo_start].to(device)], dim=1)
        logits = session.extend(feed, num_logits=1)[:, -1]  # [B, V]: predicts low-res token lo_start
        seeds = [int(s) + 2_000_029 + 7919 * t0 for s in self.rng.seeds.tolist()]
        for u in range(lo_start, lo_start + n_lo):  # draft one low-res row
            probs = logits_to_probs(logits, self.sampling)
            toks = torch.tensor([draw_keyed(probs[b], self.sampling, seeds[b], u) for b in range(batch)])
            lo[:, u] = toks
            if u < lo_start + n_lo - 1:
                logits = session.extend(toks.unsqueeze(1).to(device))[:, -1]
        self.num_calls += session.calls
        up = torch.stack([self.upsample(lo[b].view(n_lo, n_lo)).flatten() for b in range(batch)])
        block = up[:, t0:t0 + m].to(device)
        return Draft(tokens=block, probs=None, num_draft=torch.full((batch,), m, dtype=torch.long, device=device))

    def observe(self, outcome: StepOutcome) -> None:
        for c, new in zip(self.committed, outcome.committed):
            c.extend(new)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.committed = [self.committed[i] for i in rows.tolist()]
        self.prompt_ids, self.prompt_mask = self.prompt_ids[rows], self.prompt_mask[rows]
        if self.guidance is not None:
            self.guidance = Guidance(uncond=[self.guidance.uncond[i] for i in rows.tolist()], scale=self.guidance.scale,
                                     schedule=self.guidance.schedule, num_tokens=self.guidance.num_tokens)
