"""``mmspec.vision.generate``: lossless VLM speculative decoding with a pruned drafter.

Glossary: ``inputs`` is the target processor's output (``input_ids``, ``attention_mask``,
``pixel_values`` and the family's extras such as ``image_grid_thw``, ``image_sizes``,
``mm_token_type_ids``). The drafter reuses the *same* processor output: a drafter of the same
family shares the processor (image size, patching, chat template), which is what makes its
visual tokens line up with the target's before pruning.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping

import torch

from mmspec.drafters.adaptive import DraftLengthPolicy
from mmspec.drafters.base import Drafter
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.model import ModelDrafter
from mmspec.engine import DEFAULT_NUM_DRAFT_TOKENS, GenerationOutput, StepEvent, generate as generate_text
from mmspec.engine import generate_stream as generate_text_stream
from mmspec.errors import MMSpecError, NonFiniteError, ShapeError
from mmspec.heads.eagle3 import Eagle3Head
from mmspec.verify.rule import AcceptRule

from .adapters import NoImageError, check_drafter_family, prefill_multimodal, require_family
from .drafter import KeepRatioError, VLMDrafter
from .feature_drafter import PrunedFeatureDrafter
from .pruning import PruningStrategy, get_strategy
from .pruning.cls_attention import vision_encoder_layers

IMAGE_INPUT_KEYS = ("pixel_values", "pixel_values_videos")


def generate(
    target: torch.nn.Module,
    drafter: torch.nn.Module | Drafter,
    inputs: Mapping[str, Any],
    *,
    pruning: str | PruningStrategy = "verifier",
    keep_ratio: float = 0.25,
    positions: str = "original",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_draft_tokens: int | DraftLengthPolicy | None = DEFAULT_NUM_DRAFT_TOKENS,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    rule: AcceptRule | None = None,
    tree: Any = None,
    _stream: bool = False,
    _leave: Any = None,
) -> GenerationOutput:
    """Speculative decoding of ``target`` (a HF VLM) with a drafter that sees pruned visual tokens.

    ``drafter`` is a smaller VLM of the target's family, a text-only causal LM with the target's
    vocabulary (it sees no visual tokens), an :class:`~mmspec.heads.eagle3.Eagle3Head` over the target's
    features (its context pruned the same way, :class:`~mmspec.vision.PrunedFeatureDrafter`), or a ready
    :class:`~mmspec.drafters.Drafter`.
    ``output.stats.extra`` reports ``visual_tokens`` (per row, the target's) and
    ``drafter_visual_tokens`` (per row, what the drafter kept).
    """
    fam = require_family(target)
    if not isinstance(keep_ratio, (int, float)) or isinstance(keep_ratio, bool) or not 0.0 <= keep_ratio <= 1.0:
        raise KeepRatioError(f"keep_ratio must be in [0, 1], got {keep_ratio!r}")
    inputs = dict(inputs)
    if "input_ids" not in inputs:
        raise ShapeError("inputs must contain input_ids (pass the processor's output)")
    input_ids = inputs.pop("input_ids")
    attention_mask = inputs.pop("attention_mask", None)
    has_pixels = any(inputs.get(k) is not None for k in IMAGE_INPUT_KEYS)
    if not has_pixels or not bool((input_ids == fam.image_token_id).any()):
        raise NoImageError("no image in the inputs: expected image tokens in input_ids and pixel_values "
                           "(use mmspec.generate for text-only prompts)")
    for key in IMAGE_INPUT_KEYS:  # NaN / inf pixels would decode silently into garbage (or pad tokens)
        pixels = inputs.get(key)
        if isinstance(pixels, torch.Tensor) and torch.is_floating_point(pixels) and not bool(torch.isfinite(pixels).all()):
            n_bad = int((~torch.isfinite(pixels)).sum())
            raise NonFiniteError(f"inputs[{key!r}] holds {n_bad} non-finite value(s) (NaN or inf) out of "
                                 f"{pixels.numel()}: check the image and the processor's normalisation")
    strategy = get_strategy(pruning)
    if isinstance(drafter, Eagle3Head):
        drafter = PrunedFeatureDrafter(drafter, pruning=strategy, keep_ratio=keep_ratio, positions=positions,
                                       image_token_id=fam.image_token_id, tree=tree)
    elif isinstance(drafter, torch.nn.Module):
        check_drafter_family(target, drafter)
        if strategy.name == "cls" and keep_ratio > 0 and getattr(drafter.config, "model_type", None) == fam.model_type:
            vision_encoder_layers(drafter)  # raises a named error when the encoder has no [CLS]
        drafter = VLMDrafter(drafter, pruning=strategy, keep_ratio=keep_ratio, positions=positions,
                             image_token_id=fam.image_token_id, tree=tree)
    elif tree is not None:
        raise MMSpecError("tree= shapes a drafter model's or head's drafts; pass the model or head "
                          "(or build VLMDrafter / PrunedFeatureDrafter with tree=...)")
    elif not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a model or a Drafter, got {type(drafter).__name__}")
    if isinstance(drafter, ModelDrafter) and not isinstance(drafter, (VLMDrafter, FeatureDrafter)):
        raise MMSpecError("wrap model drafters in VLMDrafter (or pass the model) for VLM targets")
    run = functools.partial(generate_text_stream, leave=_leave) if _stream else generate_text
    return run(
        target, input_ids, drafter=drafter, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, num_draft_tokens=num_draft_tokens, generator=generator, seed=seed,
        eos_token_id=eos_token_id, attention_mask=attention_mask, rule=rule, prefill=prefill_multimodal,
        **inputs,
    )


def generate_stream(target: torch.nn.Module, drafter: torch.nn.Module | Drafter, inputs: Mapping[str, Any], *,
                    pruning: str | PruningStrategy = "verifier", keep_ratio: float = 0.25, positions: str = "original",
                    max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None,
                    num_draft_tokens: int | DraftLengthPolicy | None = DEFAULT_NUM_DRAFT_TOKENS,
                    generator: torch.Generator | None = None, seed: int | list[int] | None = None,
                    eos_token_id: int | list[int] | None = None, rule: AcceptRule | None = None,
                    tree: Any = None, leave: Any = None) -> Iterator[StepEvent]:
    """:func:`generate` as a stream of :class:`mmspec.StepEvent` (one per verification step; the
    drafter's pruning facts are in ``event.stats.extra``).  Input is validated eagerly. ``leave``: rows the
    caller ends between steps (:func:`mmspec.engine.decode`)."""
    return generate(target, drafter, inputs, pruning=pruning, keep_ratio=keep_ratio, positions=positions,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    num_draft_tokens=num_draft_tokens, generator=generator, seed=seed, eos_token_id=eos_token_id,
                    rule=rule, tree=tree, _stream=True, _leave=leave)
