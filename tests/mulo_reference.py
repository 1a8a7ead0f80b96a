"""Test oracle: the cache-free MuLo-SD reference loop (full forwards with attention holes).

The library runs MuLo-SD on the one cached decoding loop (:class:`mmspec.image_gen.mulo.LocalResampling`
as the repair step, :class:`mmspec.image_gen.multiscale.MultiScaleDrafter` as the drafter); this
module keeps the earlier cache-free implementation so tests can check that the cached loop gives
the reference's tokens for the same seed.

MuLo-SD local rejection and island resampling (the verification side of multi-scale local SD).

Paper: Peruzzo, Sautière, Habibian, "Multi-Scale Local Speculative Decoding for Image Generation"
(CVPR 2026); our reading of it is in ``docs/design/mulo_sd.md``.

Glossary:
    block       the candidate tokens of the rows being verified, raster positions [t0, t0 + m)
    accept      per token, independently: the target's mass on the token's latent neighbourhood
                >= tau (:class:`~mmspec.verify.PooledThresholdRule`), one target pass for the block
    resample    the union of the rejected tokens' neighbourhoods N(t, l) (u >= t0); every other
                candidate is kept
    island      an 8-connected component of the resample set, redrawn in raster order; each token
                sees the prefix, the block's kept candidates before it (as the verification forward
                computed them) and its island's earlier tokens, never another island's positions
    keyed noise the exponential-race noise of position u depends only on (seed, u), so resampling
                islands together or one by one gives the same tokens

"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.config import SamplingParams
from mmspec.image_gen.mulo import draw_keyed  # the keyed draw is the shared contract
from mmspec.sampling import logits_to_probs

from mmspec.image_gen.locality import expand_rejections, rejection_islands
from mmspec.image_gen.model import ARImageModel, guidance_scale, guide


@dataclass(frozen=True)
class GuidedContext:
    """The image's condition for cache-free guided forwards."""

    model: ARImageModel
    cond: list[int]  # prefix ids of the condition
    uncond: list[int] | None  # unconditional prefix (None: CFG off)
    cfg_scale: float = 1.0
    schedule: str = "constant"


