"""Exact speculative sampling (lossless rejection sampling).

Paper: Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding"
(ICML 2023); Chen et al., "Accelerating Large Language Model Decoding with Speculative
Sampling" (2023).

Glossary:
    accept   u < min(1, p(x) / q(x)), evaluated as ``u * q(x) < p(x)`` (no division)
    residual norm(max(0, p - q)); for a deterministic drafter q is one-hot at x, so the
             residual is p with x zeroed
    q(x)=0   a token the drafter could not have sampled is never accepted
    p(x)=0   a token the target cannot produce is never accepted
"""

from __future__ import annotations

import torch

from .rule import AcceptRule
from .types import Judgement


class ExactRule(AcceptRule):
    fused_mode = "exact"
    lossless = True

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms) -> Judgement:
        x = draft_tokens.unsqueeze(-1)  # [B, k, 1]
        p_x = target_probs.gather(-1, x).squeeze(-1)  # [B, k]
        if draft_probs is None:
            q_x = torch.ones_like(p_x)
            residual = target_probs.scatter(-1, x, 0.0)  # [B, k, V]
        else:
            q_x = draft_probs.gather(-1, x).squeeze(-1)
            residual = (target_probs - draft_probs).clamp_min(0.0)
        accepted = (uniforms * q_x < p_x) & (q_x > 0)
        return Judgement(accepted=accepted, residual=residual)
