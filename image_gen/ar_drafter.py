"""Drafting image tokens with a smaller AR image model under the same CFG as the target.

Paper: Leviathan et al. (ICML 2023) applied to AR image models (as in LANTERN's baselines).

Glossary: :class:`ARDrafter` is the core :class:`~mmspec.drafters.model.ModelDrafter` (one model
drafter for text, VLMs and images): under CFG it keeps its own
:class:`~mmspec.guidance.GuidedSession` with the target's guidance, samples each drafted token from
its guided, processed distribution and returns those distributions so the exact rule stays
lossless. The only image-specific part is the compatibility check (same codebook, same conditions).
``tree=StaticTree(...) | DynamicTree(...)`` drafts trees, verified in one guided target forward.
"""

from __future__ import annotations

import torch

from mmspec.drafters.adaptive import DraftLengthPolicy
from mmspec.drafters.model import ModelDrafter
from mmspec.errors import VocabularyMismatchError


def check_image_drafter(target: torch.nn.Module, drafter: torch.nn.Module) -> None:
    """:class:`VocabularyMismatchError` unless the two AR image models share the codebook and the conditions."""
    a, b = target.config, drafter.config
    if a.codebook_size != b.codebook_size:
        raise VocabularyMismatchError(
            f"drafter codebook size {b.codebook_size} != target codebook size {a.codebook_size}")
    if (a.num_classes, tuple(a.words)) != (b.num_classes, tuple(b.words)):
        raise VocabularyMismatchError("drafter and target use different conditions (classes or prompt words)")


class ARDrafter(ModelDrafter):
    def __init__(self, model: torch.nn.Module, draft_length: int | DraftLengthPolicy | None = 4, *, tree=None):
        super().__init__(model, None if tree is not None else draft_length, tree=tree)

    def check_compatible(self, target: torch.nn.Module) -> None:
        check_image_drafter(target, self.model)
        super().check_compatible(target)
