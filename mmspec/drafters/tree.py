"""Draft trees from any model drafter: static top-k trees (Medusa-style) and EAGLE-2 dynamic trees.

Papers: Cai et al., "Medusa" (ICML 2024) for static trees of top-k choices; Li et al., "EAGLE-2:
Faster Inference of Language Models with Dynamic Draft Trees" (EMNLP 2024) for dynamic expansion;
Miao et al., SpecInfer (ASPLOS 2024) for verifying a tree in one target forward.

Glossary:
    node        a drafted token with a parent (-1: child of the root, i.e. of the pending token);
                nodes are listed in order of depth, so a row's first n nodes are its shallowest
    StaticTree  ``branching[d]`` children per node at depth d + 1 (the top-``branching[d]`` tokens of
                the drafter's distribution at the parent); every node of depth < D is expanded
    DynamicTree EAGLE-2: at each depth the ``top_k`` frontier nodes with the highest cumulative
                log-probability (the drafter's confidence in the whole path) are expanded with their
                ``top_k`` children; after ``depth`` levels every candidate is reranked by cumulative
                log-probability and the best ``num_nodes`` are kept (a child never outranks its parent,
                so the kept set is a tree)
    expand      one drafter forward per depth over the nodes being expanded (the drafter's cache
                holds them as tree slots, :meth:`~mmspec.cache.CacheSession.extend_tree`)
    top-k children  deterministic given the context, so the tree is verified with the
                :class:`~mmspec.verify.tree_rules.DeterministicTreeRule` (q = 1; lossless for any
                drafter) or greedily at temperature 0

After verification the drafter keeps the accepted path's nodes it had fed (a prefix of the path) in
contiguous cache slots and feeds the rest of the committed tokens next step, like the chain drafter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..cache import right_align
from ..errors import InvalidDraftLengthError
from ..sampling import logits_to_probs
from ..verify.tree_rules import DeterministicTreeRule
from .base import Draft, StepOutcome, widest_budget

if TYPE_CHECKING:  # the drafters whose hooks the proposal calls (they import this module)
    from .model import ModelDrafter


@dataclass(frozen=True)
class StaticTree:
    branching: tuple[int, ...] = (3, 2, 2, 1)

    def __post_init__(self) -> None:
        if not self.branching or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.branching):
            raise InvalidDraftLengthError(f"branching must be a non-empty tuple of ints >= 1, got {self.branching!r}")

    @property
    def depth(self) -> int:
        return len(self.branching)


@dataclass(frozen=True)
class DynamicTree:
    depth: int = 5
    top_k: int = 8
    num_nodes: int = 63
    #: a measured :class:`~mmspec.drafters.cost_model.CostModel`: each step keeps the n <= num_nodes best
    #: nodes that maximise expected tokens per unit of time (None: always num_nodes)
    cost_model: Any = None

    def __post_init__(self) -> None:
        for name in ("depth", "top_k", "num_nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidDraftLengthError(f"{name} must be an int >= 1, got {v!r}")
        if self.cost_model is not None and not hasattr(self.cost_model, "best_num_nodes"):
            raise TypeError(f"cost_model must be a CostModel, got {type(self.cost_model).__name__}")


def ranking_distribution(drafter: ModelDrafter, logits: torch.Tensor) -> torch.Tensor:
    """Processed drafter distribution used to pick children (plain softmax when greedy)."""
    if drafter.sampling.is_greedy:
        return logits.float().softmax(dim=-1)
    return logits_to_probs(logits, drafter.sampling)


@torch.no_grad()
def propose_tree(drafter: ModelDrafter, tree: StaticTree | DynamicTree, max_tokens: torch.Tensor | int) -> Draft:
    """One draft tree per row from ``drafter``'s model and session (see the module glossary)."""
    s = drafter.session
    assert s is not None
    depth_limit = max(1, min(tree.depth, widest_budget(max_tokens)))
    batch = drafter.tree_batch  # sequences (a guided feature head's session holds two rows per sequence)
    device = s.device
    root = ranking_distribution(drafter, drafter.tree_root_logits())
    s.begin_tree()
    # per row: node tokens, parents (node ids), cumulative log-probs, depth, drafter slot (-1: not fed)
    tokens = torch.zeros((batch, 0), dtype=torch.long, device=device)
    parents = torch.zeros((batch, 0), dtype=torch.long, device=device)
    scores = torch.zeros((batch, 0), dtype=torch.float64, device=device)
    depths = torch.zeros((batch, 0), dtype=torch.long, device=device)
    slot = torch.zeros((batch, 0), dtype=torch.long, device=device)
    front_dist = root.unsqueeze(1)  # [B, F, V]
    front_ids = torch.full((batch, 1), -1, dtype=torch.long, device=device)  # node ids (-1: the root)
    front_scores = torch.zeros((batch, 1), dtype=torch.float64, device=device)
    fed = 0
    for d in range(depth_limit):
        c = tree.branching[d] if isinstance(tree, StaticTree) else tree.top_k
        c = min(c, front_dist.shape[-1])
        top = front_dist.topk(c, dim=-1)  # [B, F, c]
        f = front_ids.shape[1]
        child_tok = drafter.to_target_ids(top.indices.reshape(batch, f * c))
        child_par = front_ids.repeat_interleave(c, dim=1)
        child_score = (front_scores.unsqueeze(-1) + top.values.double().clamp_min(1e-300).log()).reshape(batch, f * c)
        first = tokens.shape[1]
        tokens = torch.cat([tokens, child_tok], dim=1)
        parents = torch.cat([parents, child_par], dim=1)
        scores = torch.cat([scores, child_score], dim=1)
        depths = torch.cat([depths, torch.full_like(child_tok, d + 1)], dim=1)
        slot = torch.cat([slot, torch.full_like(child_tok, -1)], dim=1)
        if d == depth_limit - 1:
            break
        # the next frontier: every child (static) or the top_k children by path score (EAGLE-2)
        if isinstance(tree, StaticTree):
            pick = torch.arange(f * c, device=device).expand(batch, -1)
        else:
            pick = child_score.topk(min(tree.top_k, f * c), dim=1).indices.sort(dim=1).values
        ids = first + pick  # [B, F'] node ids
        par_ids = parents.gather(1, ids)
        par_slot = torch.where(par_ids >= 0, slot.gather(1, par_ids.clamp_min(0)), torch.full_like(par_ids, -1))
        logits = drafter.tree_expand(tokens.gather(1, ids), par_slot)  # [B, F', V]
        slot.scatter_(1, ids, fed + torch.arange(ids.shape[1], device=device).expand(batch, -1))
        fed += ids.shape[1]
        front_ids, front_scores = ids, scores.gather(1, ids)
        front_dist = ranking_distribution(drafter, logits)
    if isinstance(tree, DynamicTree):
        keep = min(tree.num_nodes, tokens.shape[1])
        if tree.cost_model is not None:
            best = scores.topk(keep, dim=1).values.exp().float()  # [B, keep] path probabilities
            keep = tree.cost_model.best_num_nodes(best, depth_limit)
        if tokens.shape[1] > keep:
            tokens, parents, depths, slot = rerank_nodes(keep, tokens, parents, scores, depths, slot)
    drafter._tree_slot = slot
    n = tokens.shape[1]
    return Draft(tokens=tokens, probs=None, num_draft=torch.full((batch,), n, dtype=torch.long, device=device),
                 parents=parents, tree_rule=DeterministicTreeRule())


