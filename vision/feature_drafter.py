"""A feature-level draft head (EAGLE-3) for a VLM target whose own context keeps only the visual positions a
pruning strategy selects.

Papers: Li et al., EAGLE-3 (arXiv 2503.01840) for the head; SpecVLM (Ji et al., EMNLP 2025) for pruning the
drafter's visual context while the full-token target verifies.

Glossary:
    pair t       the head's input at prompt slot t: (the target's features at position t, token t + 1)
                 (:mod:`mmspec.drafters.feature`); a *visual pair* is one whose feature position t holds a
                 visual token
    pruned       visual pairs of visual tokens the strategy does not keep are never fed to the head, so
                 its cache holds (text pairs + kept visual pairs); text pairs are always kept
    evidence     what the strategies read, all from the target's own prefill (the head has no vision
                 tower): ``target_attention`` (text -> image attention captured under SDPA),
                 ``cls_attention`` (the target's vision encoder), ``features`` (the target's merged input
                 embeddings at the visual positions, HF hidden-state index 0)
    positions    "original": kept pairs keep the position they have in the full prompt and later pairs
                 continue after the last prompt position; "contiguous": the kept pairs are numbered
                 0, 1, 2, ...

After the prefill the head drafts exactly as :class:`~mmspec.drafters.feature.FeatureDrafter` does; the
target is untouched, so verification stays lossless whatever the head keeps.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from mmspec.drafters.adaptive import DraftLengthPolicy
from mmspec.drafters.feature import FeatureDrafter
from mmspec.errors import MMSpecError
from mmspec.heads.eagle3 import Eagle3Head

from .adapters import family_of
from .drafter import check_pruning_args, compact, text_after_image
from .pruning import PruningInputs, PruningStrategy, get_strategy, select_visual_tokens
from .pruning.cls_attention import capture_cls_attention, cls_scores_per_token

_EMBEDDINGS = 0  # HF hidden-state index of the merged input embeddings


class PrunedFeatureDrafter(FeatureDrafter):
    """``PrunedFeatureDrafter(head, pruning="verifier", keep_ratio=0.25, tree=DynamicTree(...))``: the head
    over a VLM target's features, seeing ``ceil(keep_ratio * N)`` of each row's N visual positions."""

    def __init__(self, head: Eagle3Head, draft_length: int | DraftLengthPolicy | None = None, *, tree: Any = None,
                 pruning: str | PruningStrategy = "verifier", keep_ratio: float = 0.25, positions: str = "original",
                 image_token_id: int | None = None, attention_layers=None):
        super().__init__(head, draft_length, tree=tree)
        self.keep_ratio = check_pruning_args(keep_ratio, positions)
        self.strategy = get_strategy(pruning)
        self.positions = positions
        self.image_token_id = image_token_id
        self.attention_layers = attention_layers
        # the merged input embeddings too (free: the target returns every layer's states when asked)
        self.hidden_layers = tuple(sorted({_EMBEDDINGS, *self.hidden_layers}))
        self._attention = None
        self._cls: dict | None = None
        self._select_strategy = "default"
        self._info: dict[str, Any] = {}

    @property
    def _chooses(self) -> bool:
        """Whether the strategy must pick among the visual tokens (not all, not none)."""
        return self.strategy.name != "none" and 0.0 < self.keep_ratio < 1.0

    def check_compatible(self, target: torch.nn.Module) -> None:
        super().check_compatible(target)
        if self.image_token_id is None:
            fam = family_of(target)
            if fam is None:
                raise MMSpecError("PrunedFeatureDrafter needs a VLM target (a config with image_token_id) "
                                  "or image_token_id=")
            self.image_token_id = fam.image_token_id
        self._select_strategy = getattr(target.config, "vision_feature_select_strategy", "default")

    # -- evidence from the target's prefill ------------------------------------------------------
    def target_prefill_context(self, target, input_ids, attention_mask):
        self._attention, self._cls = None, None
        if not self._chooses:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if "target_attention" in self.strategy.needs:
            from .attention_capture import AttentionCapture
            from .capture import language_model_of

            image = input_ids[:, :-1] == self.image_token_id
            queries = text_after_image(image, attention_mask[:, :-1])
            self._attention = stack.enter_context(
                AttentionCapture(language_model_of(target), queries, image, self.attention_layers))
        if "cls_attention" in self.strategy.needs:
            self._cls = stack.enter_context(capture_cls_attention(target))
        return stack

    # -- pruned prefill -------------------------------------------------------------------------
    def observe_prefill(self, target_hidden: dict[int, torch.Tensor] | None) -> None:
        input_ids, mask = self._prompt
        del self._prompt
        if target_hidden is None or input_ids.shape[1] < 2:
            return
        valid = mask.bool()
        image = (input_ids == self.image_token_id) & valid  # [B, L]
        if bool(image[:, -1].any()):
            raise MMSpecError("the prompt must end with text after the image (last token is an image token)")
        n_visual = image.sum(dim=1)
        scores = self._attention.scores if self._attention is not None else None
        cls_all = cls_scores_per_token(self._cls, image, self._select_strategy) if self._cls is not None else None

        def evidence(b: int, cols: torch.Tensor) -> PruningInputs:
            return PruningInputs(
                features=target_hidden[_EMBEDDINGS][b, cols].float(),
                target_attention=None if scores is None else scores[b, cols].float(),
                cls_attention=None if cls_all is None else cls_all[b][: cols.numel()])

        if self.strategy.name == "none" or self.keep_ratio >= 1.0:
            kept, counts = image, n_visual.tolist()
            indices = [list(range(int(n))) for n in n_visual]
        else:
            kept, counts, indices = select_visual_tokens(image, self.strategy, self.keep_ratio, evidence)
        # the head's context is the pruned prompt: kept slots i = 0..W-1 (the last one is the prompt's last token,
        # always text); pair i = (features of kept slot i, token of kept slot i + 1)
        slots, slot_valid = compact((valid & ~image) | kept)  # [B, W], right aligned
        index, new_valid = slots[:, :-1], slot_valid[:, :-1]  # feature slots: every kept position < L - 1
        tokens = input_ids.gather(1, slots)[:, 1:]
        features = self._features(target_hidden)  # [B, L - 1, 3d]
        features = features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        position_ids = None
        if self.positions == "original":
            position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0).gather(1, index)
            position_ids = torch.where(new_valid.bool(), position_ids, torch.ones_like(position_ids))
        self._feed(tokens, features, new_valid, position_ids=position_ids)
        if position_ids is not None:  # the next pair's feature is the prompt's last token: it keeps its position
            self.session.position_delta = (mask.cumsum(dim=1) - 1)[:, -1] - new_valid.sum(dim=1)
        self._attention, self._cls = None, None
        self._info = dict(visual_tokens=n_visual.tolist(), drafter_visual_tokens=counts,
                          drafter_kept_visual_indices=indices, pruning=self.strategy.name,
                          keep_ratio=self.keep_ratio, positions=self.positions, drafter_kind="feature head")

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)
