"""Capture what a HF VLM feeds its language model: merged embeddings and position ids.

Glossary:
    LM inputs   the ``inputs_embeds`` [B, L, d] a VLM builds by scattering projected vision
                features into the text embeddings at the image-token positions, plus the position
                ids it computes ([B, L] or M-RoPE [3, B, L]; ``None`` means "count the tokens")
    capture     run the VLM's own forward with a pre-hook on its decoder that records those inputs
                and stops the forward before the decoder runs (no decoder cost, no cache touched)

Because every HF VLM family merges features its own way (LLaVA's single grid, LLaVA-OneVision's
any-resolution packing with newline tokens, Qwen2-VL's merged patches and M-RoPE), reading the
decoder's inputs keeps mmspec free of per-family merging code: the family adapter only has to
say which token id marks image positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class _Captured(Exception):
    """Raised inside the decoder pre-hook to stop the VLM forward once its inputs are known."""


@dataclass(frozen=True)
class LMInputs:
    inputs_embeds: torch.Tensor  # float [B, L, d]
    position_ids: torch.Tensor | None  # long [B, L] or [3, B, L] (M-RoPE); None = count-based
    attention_mask: torch.Tensor  # long [B, L]


def language_model_of(vlm: torch.nn.Module) -> torch.nn.Module:
    """The decoder (text model) of a HF VLM."""
    inner = getattr(vlm, "model", None)
    for cand in (getattr(inner, "language_model", None), getattr(vlm, "language_model", None)):
        if isinstance(cand, torch.nn.Module):
            return getattr(cand, "model", cand) if not hasattr(cand, "layers") and hasattr(cand, "model") else cand
    get = getattr(vlm, "get_decoder", None)
    if callable(get):
        return get()
    raise TypeError(f"cannot find the language model inside {type(vlm).__name__}")


@torch.no_grad()
def capture_lm_inputs(vlm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      **model_inputs: Any) -> LMInputs:
    """Run ``vlm``'s multimodal embedding step and return the decoder inputs it would use."""
    decoder = language_model_of(vlm)
    box: dict[str, Any] = {}

    def hook(module, args, kwargs):
        box["embeds"] = kwargs.get("inputs_embeds")
        box["pos"] = kwargs.get("position_ids")
        raise _Captured

    # prepend: stop the forward before any other pre-hook (e.g. an attention capture) sees it
    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        vlm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if box.get("embeds") is None:
        raise RuntimeError(f"{type(vlm).__name__} did not call its language model with inputs_embeds")
    pos = box["pos"]
    if pos is not None and pos.dim() == 3 and pos.shape[0] == 4:  # [text; t; h; w] layout
        pos = pos[1:]
    return LMInputs(inputs_embeds=box["embeds"], position_ids=pos, attention_mask=attention_mask.to(torch.long))
