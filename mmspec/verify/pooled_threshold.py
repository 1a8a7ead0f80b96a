"""Pooled-threshold acceptance (MuLo-SD).

Paper: MuLo-SD (CVPR 2026): a drafted image token is accepted when the target puts enough mass on
its latent neighbourhood; rejected tokens are then resampled locally (see
:mod:`mmspec.image_gen.locality`).

Glossary:
    neighbourhood   {x} and its k nearest codebook neighbours B_k(x)
    accept          sum_{y in {x} u B_k(x)} p(y) >= tau (deterministic, no uniform used)
    residual        p itself: a rejected position is redrawn from the target's distribution
    tau             1 accepts only when the neighbourhood holds all the mass; tau > 1 never accepts
"""

from __future__ import annotations

import torch

from ..errors import MMSpecError
from .rule import AcceptRule
from .types import Judgement


class PooledThresholdRule(AcceptRule):
    lossless = False

    def __init__(self, neighbours: torch.Tensor, tau: float):
        if neighbours.dim() != 2 or neighbours.dtype != torch.long:
            raise MMSpecError(f"neighbours must be a long tensor [V, k], got {tuple(neighbours.shape)} {neighbours.dtype}")
        if not tau >= 0.0:
            raise MMSpecError(f"tau must be >= 0, got {tau!r}")
        self.neighbours, self.tau = neighbours, float(tau)

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms) -> Judgement:
        from mmspec.kernels import pooled_acceptance

        if self.neighbours.shape[0] != target_probs.shape[-1]:
            raise MMSpecError(f"neighbour table covers {self.neighbours.shape[0]} tokens but the vocabulary has "
                              f"{target_probs.shape[-1]}")
        accepted, _, _ = pooled_acceptance("threshold", draft_tokens, None, target_probs,
                                           self.neighbours.to(draft_tokens.device), uniforms, self.tau)
        return Judgement(accepted=accepted, residual=target_probs)

    def __repr__(self) -> str:
        return f"PooledThresholdRule(k={self.neighbours.shape[1]}, tau={self.tau})"
