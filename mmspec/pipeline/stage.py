"""One pipeline stage's share of the target: a HF causal LM cut down to a contiguous range of decoder layers.

Glossary:
    stage model  the target with only layers [a, b) (re-indexed from 0, so it keeps its own KV cache); stage 0
                 embeds token ids, later stages take the previous stage's hidden states as ``inputs_embeds``;
                 every stage but the last has an identity final norm and LM head, so its "logits" are the hidden
                 states it passes on. Each stage derives positions and masks from the same valid masks, so the
                 pipeline computes exactly what the whole model computes

Any :class:`~mmspec.cache.CacheSession` can drive a stage model: rollback, trees and row selection work per stage.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..truncate import keep_layers
from .plan import PipelineConfigError, StagePlan


def stage_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family HF causal LM (``model.model.layers``), the only kind the pipeline splits
    (:func:`mmspec.truncate.decoder_layers` finds them in other shapes too)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "norm") or not hasattr(model, "lm_head"):
        raise PipelineConfigError(f"{type(model).__name__} cannot be split into stages: the pipeline splits Llama-family "
                                  "causal LMs (model.model.layers, model.model.norm, model.lm_head)")
    return layers


def build_stage_model(model: nn.Module, plan: StagePlan, stage: int, *, in_place: bool = False) -> nn.Module:
    """Stage ``stage`` of ``plan`` cut from ``model`` (a copy unless ``in_place``; a stage process owns its model)."""
    layers = stage_layers(model)
    plan.check(len(layers))
    if not 0 <= stage < plan.num_stages:
        raise PipelineConfigError(f"stage {stage} is not one of the plan's {plan.num_stages} stages")
    part = model if in_place else copy.deepcopy(model)
    keep_layers(part, plan.layers(stage))
    part.mmspec_layer_range = (plan.layers(stage).start, plan.layers(stage).stop)  # global layers [a, b)
    if stage < plan.num_stages - 1:
        part.model.norm = nn.Identity()
        part.lm_head = nn.Identity()
    return part.eval()


def layer_range(model: nn.Module) -> tuple[int, int]:
    """The global decoder layers [a, b) a stage model holds (a whole model: all of them)."""
    return getattr(model, "mmspec_layer_range", None) or (0, len(stage_layers(model)))


def owned_features(features: list[int], layers: tuple[int, int]) -> tuple[int, list[int]]:
    """For a stage holding layers [a, b): (how many of the sorted hidden-state indices ``features`` earlier stages
    computed, the ones this stage computes as local indices). Index i is the output of layer i - 1 (0: the
    embeddings), so a stage owns a < i <= b, and stage 0 also i = 0."""
    a, b = layers
    carried = sum(1 for i in features if i <= a and not (a == 0 and i == 0))
    own = [i - a for i in features if (a < i <= b) or (a == 0 and i == 0)]
    return carried, own


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def float_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
