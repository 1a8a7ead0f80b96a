"""``mmspec.image_gen.generate`` / ``generate_stream``: images from class ids or prompts, AR or speculative.

Glossary:
    method      a name in :data:`~mmspec.image_gen.methods.METHODS` ("ar", "exact", "sjd", "gsd", "lantern",
                "lantern++", "mulo"); the registry declares each method's parameters, their defaults
                and checks, and which drafter it needs; a parameter the method does not use is a
                :class:`~mmspec.errors.MethodParameterError`
    prefix      per image, the condition's ids (class token, or prompt words + BOI); prompts of
                different lengths are left padded; with CFG (``cfg_scale != 1``) the unconditional
                prefixes form the other half of :class:`~mmspec.guidance.GuidedSession`
    events      :func:`generate_stream` yields the one loop's :class:`~mmspec.engine.StepEvent`s
                (rows = images); :func:`generate` consumes them
    row seeds   ``seed=[s_0, ...]`` (one per image) makes image i depend only on its condition and
                s_i, never on the other images of the call or their order

Every method runs on the one decoding loop (:func:`mmspec.engine.decode`) with the target in a
cached CFG session: "ar" with no drafter, "exact" / "lantern" / "lantern++" with the AR model
drafter (:class:`~mmspec.image_gen.ar_drafter.ARDrafter`), or an EAGLE feature head over the target's
hidden states (``drafter=Eagle3Head``: :class:`~mmspec.drafters.feature.FeatureDrafter`, guided), and
their rule, "sjd" (exact rule) and "gsd" (grouped rule) with the Jacobi
drafter that reads the target's logits, "mulo" with the multi-scale drafter, the pooled-threshold
rule and local island resampling as the loop's repair step (:mod:`mmspec.image_gen.mulo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from mmspec.cache import right_align
from mmspec.config import SamplingParams
from mmspec.drafters.base import Drafter
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.model import ModelDrafter
from mmspec.engine import StepEvent
from mmspec.engine import generate_stream as decode_stream
from mmspec.errors import MethodParameterError, MMSpecError
from mmspec.guidance import Guidance, check_guidance_scale
from mmspec.heads.eagle3 import Eagle3Head
from mmspec.rng import RowRandom
from mmspec.verify.chain import default_rule
from mmspec.verify.grouped import GroupedRule
from mmspec.verify.latent_neighbour import LatentNeighbourRule
from mmspec.verify.pooled_threshold import PooledThresholdRule
from mmspec.verify.rule import AcceptRule

from .ar_drafter import ARDrafter
from .methods import METHODS, ImageMethod, MethodError, get_method
from .model import ARImageModel, ConditionError
from .mulo import LocalResampling
from .multiscale import MultiScaleDrafter
from .neighbours import build_latent_neighbours
from .sjd import JacobiDrafter
from .stats import AcceptanceMap, ImageGenerationStats

RELAXED_METHODS = ("lantern", "lantern++")


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
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise MMSpecError(f"num_images must be an int >= 1, got {num_images!r}")
    return [c for c in conds for _ in range(num_images)]


def _validate(target: ARImageModel, condition: Any, num_images: int, cfg_scale: float, cfg_schedule: str) -> list:
    """Named errors for bad CFG settings or conditions; returns the per-image conditions."""
    check_guidance_scale(cfg_scale)
    if cfg_schedule not in ("constant", "linear"):
        raise MMSpecError(f"unknown cfg schedule {cfg_schedule!r}; expected 'constant' or 'linear'")
    conds = _conditions(condition, num_images)
    for c in conds:
        target.prefix_ids(c)  # raises ConditionError for an unknown class, empty prompt, unknown word
    return conds


def _neighbour_table(method: ImageMethod, params: dict, tokenizer: Any, k_name: str) -> torch.Tensor:
    if params.get("neighbours") is not None:
        return params["neighbours"]
    if tokenizer is None:
        raise MethodError(f"method {method.name!r} needs neighbours= or a tokenizer with a codebook")
    return build_latent_neighbours(tokenizer.codebook, params[k_name])


def make_drafter(method: ImageMethod, target: ARImageModel, params: dict) -> Drafter | None:
    """The method's drafter on the one loop (None: plain AR)."""
    if method.name == "ar":
        return None
    if method.name in ("sjd", "gsd"):
        return JacobiDrafter(window=params["num_draft_tokens"], vocab_size=target.config.codebook_size)
    d = params["drafter"]
    if isinstance(d, Eagle3Head):  # a feature head over the target's hidden states (EAGLE on LlamaGen)
        d = FeatureDrafter(d, params["num_draft_tokens"])
    elif not isinstance(d, Drafter):
        d = ARDrafter(d, params["num_draft_tokens"])
    elif isinstance(d, ModelDrafter):
        d.set_default_length(params["num_draft_tokens"])
    d.check_compatible(target)
    return d


