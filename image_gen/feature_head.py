"""EAGLE feature heads for AR image models: building one for a target, and its teacher-forced training batches.

Papers: Li et al., EAGLE-2 (EMNLP 2024) — the baseline LANTERN (ICLR 2025) and MuLo-SD run on LlamaGen —
and EAGLE-3 (arXiv 2503.01840), whose head (:class:`~mmspec.heads.eagle3.Eagle3Head`) and training-time
test (:func:`~mmspec.distill.train_head.ttt_loss`) this reuses unchanged.

Glossary:
    features      the target's hidden states at three ``hidden_states`` indices (0 = embeddings, the last
                  one after the final norm), concatenated: float [B, L, 3d]
    halves        under classifier-free guidance the head drafts both halves, so it learns from both:
                  sequences under the prompt and under the null prompt (``unconditional``), each scored
                  against the target's own distribution of that half
    draft vocab   the whole codebook (``d2t`` = identity): an image target's vocabulary is small
    forced batch  (prefix + image tokens) of real images, right padded, at positions 0, 1, ...: the
                  layout of a sequence the target's session holds; only image tokens are scored

Drafting runs through :class:`~mmspec.drafters.feature.FeatureDrafter` (``generate(..., drafter=head)``),
which keeps the head's two halves laid out as the target's guided session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mmspec.heads.eagle3 import Eagle3Config, Eagle3Head
from mmspec.heads.ttt import HeadBatch

from .model import ARImageModel


def load_image_drafter(path, target: ARImageModel) -> ARImageModel | Eagle3Head:
    """A drafter folder: an EAGLE head (``head_config.json``, attached to ``target``) or an AR image model."""
    if (Path(path) / "head_config.json").is_file():
        return Eagle3Head.load(path, target)
    return ARImageModel.from_pretrained(path)


def image_head(target: ARImageModel, layers: Sequence[int]) -> Eagle3Head:
    """A fresh head for ``target`` reading hidden-state indices ``layers`` (three of 0 .. num_layers),
    predicting over the whole codebook, attached to the target."""
    n = target.config.num_layers
    layers = tuple(int(i) for i in layers)
    if len(layers) != 3 or not all(0 <= i <= n for i in layers):
        raise ValueError(f"layers must be three hidden-state indices in 0..{n}, got {layers}")
    head = Eagle3Head(Eagle3Config.from_target(target, target.config.codebook_size, layers))
    head.init_from_target(target)
    return head.attach(target)


@torch.no_grad()
def forced_batch(target: ARImageModel, prefixes: Sequence[Sequence[int]], codes: torch.Tensor,
                 layers: Sequence[int]) -> HeadBatch:
    """Teacher-forced head batch: per row the prefix ids (a condition's or the null prompt's) followed by
    that image's tokens ``codes`` long [B, N]; right padded; the target's features at ``layers`` and its
    final hidden states from one forward."""
    batch, n = codes.shape
    if len(prefixes) != batch:
        raise ValueError(f"{len(prefixes)} prefixes for {batch} images")
    width = max(len(p) for p in prefixes) + n
    tokens = torch.zeros((batch, width), dtype=torch.long)
    valid = torch.zeros_like(tokens)
    image = torch.zeros((batch, width), dtype=torch.bool)  # the scored tokens
    for b, p in enumerate(prefixes):
        m = len(p)
        tokens[b, :m] = torch.as_tensor(list(p), dtype=torch.long)
        tokens[b, m: m + n] = codes[b]
        valid[b, : m + n] = 1
        image[b, m: m + n] = True
    positions = torch.arange(width).repeat(batch, 1)
    device = target.device
    hs = target(input_ids=tokens.to(device), attention_mask=valid.to(device), position_ids=positions.to(device),
                use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states
    features = torch.cat([hs[i] for i in layers], dim=-1).float().cpu()  # [B, L, 3d]
    return HeadBatch(tokens, valid, image, features, hs[-1].float().cpu(), positions)
