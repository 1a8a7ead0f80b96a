"""Blockwise parallel drafts: h heads on the target's final hidden state propose a top-k lattice; the p best
paths (by the heads, or rescored by an n-gram or neural LM) are verified together as one lossless tree.

Papers: Stern et al., "Blockwise Parallel Decoding" (NeurIPS 2018); Kim et al., "Exploring and Improving Drafts
in Blockwise Parallel Decoding" (arXiv 2404.09221); verification of the candidates as one tree: SpecInfer
(Miao et al., ASPLOS 2024) with :class:`~mmspec.verify.tree_rules.DeterministicTreeRule`, lossless for greedy
and sampled decoding alike (unlike Medusa's typical acceptance, the output distribution stays the target's).

Glossary:
    final       the target's final hidden state at the last position it has read (the one before the pending
                token): after the prefill the prompt's second-to-last position, after a step the last accepted
                node's (or the pending token's when nothing was accepted); read from the verification forward,
                so drafting costs the heads only
    lattice     column i = 1..D holds head i's top-``top_k`` tokens (D = ``depth``, capped by the budget) with
                their log-probabilities (log-softmax over the draft vocabulary)
    candidates  the ``num_candidates`` best paths through the lattice by summed score (head log-probs, plus a
                rescorer's weighted log-probs, :mod:`mmspec.drafters.lattice_rescoring`), found by a beam search
                of width ``num_candidates`` (exact p-best without a rescorer: the columns are independent)
    tree        the trie of the candidates: nodes listed by depth, siblings best first; every node is a beam of
                its column, so a node's id maps to (column, beam) (``node_depth``, ``node_beam``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..config import SamplingParams
from ..errors import DeviceMismatchError, InvalidDraftLengthError, MethodParameterError, VocabularyMismatchError
from ..heads.blockwise import BlockwiseHeads
from ..rng import RowRandom
from ..verify.tree_rules import DeterministicTreeRule
from .base import Draft, Drafter, StepOutcome, widest_budget
from .lattice_rescoring import Rescorer
from .model import model_device, model_vocab_size

_FINAL = (-1,)  # HF hidden_states[-1]: the target's final (normed) hidden state


@dataclass(frozen=True)
class Lattice:
    """Shape of the blockwise draft: ``top_k`` tokens per head, ``num_candidates`` paths verified, ``depth``
    heads used (None: all)."""

    top_k: int = 4
    num_candidates: int = 4
    depth: int | None = None

    def __post_init__(self) -> None:
        for name in ("top_k", "num_candidates"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidDraftLengthError(f"{name} must be an int >= 1, got {v!r}")
        if self.depth is not None and (not isinstance(self.depth, int) or isinstance(self.depth, bool)
                                       or self.depth < 1):
            raise InvalidDraftLengthError(f"depth must be an int >= 1 or None, got {self.depth!r}")


class BeamSearch(NamedTuple):
    tokens: list[torch.Tensor]  # per column i: long [B, P_i], each beam's last token (target ids)
    parents: list[torch.Tensor]  # per column i: long [B, P_i], each beam's beam in column i - 1 (0 at column 1)
    scores: torch.Tensor  # float [B, P_D]: the final beams' scores, best first


def search_lattice(tokens: torch.Tensor, logp: torch.Tensor, width: int, rescorer: Any = None) -> BeamSearch:
    """p-best paths through a lattice.

    tokens  long [B, D, k]: column i's candidate target ids
    logp    float [B, D, k]: their head log-probabilities
    width   beams kept per column (p)
    rescorer  None, or an object with ``score(paths [B, P, i], parent_beams [B, P], candidates [B, P, k])``
            -> float [B, P, k] and ``weight``
    """
    batch, depth, k = tokens.shape
    device = tokens.device
    scores = torch.zeros((batch, 1), dtype=torch.float32, device=device)
    paths = torch.zeros((batch, 1, 0), dtype=torch.long, device=device)
    parent = torch.zeros((batch, 1), dtype=torch.long, device=device)
    out_tokens, out_parents = [], []
    for i in range(depth):
        beams = paths.shape[1]
        cand = tokens[:, i].unsqueeze(1).expand(batch, beams, k)  # [B, P, k]
        total = scores.unsqueeze(-1) + logp[:, i].unsqueeze(1).float()  # [B, P, k]
        if rescorer is not None and rescorer.weight:
            total = total + rescorer.weight * rescorer.score(paths, parent, cand).to(total)
        keep = min(width, beams * k)
        top = total.reshape(batch, beams * k).topk(keep, dim=1)  # sorted: best first
        parent = torch.div(top.indices, k, rounding_mode="floor")  # [B, P']
        tok = cand.reshape(batch, beams * k).gather(1, top.indices)
        paths = torch.cat([paths.gather(1, parent.unsqueeze(-1).expand(-1, -1, i)), tok.unsqueeze(-1)], dim=2)
        scores = top.values
        out_tokens.append(tok)
        out_parents.append(parent)
    return BeamSearch(out_tokens, out_parents, scores)


class CandidateTree(NamedTuple):
    tokens: torch.Tensor  # long [B, N]: node tokens, by depth, padded with 0
    parents: torch.Tensor  # long [B, N]: parent node id (-1: child of the root, and padding)
    num_nodes: torch.Tensor  # long [B]
    node_depth: torch.Tensor  # long [B, N]: the node's column (1-based; 0 for padding)
    node_beam: torch.Tensor  # long [B, N]: the node's beam in its column


def build_candidate_tree(search: BeamSearch) -> CandidateTree:
    """The trie of the final beams' paths: the beams of each column that are an ancestor of a final beam."""
    depth = len(search.tokens)
    batch = search.scores.shape[0]
    toks = [t.tolist() for t in search.tokens]
    pars = [p.tolist() for p in search.parents]
    rows = []
    for b in range(batch):
        used = [set() for _ in range(depth)]
        for j in range(len(toks[-1][b])):
            a = j
            for i in range(depth - 1, -1, -1):
                used[i].add(a)
                a = pars[i][b][a]
        node_of, nodes = {}, []  # (column, beam) -> node id; nodes: (token, parent id, column, beam)
        for i in range(depth):
            for a in sorted(used[i]):  # beams are best first: siblings tried best first
                node_of[(i, a)] = len(nodes)
                par = node_of[(i - 1, pars[i][b][a])] if i else -1
                nodes.append((toks[i][b][a], par, i + 1, a))
        rows.append(nodes)
    n = max(len(r) for r in rows)
    out = torch.zeros((4, batch, n), dtype=torch.long)
    out[1].fill_(-1)
    for b, nodes in enumerate(rows):
        if nodes:
            out[:, b, : len(nodes)] = torch.tensor(nodes, dtype=torch.long).T
    device = search.scores.device
    out = out.to(device)
    num = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    return CandidateTree(out[0], out[1], num, out[2], out[3])


