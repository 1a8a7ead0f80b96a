"""``mmspec.image_gen.generate``: images from class ids or prompts, AR or speculative.

Glossary:
    method   "ar" (plain AR, the baseline), "exact" (a smaller AR drafter, lossless rejection
             sampling), "sjd" (Speculative Jacobi Decoding: self-drafting, lossless, no drafter),
             "lantern" / "lantern++" (the AR drafter with LANTERN's relaxed latent-neighbour acceptance,
             budget ``lantern_delta`` or ``lantern_lambda``; not lossless), "mulo" (MuLo-SD: a
             lower-resolution AR drafter drafts whole rows, per-token pooled test ``mulo_tau``,
             local resampling of rejected neighbourhoods of radius ``mulo_l``; not lossless; one image at
             a time, cache-free reference implementation)
    neighbours  the codebook's latent-neighbour table long [V, k] (``build_latent_neighbours``); built
             from ``tokenizer.codebook`` with ``lantern_k`` neighbours when not given
    rule     acceptance rule override (greedy at temperature 0, exact otherwise); relaxed rules
             plug in here
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.adaptive import DraftLengthPolicy
from mmspec.errors import InvalidDraftLengthError, MMSpecError
from mmspec.verify.chain import default_rule
from mmspec.verify.rule import AcceptRule

from .ar_drafter import ARDrafter
from .drafting import GuidanceSpec, ImageDrafter
from .engine import ImageGenerationStats, decode_image_tokens
from .model import ARImageModel, ConditionError
from .sjd import JacobiDrafter

METHODS = ("ar", "exact", "sjd", "lantern", "lantern++", "mulo")
RELAXED_METHODS = ("lantern", "lantern++")


class MethodError(MMSpecError):
    """Unknown method or a method missing what it needs (e.g. 'exact' without a drafter)."""


@dataclass(frozen=True)
class ImageGenerationOutput:
    images: list | None  # PIL images (None when no tokenizer was given)
    tokens: torch.Tensor  # long [B, H, W]
    stats: ImageGenerationStats
    conditions: list  # per image: its class id or prompt


def _conditions(condition: Any, num_images: int) -> list:
    conds = list(condition) if isinstance(condition, (list, tuple)) else [condition]
    if not conds:
        raise ConditionError("no condition given")
    if not isinstance(num_images, int) or num_images < 1:
        raise MMSpecError(f"num_images must be an int >= 1, got {num_images!r}")
    return [c for c in conds for _ in range(num_images)]


def _validate(target: ARImageModel, condition: Any, num_images: int, cfg_scale: float, cfg_schedule: str) -> list:
    """Named errors for bad CFG settings or conditions; returns the per-image conditions."""
    if not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
        raise MMSpecError(f"cfg_scale must be a number >= 0, got {cfg_scale!r}")
    if cfg_schedule not in ("constant", "linear"):
        raise MMSpecError(f"unknown cfg schedule {cfg_schedule!r}; expected 'constant' or 'linear'")
    conds = _conditions(condition, num_images)
    for c in conds:
        target.prefix_ids(c)  # raises ConditionError for an unknown class, empty prompt, unknown word
    return conds


def make_drafter(method: str, target: ARImageModel, drafter: Any, num_draft_tokens) -> ImageDrafter | None:
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "ar":
        return None
    if method in RELAXED_METHODS:
        method = "exact"
    if method == "sjd":
        window = num_draft_tokens if isinstance(num_draft_tokens, int) else 16
        return JacobiDrafter(window=window, vocab_size=target.config.codebook_size)
    if drafter is None:
        raise MethodError("method 'exact' needs a drafter model (a smaller AR image model)")
    d = drafter if isinstance(drafter, ImageDrafter) else ARDrafter(drafter, num_draft_tokens)
    if hasattr(d, "check_compatible"):
        d.check_compatible(target)
    return d


def generate_stream(target: ARImageModel, *, condition: Any, drafter: Any = None, method: str = "exact",
                    cfg_scale: float = 4.0, cfg_schedule: str = "constant",
                    num_draft_tokens: int | DraftLengthPolicy = 4, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                    num_images: int = 1, rule: AcceptRule | None = None, neighbours: torch.Tensor | None = None,
                    lantern_delta: float = 0.1, lantern_lambda: float = 2.0) -> tuple[list, Callable[[], Any]]:
    """Validate and return (conditions, a zero-argument function giving the event iterator)."""
    if isinstance(num_draft_tokens, int) and (isinstance(num_draft_tokens, bool) or num_draft_tokens < 1):
        raise InvalidDraftLengthError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    conds = _validate(target, condition, num_images, cfg_scale, cfg_schedule)
    cond_ids = [target.prefix_ids(c) for c in conds]
    use_cfg = float(cfg_scale) != 1.0
    uncond_ids = [target.prefix_ids(c, unconditional=True) for c in conds] if use_cfg else None
    guidance = GuidanceSpec(cond=cond_ids, uncond=uncond_ids, cfg_scale=float(cfg_scale), schedule=cfg_schedule,
                            num_tokens=target.config.num_image_tokens)
    d = make_drafter(method, target, drafter, num_draft_tokens)
    if method in RELAXED_METHODS and rule is None:
        from mmspec.verify.latent_neighbour import LatentNeighbourRule

        if neighbours is None:
            raise MethodError(f"method {method!r} needs the codebook's neighbour table (pass neighbours= or a tokenizer)")
        rule = (LatentNeighbourRule(neighbours, lantern_delta) if method == "lantern"
                else LatentNeighbourRule(neighbours, lam=lantern_lambda))
    rule = rule if rule is not None else default_rule(sampling)

    def events() -> Any:
        return decode_image_tokens(target, guidance, drafter=d, rule=rule, sampling=sampling,
                                   generator=generator, grid=target.config.grid_size)

    return conds, events


def _generate_mulo(target, tokenizer, conds, drafter, *, cfg_scale, cfg_schedule, sampling, generator,
                   neighbours, mulo_tau, mulo_l, mulo_k, mulo_scale=None):
    import time

    from mmspec.verify.pooled_threshold import PooledThresholdRule

    from .engine import ImageGenerationStats
    from .mulo import GuidedContext, decode_mulo
    from .multiscale import MultiScaleDrafter
    from .neighbours import build_latent_neighbours

    if tokenizer is None or drafter is None:
        raise MethodError("method 'mulo' needs a tokenizer and a low-resolution drafter model")
    grid, lo_grid = target.config.grid_size, drafter.config.grid_size
    if grid % lo_grid or grid // lo_grid < 2:
        raise MethodError(f"method 'mulo' needs a drafter grid dividing the target grid by >= 2 ({lo_grid} vs {grid})")
    scale = grid // lo_grid
    if mulo_scale is not None and mulo_scale != scale:
        raise MethodError(f"mulo_scale={mulo_scale} but the drafter's grid {lo_grid} is 1/{scale} of the target's {grid}")
    table = neighbours if neighbours is not None else build_latent_neighbours(tokenizer.codebook, mulo_k)
    rule = PooledThresholdRule(table, mulo_tau)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    stats = ImageGenerationStats(images=len(conds))
    maps, out = [], []
    t_start = time.perf_counter()
    for i, c in enumerate(conds):
        use_cfg = float(cfg_scale) != 1.0
        ctx = GuidedContext(target, target.prefix_ids(c), target.prefix_ids(c, unconditional=True) if use_cfg else None,
                            float(cfg_scale), cfg_schedule)
        low = GuidedContext(drafter, drafter.prefix_ids(c), drafter.prefix_ids(c, unconditional=True) if use_cfg else None,
                            float(cfg_scale), cfg_schedule)
        tokens, st = decode_mulo(ctx, MultiScaleDrafter(low, tokenizer, scale, sampling, seed + i), rule, grid=grid,
                                 rows_per_step=scale, l=mulo_l, sampling=sampling, seed=seed + i)
        out.append(tokens)
        maps.append(st.kept_map.float())
        stats.steps += st.target_forwards
        stats.row_steps += st.target_forwards
        stats.target_forwards += st.target_forwards
        stats.drafted_tokens += st.drafted
        stats.accepted_tokens += st.drafted - st.resampled
        stats.emitted_tokens += grid * grid
    stats.total_time = time.perf_counter() - t_start
    stats.target_calls = stats.target_forwards
    stats.accepted_map = torch.stack(maps).mean(dim=0)
    stats.extra.update(mulo_tau=mulo_tau, mulo_l=mulo_l, mulo_k=table.shape[1], scale=scale)
    return torch.stack(out), stats


def generate(target: ARImageModel, tokenizer: Any = None, *, condition: Any, drafter: Any = None,
             method: str = "exact", cfg_scale: float = 4.0, cfg_schedule: str = "constant",
             num_draft_tokens: int | DraftLengthPolicy = 4, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, num_images: int = 1,
             rule: AcceptRule | None = None, neighbours: torch.Tensor | None = None, lantern_k: int = 8,
             lantern_delta: float = 0.1, lantern_lambda: float = 2.0, mulo_tau: float = 0.3, mulo_l: int = 1,
             mulo_k: int = 8, mulo_scale: int | None = None, progress: bool = False) -> ImageGenerationOutput:
    """Generate images (VQ token grids) from class ids or prompts.

    Args:
        target: the AR image model.
        tokenizer: an :class:`ImageTokenizer` to decode tokens to PIL images (optional).
        condition: a class id / prompt, or a list of them; each is generated ``num_images`` times.
        method: "ar", "exact" (needs ``drafter``) or "sjd".
        cfg_scale: classifier-free guidance scale (1 disables CFG), ``cfg_schedule`` "constant"/"linear".
        num_draft_tokens: drafted tokens per step (the SJD window for "sjd").
        temperature, top_k, top_p: sampling as HF's warpers; temperature 0 is greedy.
        neighbours, lantern_k, lantern_delta, lantern_lambda: for "lantern" / "lantern++" (the table is
            built from ``tokenizer.codebook`` with ``lantern_k`` neighbours when not given).
        mulo_tau, mulo_l, mulo_k, mulo_scale: for "mulo" (pooled threshold, neighbourhood radius, neighbours
            per code, resolution ratio; the ratio is the target's grid over the drafter's and is only checked).
    """
    if method == "mulo":
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        conds = _validate(target, condition, num_images, cfg_scale, cfg_schedule)
        tokens, stats = _generate_mulo(target, tokenizer, conds, drafter, cfg_scale=cfg_scale,
                                       cfg_schedule=cfg_schedule, sampling=sampling, generator=generator,
                                       neighbours=neighbours, mulo_tau=mulo_tau, mulo_l=mulo_l, mulo_k=mulo_k,
                                       mulo_scale=mulo_scale)
        images = tokenizer.decode(tokens) if tokenizer is not None else None
        return ImageGenerationOutput(images=images, tokens=tokens, stats=stats, conditions=conds)
    if method in RELAXED_METHODS and neighbours is None and rule is None:
        if tokenizer is None:
            raise MethodError(f"method {method!r} needs neighbours= or a tokenizer with a codebook")
        from .neighbours import build_latent_neighbours

        neighbours = build_latent_neighbours(tokenizer.codebook, lantern_k)
    conds, events = generate_stream(target, condition=condition, drafter=drafter, method=method,
                                    cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                    num_draft_tokens=num_draft_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=generator, num_images=num_images, rule=rule,
                                    neighbours=neighbours, lantern_delta=lantern_delta,
                                    lantern_lambda=lantern_lambda)
    grid = target.config.grid_size
    rows: list[list[int]] = [[] for _ in conds]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(conds) * grid * grid, desc=f"{method} image tokens", unit="tok")
    stats = None
    for ev in events():
        stats = ev.stats
        for r, toks in zip(ev.rows, ev.tokens):
            rows[r].extend(toks)
        if bar is not None:
            bar.update(sum(len(t) for t in ev.tokens))
    if bar is not None:
        bar.close()
    tokens = torch.tensor(rows, dtype=torch.long).view(len(conds), grid, grid)
    images = tokenizer.decode(tokens) if tokenizer is not None else None
    return ImageGenerationOutput(images=images, tokens=tokens, stats=stats, conditions=conds)
