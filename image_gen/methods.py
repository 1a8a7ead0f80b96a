"""The image-generation method registry: each method declares its parameters once and validates them once.

Glossary:
    method      a way to produce image tokens: "ar" (plain AR, the baseline), "exact" (a smaller AR
                drafter, lossless rejection sampling), "sjd" (Speculative Jacobi Decoding, lossless,
                no second model), "gsd" (SJD's drafts with GSD's grouped acceptance; not lossless), "lantern" / "lantern++" (the AR drafter with LANTERN's relaxed
                latent-neighbour acceptance; not lossless), "mulo" (MuLo-SD: a low-resolution drafter,
                pooled acceptance and local resampling; not lossless)
    parameter   a method-specific argument of :func:`mmspec.image_gen.generate` (``drafter``,
                ``num_draft_tokens``, ``lantern_delta``, ...). Arguments every method takes (CFG,
                sampling, seeds, number of images) are not listed here. Passing a parameter the
                chosen method does not use is a :class:`~mmspec.errors.MethodParameterError`
    drafter     what ``drafter=`` must be for the method: None (no model), "same" (a smaller AR model
                at the target's resolution) or "lowres" (an AR model at 1/r of the target's grid)

Papers: Leviathan et al. (ICML 2023); Teng et al., SJD (ICLR 2025); So et al., GSD (ICCV 2025); Jang et al., LANTERN (ICLR
2025) and LANTERN++; Peruzzo et al., MuLo-SD (CVPR 2026).

The API, the CLI, the demos, the benchmarks and the main job read :data:`METHODS` (which
parameters a method takes, its defaults, which drafter it needs) instead of keeping their own lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mmspec.drafters.adaptive import DraftLengthPolicy
from mmspec.errors import InvalidDraftLengthError, MethodParameterError, MMSpecError, NonFiniteError

from .token_resampler import Resampler


class MethodError(MMSpecError):
    """Unknown method or a method missing what it needs (e.g. 'exact' without a drafter)."""


# -- value checks -------------------------------------------------------------------------------
def _number(name: str, lo: float, hi: float = math.inf) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MethodParameterError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise NonFiniteError(f"{name} must be finite, got {v!r}")
        if not lo <= v <= hi:
            raise MethodParameterError(f"{name} must be in [{lo}, {hi}], got {v!r}")
        return float(v)
    return check


def _integer(name: str, lo: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise MethodParameterError(f"{name} must be an int >= {lo}, got {v!r}")
        return v
    return check


def _draft_length(v: Any) -> int | DraftLengthPolicy:
    if isinstance(v, DraftLengthPolicy):
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidDraftLengthError(f"num_draft_tokens must be an int >= 1 or a draft-length policy, got {v!r}")
    return v


def _window(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidDraftLengthError(f"num_draft_tokens (the SJD window) must be an int >= 1, got {v!r}")
    return v


def _neighbours(v: Any) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.dtype != torch.long:
        raise MethodParameterError(f"neighbours must be a long tensor [V, k], got {v!r:.80}")
    return v


def _choice(name: str, options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise MethodParameterError(f"{name} must be one of {options}, got {v!r}")
        return v
    return check


def _any(v: Any) -> Any:
    return v


def _resampler(v: Any) -> Any:
    if not isinstance(v, Resampler):
        raise MethodParameterError(f"mulo_resampler must have upsample/downsample and a scale (a Resampler), got {v!r:.80}")
    return v


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str


@dataclass(frozen=True)
class ImageMethod:
    name: str
    summary: str
    lossless: bool
    drafter: str | None  # None, "same" or "lowres"
    params: tuple[Parameter, ...]

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Validated values of every parameter of this method (defaults filled in) from ``given``
        (the method-specific arguments the caller set, None meaning unset). A set argument this method
        does not use is a :class:`MethodParameterError`."""
        unused = sorted(k for k, v in given.items() if v is not None and k not in self.param_names)
        if unused:
            takes = ", ".join(self.param_names) or "no method-specific parameters"
            raise MethodParameterError(
                f"method {self.name!r} does not use {', '.join(unused)} (it takes: {takes})")
        values = {}
        for p in self.params:
            v = given.get(p.name)
            values[p.name] = p.default if v is None else p.check(v)
        if self.drafter is not None and values.get("drafter") is None:
            kind = "a smaller AR image model" if self.drafter == "same" else "a low-resolution AR image model"
            raise MethodError(f"method {self.name!r} needs a drafter model ({kind}) as drafter=")
        return values

    def select(self, available: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``available`` this method takes (for front ends holding every control)."""
        return {k: v for k, v in available.items() if k in self.param_names and v is not None}


_DRAFTER = Parameter("drafter", None, _any, "the drafter model")
_K = Parameter("num_draft_tokens", 4, _draft_length, "drafted tokens per step, or a draft-length policy")
_NEIGHBOURS = Parameter("neighbours", None, _neighbours,
                        "latent-neighbour table long [V, k] (default: built from the tokenizer's codebook)")

METHODS: dict[str, ImageMethod] = {m.name: m for m in (
    ImageMethod("ar", "plain autoregressive sampling (the baseline)", True, None, ()),
    ImageMethod("exact", "a smaller AR drafter, lossless rejection sampling", True, "same", (
        _DRAFTER, _K, Parameter("rule", None, _any, "acceptance rule override (default: greedy / exact)"))),
    ImageMethod("sjd", "Speculative Jacobi Decoding: the target refines its own guesses (lossless)", True, None, (
        Parameter("num_draft_tokens", 16, _window, "the Jacobi window: guesses verified per step"),)),
    ImageMethod("lantern", "LANTERN: relaxed acceptance over latent neighbours, budget delta", False, "same", (
        _DRAFTER, _K, _NEIGHBOURS,
        Parameter("lantern_k", 8, _integer("lantern_k", 1), "latent neighbours per code"),
        Parameter("lantern_delta", 0.1, _number("lantern_delta", 0.0, 1.0), "total-variation budget per position"))),
    ImageMethod("lantern++", "LANTERN++: neighbours pooled up to (lambda - 1) p(x)", False, "same", (
        _DRAFTER, _K, _NEIGHBOURS,
        Parameter("lantern_k", 8, _integer("lantern_k", 1), "latent neighbours per code"),
        Parameter("lantern_lambda", 2.0, _number("lantern_lambda", 1.0), "multiplicative cap lambda >= 1"))),
    ImageMethod("gsd", "GSD: SJD's self-drafts accepted against dynamic groups of latent neighbours", False, None, (
        Parameter("num_draft_tokens", 16, _window, "the Jacobi window: guesses verified per step"),
        _NEIGHBOURS,
        Parameter("gsd_k", 16, _integer("gsd_k", 1), "latent-neighbour candidates per code"),
        Parameter("gsd_window", 7, _integer("gsd_window", 0), "a candidate's target rank within this of the draft's"),
        Parameter("gsd_p", 0.15, _number("gsd_p", 0.0, 1.0),
                  "a candidate's target probability within this of the draft's"))),
    ImageMethod("mulo", "MuLo-SD: low-resolution drafts, bounded neighbour test, local island resampling", False,
                "lowres", (
        _DRAFTER, _NEIGHBOURS,
        Parameter("mulo_k", 8, _integer("mulo_k", 1), "latent neighbours per code"),
        Parameter("mulo_delta", 0.0, _number("mulo_delta", 0.0, 1.0),
                  "total-variation budget per token of the bounded test (0: each token from the target's "
                  "distribution given its context)"),
        Parameter("mulo_tau", None, _number("mulo_tau", 0.0),
                  "the paper's pooled-probability threshold instead of the bounded test (no bound: it moves the "
                  "output distribution; > 1 rejects every draft)"),
        Parameter("mulo_l", 1, _integer("mulo_l", 0), "resampling neighbourhood radius (mulo_redraw 'local')"),
        Parameter("mulo_redraw", "rest", _choice("mulo_redraw", ("local", "rest")),
                  "what a rejection redraws: 'rest' of the block (the chain rule) or the 'local' neighbourhood "
                  "(the paper; keeps tokens verified against replaced drafts)"),
        Parameter("mulo_scale", None, _integer("mulo_scale", 2),
                  "resolution ratio (checked against the drafter's grid)"),
        Parameter("mulo_resampler", None, _resampler,
                  "the resolution changes U_r / D_r (default: decode -> resize -> re-encode)"))),
)}

#: method names, in the order front ends list them
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: Any) -> ImageMethod:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; expected one of {METHOD_NAMES}")
    return METHODS[name]
