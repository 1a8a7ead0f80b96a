"""The acceptance-rule strategy interface.

Glossary:
    p          processed target distribution at a drafted position, float [B, k, V]
    q          processed draft distribution the drafted token was sampled from, float [B, k, V],
               or ``None`` for a deterministic drafter (q = one-hot at the drafted token)
    u          uniform random numbers in [0, 1), float [B, k], one per drafted position
    residual   unnormalised distribution the recovered token is drawn from at the first rejection

A rule only *judges* positions; walking the chain (first rejection, bonus token, sentinels)
is done once in :func:`mmspec.verify.chain.verify_chain`, so relaxed rules (LANTERN's
latent-neighbour pooling, MuLo-SD's pooled threshold, typical acceptance) plug in by
implementing :meth:`AcceptRule.judge` without touching the chain code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .types import Judgement


class AcceptRule(ABC):
    """Strategy object deciding acceptance of drafted tokens.

    Attributes:
        fused_mode: name of the fused kernel family that implements this rule exactly
            (``"greedy"`` or ``"exact"``), or ``None`` if only :meth:`judge` is available.
        lossless: whether the rule provably preserves the target distribution.
    """

    fused_mode: str | None = None
    lossless: bool = False

    @abstractmethod
    def judge(
        self,
        draft_tokens: torch.Tensor,  # long [B, k]
        draft_probs: torch.Tensor | None,  # float [B, k, V] | None
        target_probs: torch.Tensor,  # float [B, k, V]
        uniforms: torch.Tensor,  # float [B, k]
    ) -> Judgement:
        """Judge every drafted position independently (the chain walk is not the rule's job)."""

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}()"
