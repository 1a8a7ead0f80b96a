"""Lossless tree-acceptance rules: which child of the current node to accept, sibling by sibling.

Papers: Miao et al., "SpecInfer: Accelerating Large Language Model Serving with Tree-based
Speculative Inference and Verification" (ASPLOS 2024) for multi-draft recursive rejection
sampling of i.i.d. children; Jeon et al., "Recursive Speculative Decoding: Accelerating LLM
Inference via Sampling Without Replacement" (2024) and Chen et al., "Sequoia: Scalable, Robust,
and Hardware-aware Speculative Decoding" (2024) for children drawn without replacement and for
deterministic (top-k) children.

Glossary (per row, at the *current node* of the walk; the walk itself is
:func:`mmspec.verify.tree.walk_tree`):
    p_j        the distribution sibling j is judged against: the target at the node for the
               first sibling, then the normalised residual left by the rejected siblings
    q_j        the distribution sibling j was drawn from, as the rule sees it: the drafter's q
               (i.i.d.), q with the earlier siblings' tokens zeroed and renormalised (without
               replacement), or one-hot at the drafted token (deterministic children, q = 1)
    accept     u * q_j(x) < p_j(x) and q_j(x) > 0, i.e. with probability min(1, p_j(x) / q_j(x))
    reject     p_{j+1} = norm(max(p_j - q_j, 0)); for one-hot q_j that is p_j with x zeroed, so a
               duplicate deterministic child has p(x) = 0 and is always rejected
    emit       after the last rejected sibling the token is drawn from the residual; at a node
               whose children were never tried (a leaf, or an accepted node without real children)
               it is drawn from the target there (the bonus token)
    mass       float32 normaliser of the residual: the float64 sum of its entries, cast once;
               a fresh node has mass 1 and its target is used unchanged, so a chain of single
               children reproduces :class:`~mmspec.verify.exact.ExactRule` bit for bit
    empty      a residual of zero mass (rejections of tokens with q = 0, rounding) falls back to the
               target at the node, as the chain walk does

The rules are strategy objects; ``fused_mode`` names the branch of the fused tree kernel
(:mod:`mmspec.kernels.tree_verify`) that implements the same decisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from ..sampling import sample_from_weights


class SiblingState(NamedTuple):
    """Where the walk stands at the current node of every row.

    target:   float [B, V]  target distribution (greedy: scores) at the current node
    residual: float [B, V]  unnormalised p_j the next sibling is judged against (== target until a
                            sibling is rejected)
    mass:     float [B]     normaliser of ``residual`` (1 at a fresh node)
    tried:    bool  [B, V]  tokens of the siblings already rejected at the current node
    """

    target: torch.Tensor
    residual: torch.Tensor
    mass: torch.Tensor
    tried: torch.Tensor


def start_node(target: torch.Tensor) -> SiblingState:
    """Fresh state at a node whose target distribution is ``target`` float [B, V]."""
    batch, vocab = target.shape
    return SiblingState(
        target=target,
        residual=target,
        mass=torch.ones(batch, dtype=torch.float32, device=target.device),
        tried=torch.zeros((batch, vocab), dtype=torch.bool, device=target.device),
    )


def pick_at(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """values[b, tokens[b]]: float [B, V], long [B] -> float [B]."""
    return values.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sum_mass(weights: torch.Tensor) -> torch.Tensor:
    """float32 [B] mass of non-negative ``weights`` [B, V]: summed in float64, cast once."""
    return weights.sum(dim=-1, dtype=torch.float64).to(torch.float32)


class TreeRule(ABC):
    """Strategy object judging the children of the current node one sibling at a time.

    Attributes:
        fused_mode: branch of the fused tree kernel with the same decisions (``"greedy"``,
            ``"iid"``, ``"without_replacement"``, ``"deterministic"``) or ``None`` (only the
            generic walk can run the rule).
        lossless: whether the emitted tokens provably follow the target distribution.
    """

    fused_mode: str | None = None
    lossless: bool = False

    @abstractmethod
    def judge(
        self,
        state: SiblingState,
        tokens: torch.Tensor,  # long [B]: the sibling's drafted token (clamped into [0, V))
        draft_probs: torch.Tensor | None,  # float [B, V] | None: q the sibling was drawn from
        uniforms: torch.Tensor,  # float [B]
    ) -> torch.Tensor:
        """bool [B]: accept the sibling."""

    @abstractmethod
    def reject(self, state: SiblingState, tokens: torch.Tensor, draft_probs: torch.Tensor | None) -> SiblingState:
        """State after the sibling drafting ``tokens`` [B] was rejected."""

    def emit(self, state: SiblingState, noise: torch.Tensor) -> torch.Tensor:
        """long [B]: the recovered or bonus token, drawn from the residual with Exp noise [B, V]."""
        return sample_from_weights(state.residual, noise)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}()"


class GreedyTreeRule(TreeRule):
    """Accept the child equal to argmax of the target at the node (first index on ties); emit the
    argmax where the walk stops. Token-identical to the target's greedy decoding."""

    fused_mode = "greedy"
    lossless = True

    def judge(self, state, tokens, draft_probs, uniforms):
        return tokens == state.target.argmax(dim=-1)

    def reject(self, state, tokens, draft_probs):
        return state

    def emit(self, state, noise):
        return state.target.argmax(dim=-1)