def make_rule(method: ImageMethod, params: dict, sampling: SamplingParams, tokenizer: Any) -> AcceptRule:
    if method.name in RELAXED_METHODS:
        table = _neighbour_table(method, params, tokenizer, "lantern_k")
        if method.name == "lantern":
            return LatentNeighbourRule(table, params["lantern_delta"])
        return LatentNeighbourRule(table, lam=params["lantern_lambda"])
    if method.name == "gsd":
        return GroupedRule(_neighbour_table(method, params, tokenizer, "gsd_k"), params["gsd_window"], params["gsd_p"])
    rule = params.get("rule")
    return rule if rule is not None else default_rule(sampling)


def generate_stream(target: ARImageModel, tokenizer: Any = None, *, condition: Any, method: str = "exact",
                    drafter: Any = None, num_draft_tokens: Any = None, rule: AcceptRule | None = None,
                    neighbours: torch.Tensor | None = None, lantern_k: int | None = None,
                    lantern_delta: float | None = None, lantern_lambda: float | None = None,
                    mulo_tau: float | None = None, mulo_delta: float | None = None, mulo_l: int | None = None,
                    mulo_redraw: str | None = None, mulo_k: int | None = None, mulo_scale: int | None = None,
                    mulo_resampler: Any = None, gsd_k: int | None = None, gsd_window: int | None = None,
                    gsd_p: float | None = None, cfg_scale: float = 4.0,
                    cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None, seed: int | list[int] | None = None,
                    num_images: int = 1, stats: ImageGenerationStats | None = None) -> Iterator[StepEvent]:
    """Image tokens as a stream of :class:`~mmspec.engine.StepEvent` (rows = images, in the order of
    ``condition`` repeated ``num_images`` times); arguments as :func:`generate`. Every input is
    validated before this returns; ``stats`` (optional) is filled as the stream runs, its
    ``accepted_map`` at the end."""
    m = get_method(method)
    params = m.resolve(dict(drafter=drafter, num_draft_tokens=num_draft_tokens, rule=rule, neighbours=neighbours,
                            lantern_k=lantern_k, lantern_delta=lantern_delta, lantern_lambda=lantern_lambda,
                            mulo_tau=mulo_tau, mulo_delta=mulo_delta, mulo_l=mulo_l, mulo_redraw=mulo_redraw,
                            mulo_k=mulo_k, mulo_scale=mulo_scale, mulo_resampler=mulo_resampler, gsd_k=gsd_k,
                            gsd_window=gsd_window, gsd_p=gsd_p))
    if mulo_tau is not None and mulo_delta is not None:
        raise MethodParameterError("give mulo_delta (the bounded test) or mulo_tau (the paper's threshold test), "
                                   "not both")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    conds = _validate(target, condition, num_images, cfg_scale, cfg_schedule)
    rng = RowRandom.from_seed(seed, len(conds), generator)
    stats = stats if stats is not None else ImageGenerationStats()
    stats.images = len(conds)
    repair = None
    if m.name == "mulo":
        d, r, repair = make_mulo(target, tokenizer, params, sampling)
        stats.extra.update(mulo_tau=params["mulo_tau"], mulo_delta=None if params["mulo_tau"] is not None else
                           params["mulo_delta"], mulo_l=params["mulo_l"], mulo_redraw=params["mulo_redraw"],
                           mulo_k=r.neighbours.shape[1],
                           scale=d.scale)
    else:
        d = make_drafter(m, target, params)
        r = make_rule(m, params, sampling, tokenizer)
    device = target.device
    ids, mask = right_align([target.prefix_ids(c) for c in conds], device)
    guidance = None
    if float(cfg_scale) != 1.0:
        guidance = Guidance(uncond=[target.prefix_ids(c, unconditional=True) for c in conds],
                            scale=float(cfg_scale), schedule=cfg_schedule, num_tokens=target.config.num_image_tokens)
    events = decode_stream(target, ids, attention_mask=mask, drafter=d, max_new_tokens=target.config.num_image_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, num_draft_tokens=None, seed=rng.seeds,
                           eos_token_id=[], rule=r, guidance=guidance, stats=stats, repair=repair)
    return _with_map(events, stats, len(conds), target.config.grid_size)