def rerank_nodes(m: int, tokens, parents, scores, depths, slot):
    """EAGLE-2's rerank: keep the best ``m`` nodes by path score (ties: shallower first), listed by depth."""
    batch, n = tokens.shape
    device = tokens.device
    key = scores - depths.double() * 1e-9 - torch.arange(n, device=device).double() * 1e-12
    keep = key.topk(m, dim=1).indices  # [B, m]
    order = (depths.gather(1, keep) * (n + 1) + keep).argsort(dim=1)  # by depth, then old id
    keep = keep.gather(1, order)
    new_id = torch.full((batch, n), -1, dtype=torch.long, device=device)
    new_id.scatter_(1, keep, torch.arange(m, device=device).expand(batch, -1))
    old_par = parents.gather(1, keep)
    new_par = torch.where(old_par >= 0, new_id.gather(1, old_par.clamp_min(0)), old_par)
    return tokens.gather(1, keep), new_par, depths.gather(1, keep), slot.gather(1, keep)


def observe_tree(drafter: ModelDrafter, outcome: StepOutcome) -> None:
    """Keep the accepted nodes the drafter fed (a prefix of the path); the rest become pending."""
    s = drafter.session
    assert s is not None
    nodes = outcome.result.accepted_nodes  # [B, D]
    n = outcome.result.num_accepted
    slot = drafter._tree_slot
    if outcome.draft.k > slot.shape[1]:  # nodes grafted after the drafter's own (a hybrid draft) were never fed
        slot = torch.cat([slot, slot.new_full((slot.shape[0], outcome.draft.k - slot.shape[1]), -1)], dim=1)
    slots = torch.where(nodes >= 0, slot.gather(1, nodes.clamp_min(0)), torch.full_like(nodes, -1))
    fed_prefix = (slots >= 0) & (torch.arange(nodes.shape[1], device=nodes.device) < n.unsqueeze(1))
    kept = fed_prefix.long().cumprod(dim=1).sum(dim=1) if nodes.shape[1] else torch.zeros_like(n)
    s.keep_path(slots, kept)
    rest = [row[m:] for row, m in zip(outcome.committed, kept.tolist())]
    drafter.pending, drafter.pending_valid = right_align(rest, drafter.pending.device)

