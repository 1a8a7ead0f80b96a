"""Keeping some of a HF decoder's layers: pipeline stages, early-exit draft models, distilled drafters.

Glossary:
    decoder layers  the ``nn.ModuleList`` of a causal LM's blocks and the config that counts them:
                    ``model.model.layers`` (Llama family, ``num_hidden_layers``), ``model.transformer.h`` (GPT-2,
                    ``n_layer``), ``model.model.language_model.layers`` (LLaVA-style VLMs, the text config)
    keep            the indices of the layers kept, in order; they are re-numbered from 0 (each attention's
                    ``layer_idx``) so the model's own KV cache holds exactly them, and the config follows
                    (layer count, ``layer_types``)
    truncated copy  a deep copy keeping the first n layers with the embeddings, final norm and head; ``share``
                    names tensors the copy keeps by reference instead (a drafter borrowing the target's embedding
                    and LM head)
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, Any]:
    """(owner, attribute, config): ``getattr(owner, attribute)`` is the ModuleList of ``model``'s decoder layers
    and ``config`` the config counting them. ValueError for a model of another shape."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for path in (("model", "language_model"), ("model",), ("transformer",)):
        owner = model
        for name in path:
            owner = getattr(owner, name, None)
        for attribute in ("layers", "h"):
            if owner is not None and isinstance(getattr(owner, attribute, None), nn.ModuleList):
                return owner, attribute, config
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (model.layers, transformer.h or "
                     "model.language_model.layers)")


def keep_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only the decoder layers ``keep`` of ``model`` (in place), re-numbered from 0; returns ``model``."""
    owner, attribute, config = decoder_layers(model)
    layers = getattr(owner, attribute)
    kept = nn.ModuleList([layers[i] for i in keep])
    for i, layer in enumerate(kept):
        for attention in (getattr(layer, "self_attn", None), getattr(layer, "attn", None)):
            if attention is not None and hasattr(attention, "layer_idx"):
                attention.layer_idx = i
    setattr(owner, attribute, kept)
    for count in ("num_hidden_layers", "n_layer"):
        if hasattr(config, count):
            setattr(config, count, len(kept))
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def truncated_copy(model: nn.Module, num_layers: int, *, share: Iterable[torch.Tensor] = ()) -> nn.Module:
    """A copy of ``model`` with its first ``num_layers`` decoder layers (and its embeddings, norm and head), in eval
    mode; the tensors in ``share`` (e.g. the embedding and head weights) are the model's own, not copies."""
    memo = {id(t): t for t in share}
    return keep_layers(copy.deepcopy(model, memo), range(num_layers)).eval()


__all__ = ["decoder_layers", "keep_layers", "truncated_copy"]
