"""MuLo-SD's multi-scale drafter: a low-resolution AR model drafts whole rows for the high-resolution target.

Paper: Peruzzo, Sautière, Habibian, "Multi-Scale Local Speculative Decoding for Image Generation"
(CVPR 2026); notes in ``docs/design/mulo_sd.md``.

Glossary:
    scale r      high-res grid side / low-res grid side (2 or 4); the same VQ codebook serves both
                 resolutions (one convolutional tokenizer at two image sizes)
    resampler    the resolution changes U_r / D_r (:mod:`mmspec.image_gen.token_resampler`): the learned
                 token-space nets, or decode -> resize -> re-encode (:class:`PixelResampler`, the default
                 when none is given)
    down-sample  low-res row i of the drafter's prefix = row i of D_r(committed high-res rows < r(i+1),
                 zero tokens below), derived once, when those rows are committed, and kept in the
                 drafter's cache from then on
    up-sample    U_r([prefix rows, the drafted row, zero tokens below]) -> the block's r high-res rows
    block        one low-res row drafted per step = r high-res rows = r * W candidates

A :class:`~mmspec.drafters.base.Drafter` of the one loop. The low-res model keeps one cached session
(with the target's classifier-free guidance, :class:`~mmspec.guidance.GuidedSession`) for the whole
image: each step feeds the newly derived low-res row in one forward, drafts the next row token by
token and rolls its drafted tokens back. Token u of image b is drawn with noise keyed by
(seed_b + 2_000_029 + 7919 * t0, u), so an image never depends on its batch neighbours.
"""

from __future__ import annotations

from typing import Any

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.base import Draft, Drafter, StepOutcome
from mmspec.errors import MMSpecError
from mmspec.guidance import Guidance, open_session
from mmspec.rng import RowRandom
from mmspec.sampling import logits_to_probs

from .ar_drafter import check_image_drafter
from .mulo import draw_keyed
from .token_resampler import PixelResampler, Resampler, resize_images  # noqa: F401  (resize_images re-exported)
from .tokenizer import VQTokenizer


def low_res_row(resampler: Resampler, committed: torch.Tensor, row: int, grid: int) -> torch.Tensor:
    """Row ``row`` of D_r(high-res grids holding ``committed`` long [B, n] in raster order, zero tokens after):
    long [B, grid / r], the drafter's prefix row once high-res rows < r * (row + 1) are committed (one
    D_r call for the batch; a resampler's result for a grid never depends on its batch)."""
    hi = torch.zeros((committed.shape[0], grid * grid), dtype=torch.long)
    hi[:, : committed.shape[1]] = committed
    return resampler.downsample(hi.view(-1, grid, grid))[:, row]


class MultiScaleDrafter(Drafter):
    """Drafts r high-res rows per step with ``low_model`` at 1/r resolution (see the module glossary)."""

    def __init__(self, low_model: torch.nn.Module, tokenizer: VQTokenizer, scale: int,
                 resampler: Resampler | None = None):
        hi_grid = tokenizer.grid_size[0]
        lo_grid = low_model.config.grid_size
        if scale < 2 or hi_grid != lo_grid * scale:
            raise MMSpecError(f"scale {scale}: the low-res model's grid {lo_grid} x {scale} must equal the "
                              f"tokenizer's grid {hi_grid}")
        if low_model.config.codebook_size != tokenizer.vocab_size:
            raise MMSpecError("the low-res model and the tokenizer must share the codebook")
        resampler = PixelResampler(tokenizer, scale) if resampler is None else resampler
        if not isinstance(resampler, Resampler) or resampler.scale != scale:
            raise MMSpecError(f"resampler must be a Resampler of scale {scale}, got {resampler!r:.80}")
        self.low, self.resampler = low_model, resampler
        self.scale, self.hi_grid, self.lo_grid = scale, hi_grid, lo_grid
        self.vocab_size = low_model.config.codebook_size
        self._calls = 0

    @property
    def num_calls(self) -> int:
        return self._calls

    def check_compatible(self, target: torch.nn.Module) -> None:
        check_image_drafter(target, self.low)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: SamplingParams,
              rng: RowRandom, guidance: Guidance | None = None, **model_inputs: Any) -> None:
        self.sampling, self.rng = sampling, rng
        lo_guidance = None if guidance is None else Guidance(
            uncond=guidance.uncond, scale=guidance.scale, schedule=guidance.schedule, num_tokens=self.lo_grid ** 2)
        self.session = open_session(self.low, input_ids, attention_mask, guidance=lo_guidance)
        self.pending = input_ids[:, -1:]  # fed before the next derived row: the last prompt token, at first
        self.lo_rows = 0  # low-res rows in the session
        self.prefix = torch.zeros((input_ids.shape[0], self.lo_grid ** 2), dtype=torch.long)  # derived rows
        self.committed = [[] for _ in range(input_ids.shape[0])]

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        W, r, n_lo = self.hi_grid, self.scale, self.lo_grid
        batch = len(self.committed)
        device = self.pending.device
        t0 = len(self.committed[0])
        if any(len(c) != t0 for c in self.committed) or t0 % (r * W):
            raise MMSpecError(f"the multi-scale drafter drafts {r} whole rows per step (t0={t0})")
        m = min(r * W, W * W - t0)
        row = t0 // (r * W)  # the low-res row drafted now
        calls = self.session.calls
        done = torch.tensor(self.committed, dtype=torch.long).view(batch, t0)  # [B, t0]
        new = [low_res_row(self.resampler, done[:, : (i + 1) * r * W], i, W)
               for i in range(self.lo_rows, row)]  # each long [B, n_lo]
        feed = torch.cat([self.pending, *[t.to(device) for t in new]], dim=1)
        logits = self.session.extend(feed, num_logits=1)[:, -1]  # [B, V]: predicts low-res token row * n_lo
        for i, t in enumerate(new):
            self.prefix[:, (self.lo_rows + i) * n_lo:(self.lo_rows + i + 1) * n_lo] = t
        self.pending, self.lo_rows = feed[:, :0], row
        lo = self.prefix.clone()  # [B, n_lo * n_lo]: derived rows, then the drafted row, then zero tokens
        seeds = [int(s) + 2_000_029 + 7919 * t0 for s in self.rng.seeds.tolist()]
        for u in range(row * n_lo, (row + 1) * n_lo):  # draft one low-res row
            probs = logits_to_probs(logits, self.sampling)
            toks = torch.tensor([draw_keyed(probs[b], self.sampling, seeds[b], u) for b in range(batch)])
            lo[:, u] = toks
            if u < (row + 1) * n_lo - 1:
                logits = self.session.extend(toks.unsqueeze(1).to(device))[:, -1]
        self.session.rollback(torch.full((batch,), n_lo - 1, dtype=torch.long, device=device))
        self._calls += self.session.calls - calls
        up = self.resampler.upsample(lo.view(batch, n_lo, n_lo)).flatten(1)
        block = up[:, t0:t0 + m].to(device)
        return Draft(tokens=block, probs=None, num_draft=torch.full((batch,), m, dtype=torch.long, device=device))

    def observe(self, outcome: StepOutcome) -> None:
        for c, new in zip(self.committed, outcome.committed):
            c.extend(new)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.committed = [self.committed[i] for i in rows.tolist()]
        self.session.select_rows(rows.to(self.pending.device))
        self.pending = self.pending[rows]
        self.prefix = self.prefix[rows.cpu()]