class BlockwiseDrafter(Drafter):
    """Drafts with :class:`~mmspec.heads.blockwise.BlockwiseHeads`: ``BlockwiseDrafter(heads, Lattice(4, 4),
    rescorer=NGramRescorer(...) | NeuralRescorer(lm) | None)``."""

    hidden_layers = _FINAL

    def __init__(self, heads: BlockwiseHeads, lattice: Lattice = Lattice(), *, rescorer: Rescorer | None = None):
        if not isinstance(heads, BlockwiseHeads):
            raise TypeError(f"heads must be BlockwiseHeads, got {type(heads).__name__}")
        if not isinstance(lattice, Lattice):
            raise TypeError(f"lattice must be a Lattice, got {type(lattice).__name__}")
        if lattice.depth is not None and lattice.depth > heads.num_heads:
            raise InvalidDraftLengthError(f"depth {lattice.depth} > the {heads.num_heads} heads")
        if rescorer is not None and not isinstance(rescorer, Rescorer):
            raise TypeError(f"rescorer must be a Rescorer (NGramRescorer, NeuralRescorer), got {type(rescorer).__name__}")
        self.heads, self.lattice, self.rescorer = heads, lattice, rescorer
        self.vocab_size = heads.config.target_vocab_size
        self.depth = lattice.depth or heads.num_heads

    def check_compatible(self, target: torch.nn.Module) -> None:
        vocab = model_vocab_size(target)
        if vocab != self.vocab_size:
            raise VocabularyMismatchError(f"the heads draft for a vocabulary of {self.vocab_size}, the target has {vocab}")
        if model_device(self.heads) != model_device(target):
            raise DeviceMismatchError(f"heads are on {model_device(self.heads)} but target is on {model_device(target)}")
        if not self.heads.attached:
            self.heads.attach(target)
        if self.rescorer is not None:
            self.rescorer.check_compatible(target)

    def start(self, input_ids, attention_mask, *, sampling: SamplingParams, rng: RowRandom, guidance=None,
              **model_inputs: Any) -> None:
        if guidance is not None:
            raise MethodParameterError("blockwise heads draft text targets; classifier-free guidance is not supported")
        batch = input_ids.shape[0]
        self.device = input_ids.device
        self._mask = attention_mask
        self.final = torch.zeros((batch, self.heads.config.hidden_size), device=self.device)
        self.ready = torch.zeros((batch,), dtype=torch.bool, device=self.device)
        if self.rescorer is not None:
            self.rescorer.start(input_ids, attention_mask, sampling=sampling, rng=rng, vocab_size=self.vocab_size)

    def observe_prefill(self, target_hidden: dict[int, torch.Tensor] | None) -> None:
        mask, self._mask = self._mask, None
        if target_hidden is None or mask.shape[1] < 2:
            return
        self.final = target_hidden[-1][:, -1].float()
        self.ready = mask[:, -2].bool().to(self.device)

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        depth = max(1, min(self.depth, widest_budget(max_tokens)))
        logits = self.heads(self.final)[:, :depth].float()  # [B, D, Vd]
        top = logits.log_softmax(-1).topk(min(self.lattice.top_k, logits.shape[-1]), dim=-1)  # [B, D, k]
        tokens = self.heads.d2t[top.indices]
        search = search_lattice(tokens, top.values, self.lattice.num_candidates, self.rescorer)
        tree = build_candidate_tree(search)
        if self.rescorer is not None:
            self.rescorer.finish(tree.node_depth, tree.node_beam)
        num = torch.where(self.ready, tree.num_nodes, 0)
        return Draft(tokens=tree.tokens, probs=None, num_draft=num, parents=tree.parents,
                     tree_rule=DeterministicTreeRule())

    def observe(self, outcome: StepOutcome) -> None:
        hidden = outcome.target_hidden[-1]  # [B, 1 + N, d] over [pending, nodes]
        nodes, n = outcome.result.accepted_nodes, outcome.result.num_accepted  # [B, D'], [B]
        if nodes.shape[1]:
            last = nodes.gather(1, (n - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
            col = torch.where(n > 0, last + 1, torch.zeros_like(n))
        else:
            col = torch.zeros_like(n)
        self.final = hidden[torch.arange(hidden.shape[0], device=hidden.device), col.to(hidden.device)].float()
        self.ready = torch.ones_like(self.ready)
        if self.rescorer is not None:
            self.rescorer.observe(outcome)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.final = self.final[rows]
        self.ready = self.ready[rows]
        if self.rescorer is not None:
            self.rescorer.select_rows(rows)

    @property
    def info(self) -> dict[str, Any]:
        return {"heads": self.heads.num_heads, "top_k": self.lattice.top_k, "candidates": self.lattice.num_candidates,
                "rescorer": type(self.rescorer).__name__ if self.rescorer is not None else None}
