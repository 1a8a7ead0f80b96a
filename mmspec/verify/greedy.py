"""Greedy verification.

Glossary: accept drafted x at position i iff x == argmax p_i (first index on ties, as
``torch.argmax`` and HF greedy search); the recovered token is argmax p_i. Lossless for
greedy decoding: the output is token-identical to the target's greedy output.
"""

from __future__ import annotations

import torch

from .rule import AcceptRule
from .types import Judgement


class GreedyRule(AcceptRule):
    fused_mode = "greedy"
    lossless = True

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms) -> Judgement:
        # draft_tokens [B,k], target_probs [B,k,V] (scores or probs: only the argmax matters)
        best = target_probs.argmax(dim=-1)  # [B, k]
        accepted = draft_tokens == best
        residual = torch.nn.functional.one_hot(best, target_probs.shape[-1]).to(torch.float32)
        return Judgement(accepted=accepted, residual=residual)
