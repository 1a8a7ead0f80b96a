"""Draft-tree verification: walk from the root, accept at most one child per level.

Papers: Miao et al., SpecInfer (ASPLOS 2024) for the tree walk with multi-draft recursive
rejection sampling; the per-sibling rules are in :mod:`mmspec.verify.tree_rules`.

Glossary (B rows, N drafted nodes per row, V tokens):
    node i       drafted token ``draft_tokens[b, i]``; nodes are in topological order
    parents      long [B, N]: ``parents[b, i]`` is the parent of node i, ``ROOT_PARENT`` (-1) for a
                 child of the root, always < i; a chain is ``parents[i] = i - 1``
    num_draft    long [B]: nodes ``>= num_draft[b]`` are padding, ignored completely (their ids and
                 parents may be anything: nothing is gathered by them)
    target       float [B, N+1, V]: row 0 is the target's distribution at the root (after the pending
                 token), row i+1 the one after node i (greedy: scores, only the argmax matters)
    draft_probs  float [B, N, V] | None: ``draft_probs[b, i]`` is the drafter's processed distribution
                 at node i's *parent*, i.e. the one node i was drawn from (siblings share it);
                 ``None`` for a deterministic drafter
    uniforms     float [B, N]: one uniform per node, used when that node is tried (zeros for greedy)
    noise        float [B, V]: Exp(1) noise of the exponential race ``argmax(w / noise)`` drawing the
                 single sampled token of a row (ones for greedy), as in :mod:`mmspec.sampling`
    depth        root children have depth 1; D = the deepest real node of the batch
    accepted     the root-to-node path of accepted nodes (``accepted_nodes``)
    emitted      the accepted path's tokens then the recovered or bonus token (``tokens``)

The walk visits the nodes once in index order: a node is *tried* when it is real and its parent is
the row's current node. Siblings are thus tried in index order, an accepted node becomes the current
node (its children all come later), and a rejected node's subtree is never tried.

Validation (shapes, ``parents`` order, draft ids, finiteness) and sizing the data-dependent output
width D + 1 share one host synchronisation; the walk itself has none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import SamplingParams
from ..errors import NonFiniteError, ShapeError, TokenIdError
from .chain import prepare_verification
from .tree_rules import DeterministicTreeRule, GreedyTreeRule, SiblingState, SpecInferTreeRule, TreeRule, start_node
from .types import PLACEHOLDER_TOKEN_ID

#: ``parents`` entry of a child of the root.
ROOT_PARENT: int = -1


class TreeVerifyResult(NamedTuple):
    """Outcome of verifying one draft tree per row.

    num_accepted:   long [B]       depth of the accepted path (0..D)
    tokens:         long [B, D+1]  accepted path's tokens, then the recovered or bonus token, then
                                   ``PLACEHOLDER_TOKEN_ID``
    accepted_nodes: long [B, D]    draft indices of the accepted path (root child first), then
                                   ``PLACEHOLDER_TOKEN_ID``; compacts the accepted KV-cache slots
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    accepted_nodes: torch.Tensor

    @property
    def num_emitted(self) -> torch.Tensor:
        """long [B]: accepted + 1."""
        return self.num_accepted + 1


def default_tree_rule(sampling: SamplingParams, draft_probs: torch.Tensor | None) -> TreeRule:
    """Greedy for greedy sampling; SpecInfer i.i.d. children with draft probabilities, else
    deterministic children."""
    if sampling.is_greedy:
        return GreedyTreeRule()
    return SpecInferTreeRule() if draft_probs is not None else DeterministicTreeRule()


