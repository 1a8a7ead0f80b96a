"""Latent-neighbour relaxed acceptance (LANTERN, LANTERN++).

Papers: Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative
Decoding" (ICLR 2025); Park et al., "LANTERN++: Enhancing Relaxed Speculative Decoding with Static
Tree Drafting for Visual Auto-regressive Models" (2025).

Glossary:
    B_k(x)      the drafted token's k nearest codebook neighbours (a row of the neighbour table)
    A(x)        the largest prefix of B_k(x) whose target mass sum p(y) stays within the budget:
                delta (LANTERN) or (lambda - 1) * p(x) (LANTERN++); a prefix of zero mass counts as empty
    pooled p    p~(x) = p(x) + sum_{y in A(x)} p(y): x is accepted with min(1, p~(x) / q(x))
    residual    deterministic drafts (q one-hot): p with x and A(x) zeroed (then renormalised by the
                chain walk); sampled drafts: max(0, p - q') with q' = q zeroed on {x} and A(x) when A(x)
                is non-empty (the LANTERN reference implementation's choice)

Bound (deterministic drafts, proven): the emitted distribution is p with the mass of A(x) moved onto
x, so its total-variation distance to p is p(A(x)) <= delta per position. For sampled drafts the pooled
test bounds each drafted token's pooled-vs-target TVD by delta, but not the aggregate over drafts.
With delta = 0 (or lambda = 1, or k = 0) the rule equals the exact rule decision for decision, and it
never accepts less than the exact rule on the same uniforms.
"""

from __future__ import annotations

import torch

from ..errors import MMSpecError
from .rule import AcceptRule
from .types import Judgement


class LatentNeighbourRule(AcceptRule):
    """LANTERN (``delta``) or LANTERN++ (``lam``) relaxed acceptance over latent neighbours."""

    lossless = False

    def __init__(self, neighbours: torch.Tensor, delta: float | None = None, *, lam: float | None = None):
        if neighbours.dim() != 2 or neighbours.dtype != torch.long:
            raise MMSpecError(f"neighbours must be a long tensor [V, k], got {tuple(neighbours.shape)} {neighbours.dtype}")
        if (delta is None) == (lam is None):
            raise MMSpecError("give exactly one of delta (LANTERN) or lam (LANTERN++)")
        if delta is not None and not 0.0 <= delta <= 1.0:
            raise MMSpecError(f"delta must be in [0, 1], got {delta!r}")
        if lam is not None and lam < 1.0:
            raise MMSpecError(f"lam must be >= 1, got {lam!r}")
        self.neighbours, self.delta, self.lam = neighbours, delta, lam

    @property
    def bound(self) -> float | None:
        """Per-position total-variation bound for deterministic drafts (LANTERN's delta)."""
        return self.delta

    def _mode(self) -> tuple[str, float]:
        return ("lantern", float(self.delta)) if self.delta is not None else ("lantern++", float(self.lam))

    def _check(self, target_probs: torch.Tensor) -> None:
        V = target_probs.shape[-1]
        if self.neighbours.shape[0] != V:
            raise MMSpecError(f"neighbour table covers {self.neighbours.shape[0]} tokens but the vocabulary has {V}")

    def pooled(self, draft_tokens: torch.Tensor, target_probs: torch.Tensor):
        """(p_x [B, k], pooled mass p~(x) [B, k], neighbour ids [B, k, K], in-A mask [B, k, K])."""
        from mmspec.kernels import pooled_acceptance

        self._check(target_probs)
        table = self.neighbours.to(draft_tokens.device)
        mode, param = self._mode()
        _, pooled, n = pooled_acceptance(mode, draft_tokens, None, target_probs, table,
                                         torch.zeros_like(target_probs[..., 0]), param)
        nbr = table[draft_tokens]  # [B, k, K]
        in_a = torch.arange(nbr.shape[-1], device=nbr.device) < n.unsqueeze(-1)
        p_x = target_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        return p_x, pooled, nbr, in_a

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms) -> Judgement:
        from mmspec.kernels import pooled_acceptance

        self._check(target_probs)
        table = self.neighbours.to(draft_tokens.device)
        q_x = None if draft_probs is None else draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        mode, param = self._mode()
        accepted, _, n = pooled_acceptance(mode, draft_tokens, q_x, target_probs, table, uniforms, param)
        nbr = table[draft_tokens]  # [B, k, K]
        in_a = torch.arange(nbr.shape[-1], device=nbr.device) < n.unsqueeze(-1)  # [B, k, K]
        x = draft_tokens.unsqueeze(-1)
        zero_at = torch.cat([x, torch.where(in_a, nbr, x)], dim=-1)  # x and A(x)
        if draft_probs is None:
            residual = target_probs.scatter(-1, zero_at, 0.0)
        else:
            q_zeroed = torch.where(in_a.any(dim=-1, keepdim=True), draft_probs.scatter(-1, zero_at, 0.0), draft_probs)
            residual = (target_probs - q_zeroed).clamp_min(0.0)
        return Judgement(accepted=accepted, residual=residual)

    def __repr__(self) -> str:
        arg = f"delta={self.delta}" if self.delta is not None else f"lam={self.lam}"
        return f"LatentNeighbourRule(k={self.neighbours.shape[1]}, {arg})"
