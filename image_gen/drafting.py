"""The drafter protocol for image-token generation.

Glossary:
    image position   index of a token in the raster (0 .. H*W-1); drafters receive each image's
                     next position so that CFG schedules see the right step
    ImageStepOutcome what one verification decided, plus the target's guided logits of the step
                     (Jacobi drafting refines its window from them)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.base import Draft
from mmspec.verify.types import VerifyResult


@dataclass(frozen=True)
class GuidanceSpec:
    cond: list[list[int]]  # per image: prefix ids of the condition
    uncond: list[list[int]] | None  # per image: unconditional prefix (None: CFG off)
    cfg_scale: float
    schedule: str
    num_tokens: int  # H * W


@dataclass(frozen=True)
class ImageStepOutcome:
    draft: Draft
    result: VerifyResult
    committed: list[list[int]]  # per image: tokens appended this step
    target_logits: torch.Tensor  # guided logits of the step, float [B, k+1, V]


class ImageDrafter(ABC):
    @abstractmethod
    def start(self, guidance: GuidanceSpec, *, sampling: SamplingParams, generator: torch.Generator | None) -> None:
        """Reset for a new batch of images."""

    @abstractmethod
    def propose(self, max_tokens: int, next_pos: torch.Tensor) -> Draft:
        """Draft up to ``max_tokens`` tokens per image; next_pos long [B] is each image's next position."""

    @abstractmethod
    def observe(self, outcome: ImageStepOutcome) -> None:
        """Learn what was committed."""

    @abstractmethod
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only images ``rows``."""

    @property
    def num_calls(self) -> int:
        return 0
