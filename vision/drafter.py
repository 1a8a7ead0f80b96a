"""A drafter VLM that sees only a pruned subset of the visual tokens.

Papers: SpecVLM (Ji et al., EMNLP 2025) for pruned drafting with a full-token verifier;
Gagrani et al., "On Speculative Decoding for Multimodal Large Language Models" (2024) for the
text-only drafter (keep ratio 0).

Glossary:
    kept tokens    ceil(keep_ratio * N) of a row's N visual tokens, chosen by a
                   :class:`~mmspec.vision.pruning.PruningStrategy`; the others are *removed* from
                   the drafter's prefill (not masked), so its cache is shorter than the target's
    positions      "original": kept tokens keep the positions they had in the full prompt (1-D or
                   M-RoPE), text after the image continues from there; "contiguous": the pruned
                   sequence is re-numbered 0, 1, 2, ... as plain text positions
    text-only      a causal LM drafter (or keep ratio 0): the image tokens are dropped and the
                   remaining token ids are fed as text

After the prefill, drafting is :class:`~mmspec.drafters.ModelDrafter`'s (own cache, own length).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from mmspec.drafters.adaptive import DraftLengthPolicy
from mmspec.drafters.model import ModelDrafter
from mmspec.errors import MMSpecError

from .adapters import family_of, prefill_embeds
from .capture import capture_lm_inputs, language_model_of
from .pruning import PruningInputs, PruningStrategy, get_strategy, select_visual_tokens
from .pruning.cls_attention import capture_cls_attention, cls_scores_per_token

POSITION_MODES = ("original", "contiguous")


class KeepRatioError(MMSpecError):
    """keep_ratio outside [0, 1]."""


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather plan for removing columns: keep bool [B, L] -> (index long [B, L'], valid long [B, L']),
    kept columns right-aligned in their original order (left padding), L' = max kept per row."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    index = torch.zeros((keep.shape[0], width), dtype=torch.long, device=keep.device)
    valid = torch.zeros((keep.shape[0], width), dtype=torch.long, device=keep.device)
    for b in range(keep.shape[0]):
        cols = keep[b].nonzero().flatten()
        index[b, width - cols.numel():] = cols
        valid[b, width - cols.numel():] = 1
    return index, valid


def text_after_image(image_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: valid non-image positions after the row's last image token."""
    cols = torch.arange(image_mask.shape[1], device=image_mask.device)
    last_img = torch.where(image_mask, cols, torch.full_like(cols, -1)).amax(dim=1, keepdim=True)
    return valid.bool() & ~image_mask & (cols > last_img) & (last_img >= 0)


def check_pruning_args(keep_ratio: float, positions: str) -> float:
    """The keep ratio as a float, after named errors for a ratio outside [0, 1] (or not a number) and an
    unknown position mode."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 <= keep_ratio <= 1.0:
        raise KeepRatioError(f"keep_ratio must be in [0, 1], got {keep_ratio!r}")
    if positions not in POSITION_MODES:
        raise MMSpecError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    return float(keep_ratio)


class VLMDrafter(ModelDrafter):
    """Drafts with ``model`` (a smaller VLM of the target's family, or a text-only LM)."""

    def __init__(self, model: torch.nn.Module, *, pruning: str | PruningStrategy = "verifier",
                 keep_ratio: float = 0.25, positions: str = "original", image_token_id: int | None = None,
                 draft_length: int | DraftLengthPolicy | None = None, attention_layers=None, tree=None):
        super().__init__(model, draft_length, tree=tree)
        self.keep_ratio = check_pruning_args(keep_ratio, positions)
        self.strategy = get_strategy(pruning)
        self.positions = positions
        fam = family_of(model)
        self.is_vlm = fam is not None
        self.image_token_id = image_token_id if image_token_id is not None else (fam.image_token_id if fam else None)
        self.attention_layers = attention_layers
        self._capture = None
        self._info: dict[str, Any] = {}

    # -- evidence from the target's prefill --------------------------------------------------
    @property
    def uses_vision(self) -> bool:
        return self.is_vlm and (self.keep_ratio > 0 or self.strategy.name == "none")

    def target_prefill_context(self, target, input_ids, attention_mask):
        self._capture = None
        if not (self.uses_vision and "target_attention" in self.strategy.needs and self.keep_ratio < 1):
            return contextlib.nullcontext()
        from .attention_capture import AttentionCapture

        image = input_ids[:, :-1] == self.image_token_id
        queries = text_after_image(image, attention_mask[:, :-1])
        self._capture = AttentionCapture(language_model_of(target), queries, image, self.attention_layers)
        return self._capture

    # -- pruned prefill -----------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> None:
        assert self.session is not None
        if self.image_token_id is None:
            raise MMSpecError("VLMDrafter needs image_token_id for a text-only drafter model")
        valid = attention_mask.bool()
        image = (input_ids == self.image_token_id) & valid
        n_visual = image.sum(dim=1)
        if bool(image[:, -1].any()):
            raise MMSpecError("the prompt must end with text after the image (last token is an image token)")
        if not self.uses_vision:
            keep = valid & ~image
            index, new_valid = compact(keep)
            ids = input_ids.gather(1, index)
            self._info = dict(visual_tokens=n_visual.tolist(), drafter_visual_tokens=[0] * len(n_visual),
                              pruning=self.strategy.name, keep_ratio=self.keep_ratio)
            return super().prefill(ids, new_valid)

        cls_box: dict = {}
        cls_ctx = capture_cls_attention(self.model) if "cls_attention" in self.strategy.needs else contextlib.nullcontext(cls_box)
        with cls_ctx as cls_box:
            lm = capture_lm_inputs(self.model, input_ids, attention_mask, **model_inputs)
        target_scores = self._capture.scores if self._capture is not None else None
        cls_all = self._cls_scores_per_token(cls_box, image) if cls_box else None

        def evidence(b: int, cols: torch.Tensor) -> PruningInputs:
            return PruningInputs(
                features=lm.inputs_embeds[b, cols].float(),
                target_attention=None if target_scores is None else target_scores[b, cols].float(),
                cls_attention=None if cls_all is None else cls_all[b][: cols.numel()])

        kept, kept_counts, kept_indices = select_visual_tokens(image, self.strategy, self.keep_ratio, evidence)
        keep = (valid & ~image) | kept
        index, new_valid = compact(keep)
        embeds = lm.inputs_embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, lm.inputs_embeds.shape[-1]))
        if self.positions == "original":
            full = lm.position_ids
            if full is None:  # 1-D: the count of valid tokens before each slot
                full = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
            if full.dim() == 2:
                pos = full.gather(1, index)
            else:  # M-RoPE [3, B, L]
                pos = full.gather(2, index.unsqueeze(0).expand(full.shape[0], -1, -1))
            pos = torch.where(new_valid.bool(), pos, torch.ones_like(pos))
        else:
            pos = None
        prefill_embeds(self.session, embeds, new_valid, pos)
        self.pending = input_ids[:, -1:]
        self.pending_valid = attention_mask[:, -1:].to(torch.long)
        self._info = dict(visual_tokens=n_visual.tolist(), drafter_visual_tokens=kept_counts,
                          drafter_kept_visual_indices=kept_indices, pruning=self.strategy.name, keep_ratio=self.keep_ratio, positions=self.positions)

    def _cls_scores_per_token(self, box: dict, image: torch.Tensor) -> list[torch.Tensor]:
        """Map [CLS] attention of each encoded image onto the image tokens of each row."""
        return cls_scores_per_token(box, image, getattr(self.model.config, "vision_feature_select_strategy", "default"))

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)