def make_mulo(target: ARImageModel, tokenizer: Any, params: dict, sampling: SamplingParams):
    """MuLo-SD on the one loop: (multi-scale drafter, pooled-threshold rule, local-resampling repair)."""
    low = params["drafter"]
    if tokenizer is None:
        raise MethodError("method 'mulo' needs a tokenizer (the drafts are up-sampled through pixels)")
    grid, lo_grid = target.config.grid_size, low.config.grid_size
    if grid % lo_grid or grid // lo_grid < 2:
        raise MethodError(f"method 'mulo' needs a drafter grid dividing the target grid by >= 2 ({lo_grid} vs {grid})")
    scale = grid // lo_grid
    if params["mulo_scale"] is not None and params["mulo_scale"] != scale:
        raise MethodError(f"mulo_scale={params['mulo_scale']} but the drafter's grid {lo_grid} is 1/{scale} of "
                          f"the target's {grid}")
    table = _neighbour_table(get_method("mulo"), params, tokenizer, "mulo_k")
    rule = (PooledThresholdRule(table, params["mulo_tau"]) if params["mulo_tau"] is not None
            else LatentNeighbourRule(table, params["mulo_delta"]))
    drafter = MultiScaleDrafter(low, tokenizer, scale, params["mulo_resampler"])
    return drafter, rule, LocalResampling(rule, grid, params["mulo_l"], sampling, redraw=params["mulo_redraw"])


def _with_map(events: Iterator[StepEvent], stats: ImageGenerationStats, n: int, grid: int) -> Iterator[StepEvent]:
    amap = AcceptanceMap(n, grid)
    for ev in events:
        amap.add(ev.rows, ev.tokens, ev.num_accepted, ev.kept)
        stats.target_forwards = stats.target_calls
        if all(f >= grid * grid for f in amap.filled):
            stats.accepted_map = amap.mean()
        yield ev


def generate(target: ARImageModel, tokenizer: Any = None, *, condition: Any, method: str = "exact",
             drafter: Any = None, num_draft_tokens: Any = None, rule: AcceptRule | None = None,
             neighbours: torch.Tensor | None = None, lantern_k: int | None = None, lantern_delta: float | None = None,
             lantern_lambda: float | None = None, mulo_tau: float | None = None, mulo_delta: float | None = None,
             mulo_l: int | None = None, mulo_redraw: str | None = None,
             mulo_k: int | None = None, mulo_scale: int | None = None, mulo_resampler: Any = None,
             gsd_k: int | None = None, gsd_window: int | None = None, gsd_p: float | None = None,
             cfg_scale: float = 4.0,
             cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, seed: int | list[int] | None = None,
             num_images: int = 1, progress: bool = False) -> ImageGenerationOutput:
    """Generate images (VQ token grids) from class ids or prompts.

    Args:
        target: the AR image model.
        tokenizer: an :class:`ImageTokenizer` to decode tokens to PIL images (optional; "mulo" needs it,
            "lantern" / "lantern++" build their neighbour table from its codebook unless ``neighbours`` is given).
        condition: a class id / prompt, or a list of them; each is generated ``num_images`` times.
        method: a name in :data:`mmspec.image_gen.METHODS`; its parameters (``drafter``, ``num_draft_tokens``,
            ``rule``, ``neighbours``, ``lantern_*``, ``mulo_*``) are declared there; leaving one unset takes the
            method's default, setting one the method does not use raises :class:`MethodParameterError`.
        cfg_scale: classifier-free guidance scale (finite, >= 0; 1 disables CFG), ``cfg_schedule``
            "constant"/"linear".
        temperature, top_k, top_p: sampling as HF's warpers; temperature 0 is greedy.
        seed: one int per image (image i then depends only on its condition and seed i), or one int;
            else row seeds are drawn from ``generator``.
        progress: a progress bar over image tokens.
    """
    stats = ImageGenerationStats()
    events = generate_stream(target, tokenizer, condition=condition, method=method, drafter=drafter,
                             num_draft_tokens=num_draft_tokens, rule=rule, neighbours=neighbours, lantern_k=lantern_k,
                             lantern_delta=lantern_delta, lantern_lambda=lantern_lambda, mulo_tau=mulo_tau,
                             mulo_delta=mulo_delta, mulo_redraw=mulo_redraw,
                             mulo_l=mulo_l, mulo_k=mulo_k, mulo_scale=mulo_scale, mulo_resampler=mulo_resampler,
                             gsd_k=gsd_k, gsd_window=gsd_window, gsd_p=gsd_p, cfg_scale=cfg_scale,
                             cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator, seed=seed, num_images=num_images, stats=stats)
    conds = _conditions(condition, num_images)
    grid = target.config.grid_size
    rows: list[list[int]] = [[] for _ in conds]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(conds) * grid * grid, desc=f"{method} image tokens", unit="tok")
    for ev in events:
        for r, toks in zip(ev.rows, ev.tokens):
            rows[r].extend(toks)
        if bar is not None:
            bar.update(sum(len(t) for t in ev.tokens))
    if bar is not None:
        bar.close()
    tokens = torch.tensor(rows, dtype=torch.long).view(len(conds), grid, grid)
    images = tokenizer.decode(tokens) if tokenizer is not None else None
    return ImageGenerationOutput(images=images, tokens=tokens, stats=stats, conditions=conds)


__all__ = ["ImageGenerationOutput", "METHODS", "MethodError", "generate", "generate_stream"]