@torch.no_grad()
def guided_logits(ctx: GuidedContext, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Guided next-token logits for R candidate grids at once.

    tokens long [R, N] (raster image tokens), visible bool [R, N] (hidden tokens are attention holes
    but keep their positions). Returns float [R, N, V]: column j predicts image token j.
    """
    rows, n = tokens.shape
    halves = [ctx.cond] + ([ctx.uncond] if ctx.uncond is not None else [])
    out = []
    for prefix in halves:
        p = len(prefix)
        ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(rows, p), tokens], dim=1)
        mask = torch.cat([torch.ones(rows, p, dtype=torch.long), visible.long()], dim=1)
        pos = torch.arange(p + n).expand(rows, -1)
        logits = ctx.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out.append(logits[:, p - 1: p - 1 + n].float())
    if ctx.uncond is None:
        return out[0]
    # the two prefixes may differ in length; both were sliced to the image columns above
    scale = guidance_scale(ctx.cfg_scale, ctx.schedule, torch.arange(n), n).view(1, n, 1)
    return guide(out[0], out[1], scale)


@dataclass(frozen=True)
class LocalResampleResult:
    tokens: torch.Tensor  # long [H, W]: the block after local resampling (earlier tokens unchanged)
    resampled: torch.Tensor  # bool [H, W]: union of N(t, l) over rejected tokens, u >= t0
    islands: torch.Tensor  # long [H, W]: island label, -1 elsewhere
    forwards: int  # serial resampling steps (the largest island: islands are redrawn in parallel)


@torch.no_grad()
def island_query_logits(ctx: GuidedContext, tokens: torch.Tensor, t0: int, e: int, kept: torch.Tensor,
                        drawn: list[tuple[int, int]], u: int) -> torch.Tensor:
    """Guided logits [V] for image token u of an island, from one full forward (no cache).

    tokens long [N]: final tokens before t0, the block's candidates in [t0, e) (as verified, never the
    redrawn values); kept bool [N]: the block's kept candidates; drawn: the island's own tokens drawn so
    far (raster position, token), all < u.
    The sequence is [prefix, tokens[:e]] (causal: every candidate sees every earlier one, as in the
    verification forward), then one slot per drawn token, then (unless the query is already there) a
    copy of token u - 1. A drawn token or the copy sees the prefix, the final tokens, the kept candidates
    before its own position, the island's earlier drawn tokens and itself."""
    halves = [ctx.cond] + ([ctx.uncond] if ctx.uncond is not None else [])
    out = []
    for prefix in halves:
        p = len(prefix)
        ids = list(prefix) + tokens[:e].tolist()
        pos = list(range(p + e))
        seen = [list(range(i + 1)) for i in range(p + e)]  # causal main sequence
        visible_main = list(range(p + t0)) + [p + g for g in range(t0, e) if bool(kept[g])]
        app: list[int] = []
        query = None
        if u == t0:
            query = p + t0 - 1  # the last final token (or the last prefix token): the verification column
        for a, tok in drawn:
            idx = len(ids)
            ids.append(tok)
            pos.append(p + a)
            seen.append([i for i in visible_main if i < p + a] + app + [idx])
            app.append(idx)
        if query is None and drawn and drawn[-1][0] == u - 1:
            query = app[-1]
        if query is None:
            idx = len(ids)
            ids.append(int(tokens[u - 1]))
            pos.append(p + u - 1)
            seen.append([i for i in visible_main if i < p + u - 1] + app + [idx])
            query = idx
        t = len(ids)
        allowed = torch.zeros(t, t, dtype=torch.bool)
        for i, cols in enumerate(seen):
            allowed[i, cols] = True
        dtype = next(ctx.model.parameters()).dtype
        mask = torch.zeros(t, t, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        logits = ctx.model(input_ids=torch.tensor([ids]), attention_mask=mask.view(1, 1, t, t),
                           position_ids=torch.tensor([pos]), use_cache=False).logits
        out.append(logits[0, query].float())
    if ctx.uncond is None:
        return out[0]
    n = ctx.model.config.num_image_tokens
    scale = guidance_scale(ctx.cfg_scale, ctx.schedule, torch.tensor([u]), n).view(1)
    return guide(out[0], out[1], scale)


@torch.no_grad()
def resample_islands(ctx: GuidedContext, grid: torch.Tensor, resample: torch.Tensor, t0: int, e: int,
                     sampling: SamplingParams, seed: int) -> LocalResampleResult:
    """Redraw the tokens of ``resample`` (bool [H, W], inside the block [t0, e)) island by island, each
    token from :func:`island_query_logits` (see the module glossary). grid long [H, W] holds the final
    tokens and the block's candidates."""
    h, w = grid.shape
    labels = rejection_islands(resample)
    n_islands = int(labels.max()) + 1 if resample.any() else 0
    flat = grid.flatten().clone()
    lab = labels.flatten()
    kept = ~resample.flatten()
    out = flat.clone()
    steps = 0
    for i in range(n_islands):
        members = torch.nonzero(lab == i).flatten().tolist()  # raster order
        drawn: list[tuple[int, int]] = []
        for u in members:
            probs = logits_to_probs(island_query_logits(ctx, flat, t0, e, kept, drawn, u), sampling)
            tok = draw_keyed(probs, sampling, seed, u)
            out[u] = tok
            drawn.append((u, tok))
        steps = max(steps, len(members))
    return LocalResampleResult(tokens=out.view(h, w), resampled=resample, islands=labels, forwards=steps)


def local_resample_set(rejected: torch.Tensor, l: int, t0: int) -> torch.Tensor:
    """The positions MuLo-SD redraws: ∪ N(t, l) over rejected tokens t, restricted to u >= t0."""
    return expand_rejections(rejected, l, t0)


@dataclass
class MuLoStats:
    steps: int = 0
    verify_forwards: int = 0
    resample_forwards: int = 0
    drafted: int = 0
    accepted: int = 0  # candidates that passed the pooled test
    resampled: int = 0  # tokens redrawn (rejected ones and their neighbourhoods)
    kept_map: torch.Tensor | None = None  # bool [H, W]: drafted tokens kept (not redrawn)

    @property
    def target_forwards(self) -> int:
        return self.verify_forwards + self.resample_forwards


@torch.no_grad()
def decode_mulo(ctx: GuidedContext, propose_block, rule, *, grid: int, rows_per_step: int, l: int,
                sampling: SamplingParams, seed: int) -> tuple[torch.Tensor, MuLoStats]:
    """MuLo-SD decoding of one image (cache-free reference loop).

    ``propose_block(tokens long [t0], t0, m) -> long [m]`` drafts the next ``m = rows_per_step * grid``
    raster tokens (whole rows) given the final tokens so far; ``rule`` judges each candidate
    independently (e.g. :class:`~mmspec.verify.PooledThresholdRule`); the union of the rejected
    tokens' neighbourhoods is redrawn by :func:`resample_islands`. Returns (tokens [grid, grid], stats).
    """
    n = grid * grid
    tokens = torch.zeros(n, dtype=torch.long)
    stats = MuLoStats(kept_map=torch.zeros(grid, grid, dtype=torch.bool))
    t0 = 0
    while t0 < n:
        m = min(rows_per_step * grid, n - t0)
        cand = propose_block(tokens[:t0].clone(), t0, m)
        tokens[t0:t0 + m] = cand
        visible = torch.zeros(n, dtype=torch.bool)
        visible[: t0 + m] = True
        logits = guided_logits(ctx, tokens.unsqueeze(0), visible.unsqueeze(0))[0, t0:t0 + m]  # [m, V]
        probs = logits_to_probs(logits, sampling).unsqueeze(0)  # [1, m, V]
        judged = rule.judge(cand.unsqueeze(0), None, probs, torch.zeros(1, m)).accepted[0]  # [m]
        rejected = torch.zeros(n, dtype=torch.bool)
        rejected[t0:t0 + m] = ~judged
        resample = local_resample_set(rejected.view(grid, grid), l, t0)
        resample.view(-1)[t0 + m:] = False  # only the verified block is redrawn
        result = resample_islands(ctx, tokens.view(grid, grid), resample, t0, t0 + m, sampling, seed)
        tokens = result.tokens.flatten().clone()
        stats.steps += 1
        stats.verify_forwards += 1
        stats.resample_forwards += result.forwards
        stats.drafted += m
        stats.accepted += int(judged.sum())
        stats.resampled += int(resample.sum())
        block = torch.zeros(n, dtype=torch.bool)
        block[t0:t0 + m] = True
        stats.kept_map |= (block.view(grid, grid) & ~resample)
        t0 += m
    return tokens.view(grid, grid), stats


def row_drafter(ctx: GuidedContext, sampling: SamplingParams, seed: int):
    """A same-resolution block drafter from ``ctx.model`` (stand-in for MuLo's low-resolution drafter):
    samples the next tokens autoregressively with keyed noise (key offset so it never equals the
    target's resampling noise)."""

    @torch.no_grad()
    def propose(prefix: torch.Tensor, t0: int, m: int) -> torch.Tensor:
        n = ctx.model.config.num_image_tokens
        toks = torch.zeros(n, dtype=torch.long)
        toks[:t0] = prefix
        for u in range(t0, t0 + m):
            vis = torch.zeros(n, dtype=torch.bool)
            vis[:u] = True
            probs = logits_to_probs(guided_logits(ctx, toks.unsqueeze(0), vis.unsqueeze(0))[0, u], sampling)
            toks[u] = draw_keyed(probs, sampling, seed + 1_000_003, u)
        return toks[t0:t0 + m]

    return propose


# -- the cache-free multi-scale drafter --------------------------------------------------------------

from mmspec.errors import MMSpecError  # noqa: E402
from mmspec.image_gen.multiscale import low_res_row  # noqa: E402
from mmspec.image_gen.token_resampler import PixelResampler  # noqa: E402
from mmspec.image_gen.tokenizer import VQTokenizer  # noqa: E402


class ReferenceMultiScaleDrafter:
    """Drafts r high-res rows per step with ``low_ctx.model`` at 1/r resolution: low-res row i of the
    prefix is row i of D_r(the high-res rows < r(i+1), zero tokens below); the drafted row is up-sampled
    with the derived rows above it and zero tokens below (``resampler``: default decode -> resize -> encode)."""

    def __init__(self, low_ctx: GuidedContext, tokenizer: VQTokenizer, scale: int, sampling: SamplingParams,
                 seed: int = 0, resampler=None):
        hi_grid = tokenizer.grid_size[0]
        lo_grid = low_ctx.model.config.grid_size
        if scale < 2 or hi_grid != lo_grid * scale:
            raise MMSpecError(f"scale {scale}: the low-res model's grid {lo_grid} x {scale} must equal the "
                              f"tokenizer's grid {hi_grid}")
        self.low = low_ctx
        self.resampler = PixelResampler(tokenizer, scale) if resampler is None else resampler
        self.scale, self.sampling, self.seed = scale, sampling, seed
        self.hi_grid, self.lo_grid = hi_grid, lo_grid

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor, t0: int, m: int) -> torch.Tensor:
        """The ``propose_block`` of :func:`~mmspec.image_gen.mulo.decode_mulo`: m = r * W candidates."""
        W, r, n_lo = self.hi_grid, self.scale, self.lo_grid
        if t0 % (r * W) or m != r * W and t0 + m != W * W:
            raise MMSpecError(f"the multi-scale drafter drafts {r} whole rows per step (t0={t0}, m={m})")
        row = t0 // (r * W)
        lo = torch.zeros(n_lo * n_lo, dtype=torch.long)
        for i in range(row):
            lo[i * n_lo:(i + 1) * n_lo] = low_res_row(self.resampler, prefix[None, : (i + 1) * r * W], i, W)[0]
        for u in range(row * n_lo, (row + 1) * n_lo):  # draft one low-res row
            vis = torch.zeros(n_lo * n_lo, dtype=torch.bool)
            vis[:u] = True
            probs = logits_to_probs(guided_logits(self.low, lo.unsqueeze(0), vis.unsqueeze(0))[0, u], self.sampling)
            lo[u] = draw_keyed(probs, self.sampling, self.seed + 2_000_029 + 7919 * t0, u)
        up = self.resampler.upsample(lo.view(1, n_lo, n_lo)).flatten()
        return up[t0:t0 + m]