class RecursiveRejectionRule(TreeRule):
    """Recursive rejection sampling over siblings; subclasses say what q_j is."""

    lossless = True

    @abstractmethod
    def sibling_draft(self, state: SiblingState, tokens: torch.Tensor, draft_probs: torch.Tensor | None) -> torch.Tensor:
        """q_j float [B, V]: the distribution the sibling was drawn from given the earlier siblings."""

    def judge(self, state, tokens, draft_probs, uniforms):
        q_x = pick_at(self.sibling_draft(state, tokens, draft_probs), tokens)  # [B]
        p_x = pick_at(state.residual, tokens) / state.mass  # [B]
        return (uniforms * q_x < p_x) & (q_x > 0)

    def reject(self, state, tokens, draft_probs):
        q_j = self.sibling_draft(state, tokens, draft_probs)  # [B, V]
        residual = (state.residual / state.mass.unsqueeze(-1) - q_j).clamp_min(0.0)  # [B, V]
        mass = sum_mass(residual)  # [B]
        empty = mass <= 0
        return SiblingState(
            target=state.target,
            residual=torch.where(empty.unsqueeze(-1), state.target, residual),
            mass=torch.where(empty, torch.ones_like(mass), mass),
            tried=state.tried.scatter(-1, tokens.unsqueeze(-1), True),
        )


def make_one_hot_draft(state: SiblingState, tokens: torch.Tensor) -> torch.Tensor:
    """float [B, V] one-hot at ``tokens`` [B]: the q of a deterministic child."""
    return torch.nn.functional.one_hot(tokens, state.target.shape[-1]).to(torch.float32)


class SpecInferTreeRule(RecursiveRejectionRule):
    """Children drawn i.i.d. (each from its own ``draft_probs`` row; siblings usually share it).

    Without ``draft_probs`` (a deterministic drafter) q is one-hot, which is
    :class:`DeterministicTreeRule`."""

    fused_mode = "iid"

    def sibling_draft(self, state, tokens, draft_probs):
        return make_one_hot_draft(state, tokens) if draft_probs is None else draft_probs


class WithoutReplacementTreeRule(RecursiveRejectionRule):
    """Children drawn without replacement from one q shared by the siblings: q_j is q with the
    rejected siblings' tokens zeroed and renormalised (q itself, unchanged, for the first sibling).

    Without ``draft_probs`` q is one-hot, which is :class:`DeterministicTreeRule`."""

    fused_mode = "without_replacement"

    def sibling_draft(self, state, tokens, draft_probs):
        if draft_probs is None:
            return make_one_hot_draft(state, tokens)
        kept = draft_probs.masked_fill(state.tried, 0.0)  # [B, V]
        any_tried = state.tried.any(dim=-1)  # [B]
        mass = torch.where(any_tried, sum_mass(kept), torch.ones_like(state.mass))  # [B]
        safe = torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(-1)
        return torch.where((mass > 0).unsqueeze(-1), kept / safe, torch.zeros_like(kept))


class DeterministicTreeRule(RecursiveRejectionRule):
    """Deterministic children (top-k, prompt lookup): q = 1, so accept x with probability p_j(x)
    and zero x on rejection. ``draft_probs`` is ignored."""

    fused_mode = "deterministic"

    def sibling_draft(self, state, tokens, draft_probs):
        return make_one_hot_draft(state, tokens)
