"""[CLS]-attention pruning (FasterVLM / VisionZip "dominant tokens").

Papers: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning"
(FasterVLM, 2024); Yang et al., "VisionZip" (CVPR 2025).

Glossary:
    [CLS] attention   attention from the vision encoder's [CLS] token to every patch at the
                      encoder layer -2 (the layer LLaVA takes its features from), averaged over
                      heads; captured by a pre-hook on that layer during the drafter's own vision
                      forward, so it costs no extra encoder pass
    keep              the ``budget`` patches with the highest [CLS] attention

Encoders without a [CLS] token (SigLIP, Qwen2-VL's ViT) raise :class:`PruningError`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .base import PruningError, PruningInputs, PruningStrategy


def vision_encoder_layers(vlm: torch.nn.Module):
    """Encoder layers and embeddings module of a CLIP-style vision tower, or raise PruningError."""
    tower = getattr(getattr(vlm, "model", vlm), "vision_tower", None)
    inner = getattr(tower, "vision_model", tower)
    encoder = getattr(inner, "encoder", None)
    layers = getattr(encoder, "layers", None)
    embeddings = getattr(inner, "embeddings", None)
    if layers is None or embeddings is None or not hasattr(embeddings, "class_embedding"):
        raise PruningError(
            f"'cls' pruning needs a vision encoder with a [CLS] token; {type(vlm).__name__}'s vision "
            f"encoder ({type(inner).__name__ if inner is not None else 'none'}) has none. "
            "Use 'verifier', 'diversity' or 'uniform'."
        )
    return layers


@contextlib.contextmanager
def capture_cls_attention(vlm: torch.nn.Module, layer: int = -2) -> Iterator[dict]:
    """While active, record [CLS]->token attention (float [num_images, T]) of encoder ``layer``."""
    layers = vision_encoder_layers(vlm)
    block = layers[layer]
    box: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        attn = module.self_attn
        h = module.layer_norm1(hidden)
        n_img, t, _ = h.shape
        heads, dim = attn.num_heads, attn.head_dim
        q = attn.q_proj(h[:, :1]).view(n_img, 1, heads, dim).transpose(1, 2)  # [I, H, 1, dh]
        k = attn.k_proj(h).view(n_img, t, heads, dim).transpose(1, 2)  # [I, H, T, dh]
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).float().softmax(dim=-1)  # [I, H, 1, T]
        box["attention"] = probs.mean(dim=1)[:, 0]  # [I, T]

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def cls_scores_per_token(box: dict, image: torch.Tensor, select_strategy: str = "default") -> list[torch.Tensor]:
    """The [CLS] attention captured in ``box`` (float [num_images, T]) as one score per image token of each
    row: float [N_b] per row b of image bool [B, L] (images in order; LLaVA's "default" feature selection
    drops the [CLS] column itself)."""
    att = box.get("attention")
    if att is None:
        raise PruningError("the vision encoder did not run; no [CLS] attention was captured")
    per_image = att[:, 1:] if select_strategy == "default" else att
    flat = per_image.reshape(-1)
    n_total = int(image.sum())
    if flat.numel() != n_total:
        raise PruningError(
            f"'cls' pruning needs one image token per encoder patch; this model has {n_total} image tokens "
            f"for {flat.numel()} patches (any-resolution packing?). Use 'verifier', 'diversity' or 'uniform'."
        )
    return list(torch.split(flat, image.sum(dim=1).tolist()))


class ClsAttentionPruning(PruningStrategy):
    name = "cls"
    needs = ("cls_attention",)

    def select(self, inputs: PruningInputs, budget: int) -> torch.Tensor:
        if inputs.cls_attention is None:
            raise PruningError("'cls' pruning needs the vision encoder's [CLS] attention")
        order = torch.argsort(inputs.cls_attention, descending=True, stable=True)[:budget]
        return torch.sort(order).values
