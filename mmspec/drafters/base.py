"""The drafter protocol.

Glossary:
    Draft        what a drafter proposes for one step: tokens long [B, k], the processed
                 distributions they were sampled from (float [B, k, V], or ``None`` for a
                 deterministic drafter) and ``num_draft`` long [B] (real drafts per row, <= k)
    StepOutcome  what verification decided: the draft, the ``VerifyResult`` and the tokens each
                 row really committed (after EOS / max-length truncation)
    start        called once with the whole prompt (left padded) before the first step
    observe      called after every step; drafters update caches, n-gram indices and the
                 adaptive draft length here
    select_rows  called when finished rows leave the batch
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SamplingParams
from ..verify.types import VerifyResult


@dataclass(frozen=True)
class Draft:
    tokens: torch.Tensor  # long [B, k]
    probs: torch.Tensor | None  # float [B, k, V] | None
    num_draft: torch.Tensor  # long [B]

    @property
    def k(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class StepOutcome:
    draft: Draft
    result: VerifyResult
    committed: list[list[int]]  # per row: tokens appended to the sequence this step


class Drafter(ABC):
    """Proposes tokens; never sees the target model."""

    #: vocabulary size of the drafter's distributions, or None if it has none (n-gram lookup)
    vocab_size: int | None = None

    @abstractmethod
    def start(
        self,
        input_ids: torch.Tensor,  # long [B, L], left padded
        attention_mask: torch.Tensor,  # long [B, L]
        *,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        **model_inputs: Any,
    ) -> None:
        """Reset state for a new batch of prompts (``model_inputs``: the target's extra inputs,
        e.g. ``pixel_values``; text drafters ignore them)."""

    @abstractmethod
    def propose(self, max_tokens: int) -> Draft:
        """Propose up to ``max_tokens`` tokens per row (k >= 1 columns)."""

    @abstractmethod
    def observe(self, outcome: StepOutcome) -> None:
        """Learn what was committed (cache rollback, context update, draft-length update)."""

    @abstractmethod
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B']) of the batch."""

    def check_compatible(self, target: torch.nn.Module) -> None:
        """Raise a named error if this drafter cannot serve ``target`` (default: no check)."""

    def target_prefill_context(self, target: torch.nn.Module, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context the engine enters around the target's prefill (e.g. to capture attention)."""
        return contextlib.nullcontext()

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the drafter's context for the stats (e.g. visual tokens kept)."""
        return {}