def mask_real_nodes(num_draft: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """bool [B, N]: node i of row b is a real draft (i < num_draft[b])."""
    return torch.arange(num_nodes, device=num_draft.device) < num_draft.unsqueeze(1)


def compute_depths(parents: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """long [B, N]: depth of every real node (root children: 1), 0 for padding.

    Pointer jumping, log2 N steps. A real node whose parent breaks -1 <= parents[b, i] < i is counted
    as a child of the root (validation rejects such trees).
    """
    batch, n = parents.shape
    real = mask_real_nodes(num_draft, n)  # [B, N]
    ordered = (parents >= 0) & (parents < torch.arange(n, device=parents.device))  # [B, N]
    root = torch.full((batch, 1), n, dtype=torch.long, device=parents.device)  # column n: the root
    up = torch.cat([torch.where(real & ordered, parents, root), root], dim=1)  # [B, N+1]
    depth = torch.cat([real.long(), torch.zeros_like(root)], dim=1)  # [B, N+1]: edges to `up`
    for _ in range(n.bit_length()):
        depth = depth + depth.gather(1, up)
        up = up.gather(1, up)
    return depth[:, :n]


def _validate_tree(draft_tokens, parents, draft_probs, target, num_draft) -> tuple[torch.Tensor, int]:
    """Raise ShapeError / TokenIdError / NonFiniteError for bad input (one host synchronisation).

    Returns ``num_draft`` long [B] (all N nodes real when it is ``None``) and the depth D of the
    deepest real node (the output width is D + 1)."""
    if draft_tokens.dim() != 2 or draft_tokens.dtype != torch.long:
        raise ShapeError(f"draft_tokens must be a long tensor [B, N], got {tuple(draft_tokens.shape)} {draft_tokens.dtype}")
    batch, n = draft_tokens.shape
    if num_draft is None:
        num_draft = torch.full((batch,), n, dtype=torch.long, device=draft_tokens.device)
    if parents.dtype != torch.long or tuple(parents.shape) != (batch, n):
        raise ShapeError(f"parents must be a long tensor [B, N] = [{batch}, {n}], got {tuple(parents.shape)} {parents.dtype}")
    if target.dim() != 3 or tuple(target.shape[:2]) != (batch, n + 1):
        raise ShapeError(f"target_logits must be [B, N+1, V] = [{batch}, {n + 1}, V], got {tuple(target.shape)}")
    vocab = target.shape[-1]
    if draft_probs is not None and tuple(draft_probs.shape) != (batch, n, vocab):
        raise ShapeError(f"draft_probs must be [B, N, V] = [{batch}, {n}, {vocab}], got {tuple(draft_probs.shape)}")
    if num_draft.dtype != torch.long or tuple(num_draft.shape) != (batch,):
        raise ShapeError(f"num_draft must be a long tensor [B] = [{batch}], got {tuple(num_draft.shape)} {num_draft.dtype}")
    for name, t in (("draft_tokens", draft_tokens), ("parents", parents), ("draft_probs", draft_probs),
                    ("num_draft", num_draft)):
        if t is not None and t.device != target.device:
            raise ShapeError(f"{name} is on {t.device} but target_logits is on {target.device}")
    real = mask_real_nodes(num_draft, n)  # [B, N]
    real_rows = mask_real_nodes(num_draft + 1, n + 1)  # [B, N+1]: the root's row and the real nodes' rows
    cols = torch.arange(n, device=target.device)
    depth = compute_depths(parents, num_draft.clamp(0, n))  # [B, N]
    flags = torch.stack([
        ((num_draft < 0) | (num_draft > n)).any(),
        (real & ((parents < ROOT_PARENT) | (parents >= cols))).any(),
        (real & ((draft_tokens < 0) | (draft_tokens >= vocab))).any(),
        (real_rows.unsqueeze(-1) & (torch.isnan(target) | torch.isposinf(target))).any(),
        depth.max() if n > 0 else torch.zeros((), dtype=torch.long, device=target.device),
    ]).tolist()
    if flags[0]:
        raise ShapeError(f"num_draft must lie in [0, N] = [0, {n}], got {num_draft.tolist()}")
    if flags[1]:
        raise ShapeError("parents must be topologically ordered: -1 <= parents[b, i] < i for every real node")
    if flags[2]:
        raise TokenIdError(f"drafted token ids must lie in [0, V) = [0, {vocab}) for the real nodes")
    if flags[3]:
        raise NonFiniteError("target logits/probabilities contain NaN or +inf (at the root or a real node)")
    return num_draft, int(flags[4])


def _select(mask: torch.Tensor, a: SiblingState, b: SiblingState) -> SiblingState:
    """Rows where mask [B] holds take ``a``, the others ``b``."""
    return SiblingState(*(torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x, y) for x, y in zip(a, b)))


def walk_tree(
    rule: TreeRule,
    draft_tokens: torch.Tensor,  # long [B, N]
    parents: torch.Tensor,  # long [B, N]
    draft_probs: torch.Tensor | None,  # float [B, N, V] | None
    target: torch.Tensor,  # float [B, N+1, V]
    uniforms: torch.Tensor,  # float [B, N]
    noise: torch.Tensor,  # float [B, V]
    num_draft: torch.Tensor,  # long [B]
    max_depth: int,
) -> TreeVerifyResult:
    """Generic walk for any :class:`TreeRule` (validated input; batch-vectorised, loops over N)."""
    batch, n = draft_tokens.shape
    vocab = target.shape[-1]
    device = target.device
    cur = torch.full((batch,), ROOT_PARENT, dtype=torch.long, device=device)  # current node
    depth = torch.zeros(batch, dtype=torch.long, device=device)
    state = start_node(target[:, 0])
    nodes = torch.full((batch, max_depth), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device)
    tokens = torch.full((batch, max_depth + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device)
    slots = torch.arange(max_depth + 1, device=device)
    for i in range(n):
        live = (i < num_draft) & (parents[:, i] == cur)  # [B]: node i is tried in this row
        x = draft_tokens[:, i].clamp(0, vocab - 1)  # clamped: a padding id is never gathered by
        q = None if draft_probs is None else draft_probs[:, i]
        accept = live & rule.judge(state, x, q, uniforms[:, i])
        state = _select(live & ~accept, rule.reject(state, x, q), state)
        state = _select(accept, start_node(target[:, i + 1]), state)
        here = accept.unsqueeze(1) & (slots == depth.unsqueeze(1))  # [B, D+1]
        tokens = torch.where(here, x.unsqueeze(1), tokens)
        nodes = torch.where(here[:, :max_depth], i, nodes)
        depth = depth + accept.long()
        cur = torch.where(accept, i, cur)
    final = rule.emit(state, noise)  # [B]
    tokens = tokens.scatter(1, depth.unsqueeze(1), final.unsqueeze(1))
    return TreeVerifyResult(num_accepted=depth, tokens=tokens, accepted_nodes=nodes)


def verify_tree_probs(
    draft_tokens: torch.Tensor,  # long [B, N]
    parents: torch.Tensor,  # long [B, N]
    draft_probs: torch.Tensor | None,  # float [B, N, V] | None
    target_probs: torch.Tensor,  # float [B, N+1, V]
    rule: TreeRule,
    uniforms: torch.Tensor,  # float [B, N]
    noise: torch.Tensor,  # float [B, V]
    num_draft: torch.Tensor | None = None,  # long [B]
    *,
    backend: str | None = None,
) -> TreeVerifyResult:
    """Verify draft trees with processed distributions and explicit randomness (deterministic).

    ``backend``: ``None`` (dispatch: Triton on CUDA for fused rules, otherwise the kernel's torch
    reference), ``"triton"``, ``"torch"`` or ``"generic"`` (:func:`walk_tree` with the rule's own
    methods; the only option for rules without ``fused_mode``).
    """
    num_draft, max_depth = _validate_tree(draft_tokens, parents, draft_probs, target_probs, num_draft)
    batch, n = draft_tokens.shape
    for name, t, shape in (("uniforms", uniforms, (batch, n)), ("noise", noise, (batch, target_probs.shape[-1]))):
        if tuple(t.shape) != shape:
            raise ShapeError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
    return _verify_valid_tree(draft_tokens, parents, draft_probs, target_probs, rule, uniforms, noise, num_draft,
                              max_depth, backend)


def _verify_valid_tree(draft_tokens, parents, draft_probs, target_probs, rule, uniforms, noise, num_draft,
                       max_depth, backend) -> TreeVerifyResult:
    """verify_tree_probs after validation: the fused kernel or the generic walk."""
    if rule.fused_mode is not None and backend != "generic":
        from mmspec.kernels import tree_verify

        tokens, nodes, num_accepted = tree_verify(
            rule.fused_mode, draft_tokens, parents, num_draft, draft_probs, target_probs, uniforms, noise,
            max_depth, backend=backend,
        )
        return TreeVerifyResult(num_accepted=num_accepted, tokens=tokens, accepted_nodes=nodes)
    return walk_tree(rule, draft_tokens, parents, draft_probs, target_probs, uniforms, noise, num_draft, max_depth)


def verify_tree(
    draft_tokens: torch.Tensor,  # long [B, N]
    parents: torch.Tensor,  # long [B, N]
    draft_probs: torch.Tensor | None,  # float [B, N, V] | None (processed, at each node's parent)
    target_logits: torch.Tensor,  # float [B, N+1, V] (raw target logits)
    rule: TreeRule | None = None,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    *,
    num_draft: torch.Tensor | None = None,  # long [B]
    backend: str | None = None,
    uniforms: torch.Tensor | None = None,  # float [B, N]
    noise: torch.Tensor | None = None,  # float [B, V]
) -> TreeVerifyResult:
    """Verify one draft tree per row against the target's logits (``uniforms`` / ``noise``: explicit
    randomness, e.g. the decoding loop's per-row keyed numbers; else drawn from ``generator``).

    The logits are processed with ``sampling`` exactly as the non-speculative sampler would; every
    lossless rule reduces to :class:`GreedyTreeRule` at temperature 0. Randomness (uniforms [B, N],
    then noise [B, V], the order :func:`~mmspec.verify.chain.verify_chain` draws them in) comes only
    from ``generator``.
    """
    num_draft, max_depth = _validate_tree(draft_tokens, parents, draft_probs, target_logits, num_draft)
    rule = rule if rule is not None else default_tree_rule(sampling, draft_probs)
    prep = prepare_verification(target_logits, draft_probs, sampling, rule.lossless, draft_tokens.shape[1],
                                uniforms, noise, generator)
    rule = GreedyTreeRule() if prep.greedy else rule  # every lossless rule reduces to greedy at temperature 0
    draft_probs, target, uniforms, noise = prep.draft_probs, prep.target, prep.uniforms, prep.noise
    return _verify_valid_tree(draft_tokens, parents, draft_probs, target, rule, uniforms, noise, num_draft, max_depth,
                              backend)
