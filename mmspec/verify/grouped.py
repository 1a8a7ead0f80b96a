"""Grouped acceptance (GSD): a drafted image token is judged together with the visually interchangeable tokens
around it.

Paper: So, Shin, Kook, Park, "Grouped Speculative Decoding for Autoregressive Image Generation" (ICCV 2025,
arXiv 2508.07747); the reference implementation (github.com/junhyukso/GSD) builds on SJD's Jacobi drafts.

Glossary:
    x            the drafted token; p, q its position's target and draft distributions [V]
    candidates   x's ``k`` nearest codebook neighbours (a row of the latent-neighbour table): the static part
                 of the group (the reference filters by an embedding distance)
    dynamic      a candidate y joins the group only if the target ranks it close to x (|rank_p(y) - rank_p(x)|
                 <= ``window``) and gives it a similar probability (|p(y) - p(x)| < ``p_similar``): the
                 paper's observation that static clusters by embedding distance alone are ineffective
    G(x)         {x} and the candidates that pass both filters
    accept       u < min(1, p(G(x)) / q(G(x)))  (with G(x) = {x} this is the exact rule)
    residual     max(0, p - q), as the exact rule (and the reference implementation)

Not lossless and without a bound: within a group the emitted token follows q, not p. Whether the images stay
within plain AR's noise floor is measured (``benchmarks.image_gen``, :mod:`mmspec.zoo.distribution`).
"""

from __future__ import annotations

import torch

from ..errors import MMSpecError
from .rule import AcceptRule
from .types import Judgement

#: the reference implementation's filters
DEFAULT_WINDOW = 7
DEFAULT_P_SIMILAR = 0.15


def group_mask(draft_tokens: torch.Tensor, target_probs: torch.Tensor, neighbours: torch.Tensor, window: int,
               p_similar: float) -> torch.Tensor:
    """bool [B, k, K]: which of each drafted token's K candidates (``neighbours[x]``) join its group."""
    nbr = neighbours[draft_tokens]  # [B, k, K]
    order = target_probs.argsort(dim=-1, descending=True, stable=True)  # [B, k, V]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())  # [B, k, V]: token -> its rank
    r_x = rank.gather(-1, draft_tokens.unsqueeze(-1))  # [B, k, 1]
    p_x = target_probs.gather(-1, draft_tokens.unsqueeze(-1))  # [B, k, 1]
    close_rank = (rank.gather(-1, nbr) - r_x).abs() <= window  # [B, k, K]
    close_p = (target_probs.gather(-1, nbr) - p_x).abs() < p_similar  # [B, k, K]
    return close_rank & close_p & (nbr != draft_tokens.unsqueeze(-1))


class GroupedRule(AcceptRule):
    """GSD's grouped acceptance over latent-neighbour candidates (see the module glossary)."""

    lossless = False

    def __init__(self, neighbours: torch.Tensor, window: int = DEFAULT_WINDOW, p_similar: float = DEFAULT_P_SIMILAR):
        if neighbours.dim() != 2 or neighbours.dtype != torch.long:
            raise MMSpecError(f"neighbours must be a long tensor [V, k], got {tuple(neighbours.shape)} {neighbours.dtype}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise MMSpecError(f"window must be an int >= 0, got {window!r}")
        if not 0.0 <= p_similar <= 1.0:
            raise MMSpecError(f"p_similar must be in [0, 1], got {p_similar!r}")
        self.neighbours, self.window, self.p_similar = neighbours, window, float(p_similar)

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms) -> Judgement:
        if self.neighbours.shape[0] != target_probs.shape[-1]:
            raise MMSpecError(f"neighbour table covers {self.neighbours.shape[0]} tokens but the vocabulary has "
                              f"{target_probs.shape[-1]}")
        table = self.neighbours.to(draft_tokens.device)
        q = (torch.nn.functional.one_hot(draft_tokens, target_probs.shape[-1]).to(target_probs.dtype)
             if draft_probs is None else draft_probs)  # [B, k, V]
        member = group_mask(draft_tokens, target_probs, table, self.window, self.p_similar)  # [B, k, K]
        nbr = table[draft_tokens]  # [B, k, K]
        x = draft_tokens.unsqueeze(-1)
        p64, q64 = target_probs.double(), q.double()
        p_group = p64.gather(-1, x).squeeze(-1) + (p64.gather(-1, nbr) * member).sum(-1)  # [B, k]
        q_group = q64.gather(-1, x).squeeze(-1) + (q64.gather(-1, nbr) * member).sum(-1)  # [B, k]
        q_x = q64.gather(-1, x).squeeze(-1)
        accepted = (uniforms.double() * q_group < p_group) & (q_x > 0)
        return Judgement(accepted=accepted, residual=(target_probs - q).clamp_min(0.0))

    def __repr__(self) -> str:
        return f"GroupedRule(k={self.neighbours.shape[1]}, window={self.window}, p_similar={self.p_similar})"


__all__ = ["DEFAULT_P_SIMILAR", "DEFAULT_WINDOW", "GroupedRule", "group_mask"]
