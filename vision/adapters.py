"""Family adapters for HF VLMs: what mmspec needs to know about each family.

Glossary:
    family         the HF ``model_type`` of a VLM (llava, llava_next, llava_onevision, qwen2_vl,
                   qwen2_5_vl); drafter and target must share it (or the drafter is a text-only LM)
    image token    the placeholder id the processor repeats once per visual token
    M-RoPE         Qwen2-VL's 3-D (t, h, w) rotary positions; text after an image continues at
                   (largest position + 1), which :func:`prefill_multimodal` turns into a per-row
                   ``position_delta`` for the decode steps

Merging of vision features and position computation are read off the model itself
(:mod:`mmspec.vision.capture`), so an adapter is just this table plus the prefill below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.cache import CacheSession
from mmspec.errors import MMSpecError

from .capture import capture_lm_inputs

FAMILIES = {
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
}


class FamilyMismatchError(MMSpecError):
    """The drafter is a VLM of another family than the target (or the model is not a known VLM)."""


class NoImageError(MMSpecError):
    """The inputs contain no image (no image tokens or no pixel values)."""


@dataclass(frozen=True)
class VLMFamily:
    model_type: str
    image_token_id: int

    @property
    def display_name(self) -> str:
        return FAMILIES[self.model_type]


def family_of(model: torch.nn.Module) -> VLMFamily | None:
    """The model's VLM family, or ``None`` for a text-only model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return None
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise FamilyMismatchError(f"{type(model).__name__} has no image_token_id in its config")
    return VLMFamily(model_type=model_type, image_token_id=int(token))


def require_family(target: torch.nn.Module) -> VLMFamily:
    fam = family_of(target)
    if fam is None:
        raise FamilyMismatchError(
            f"target {type(target).__name__} (model_type={getattr(target.config, 'model_type', '?')!r}) is not a "
            f"supported VLM; supported families: {', '.join(FAMILIES.values())}"
        )
    return fam


def check_drafter_family(target: torch.nn.Module, drafter: torch.nn.Module) -> VLMFamily | None:
    """The drafter's family (None = text-only LM); raise if it is a VLM of another family."""
    t, d = require_family(target), family_of(drafter)
    if d is not None and d.model_type != t.model_type:
        raise FamilyMismatchError(
            f"drafter is a {d.display_name} model but the target is {t.display_name}: "
            "the drafter must be a smaller VLM of the same family (or a text-only LM with the target's vocabulary)"
        )
    if d is not None and d.image_token_id != t.image_token_id:
        raise FamilyMismatchError(
            f"drafter image token id {d.image_token_id} != target image token id {t.image_token_id}"
        )
    return d


def last_position(position_ids: torch.Tensor) -> torch.Tensor:
    """Position of the last prompt token per row: long [B] from [B, L] or [3, B, L]."""
    return position_ids[0, :, -1] if position_ids.dim() == 3 else position_ids[:, -1]


def prefill_embeds(session: CacheSession, embeds: torch.Tensor, valid: torch.Tensor,
                   position_ids: torch.Tensor | None) -> None:
    """Feed embeddings [B, L, d] but the last column (it stays pending) with explicit positions
    ([B, L] / [3, B, L]; None = count-based), and make decode positions continue after the last one."""
    if embeds.shape[1] > 1:
        session.extend(None, valid[:, :-1], inputs_embeds=embeds[:, :-1],
                       position_ids=None if position_ids is None else position_ids[..., :-1], num_logits=1)
    if position_ids is not None:
        session.position_delta = last_position(position_ids) - (valid.sum(dim=1) - 1)


def prefill_multimodal(session: CacheSession, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       model_inputs: dict) -> None:
    """Target prefill for a VLM: the model's own merged embeddings and positions, minus the last token."""
    lm = capture_lm_inputs(session.model, input_ids, attention_mask, **model_inputs)
    prefill_embeds(session, lm.inputs_embeds, attention_mask, lm.position_ids)
