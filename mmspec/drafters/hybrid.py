"""Hybrid drafts: one draft tree holding a model drafter's tree and prompt lookup's chain, verified together in
one target forward, so copy-heavy text gets lookup's long matches and open text gets the model's branches.

Papers: Miao et al., SpecInfer (ASPLOS 2024) merge several drafters' proposals into one token tree and verify it
in one forward; Saxena, "Prompt Lookup Decoding" (2023) for the chain.

Glossary:
    tree drafter  a :class:`~mmspec.drafters.model.ModelDrafter` (e.g. an EAGLE-3
                  :class:`~mmspec.drafters.feature.FeatureDrafter`) drafting a top-k tree (``tree=``): its children
                  are the drafter's top tokens, a deterministic function of the context
    lookup chain  :class:`~mmspec.drafters.prompt_lookup.PromptLookupDrafter`'s continuation of the context's
                  last n-gram (deterministic too)
    graft         the chain walked down the tree from the root: while its next token is already a child of the
                  current node, descend; the rest is appended as new nodes under the last node matched
                  (:func:`graft_chains`). Siblings stay distinct and every node is a deterministic proposal, so
                  :class:`~mmspec.verify.tree_rules.DeterministicTreeRule` (q = 1) keeps sampling exact and
                  greedy verification stays token-identical to the target
    grafted nodes  come after the drafter's own, so a prefix of the nodes is still a tree and the drafter's
                  own nodes keep their ids; the drafter never fed them (its bookkeeping treats them as not fed)
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MMSpecError
from ..verify.tree_rules import DeterministicTreeRule
from .base import Draft, Drafter, StepOutcome
from .prompt_lookup import PromptLookupDrafter


class HybridDraftError(MMSpecError):
    """A hybrid draft needs a tree drafter whose children are deterministic (a top-k tree)."""


def graft_chains(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor, chains: torch.Tensor,
                 chain_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graft each row's chain onto its tree (see the glossary).

    tokens long [B, N], parents long [B, N] (-1: child of the root), num_nodes long [B] (real nodes per row),
    chains long [B, L], chain_len long [B] -> (tokens [B, N'], parents [B, N'], num_nodes [B]); a row's real nodes
    are its old ones, then its new ones; padding nodes are token 0 under the root."""
    rows_t, rows_p = [], []
    for b in range(tokens.shape[0]):
        n = int(num_nodes[b])
        tok, par = tokens[b, :n].tolist(), parents[b, :n].tolist()
        children: dict[int, dict[int, int]] = {}
        for i, (t, p) in enumerate(zip(tok, par)):
            children.setdefault(p, {}).setdefault(t, i)
        node = -1
        for t in chains[b, :int(chain_len[b])].tolist():
            nxt = children.get(node, {}).get(t)
            if nxt is None:  # a new node under the last matched one; its children are new too
                nxt = len(tok)
                tok.append(t)
                par.append(node)
                children.setdefault(node, {})[t] = nxt
            node = nxt
        rows_t.append(tok)
        rows_p.append(par)
    width = max((len(t) for t in rows_t), default=0)
    out_t = torch.zeros((tokens.shape[0], width), dtype=torch.long)
    out_p = torch.full((tokens.shape[0], width), -1, dtype=torch.long)
    for b, (t, p) in enumerate(zip(rows_t, rows_p)):
        out_t[b, :len(t)] = torch.tensor(t, dtype=torch.long)
        out_p[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(t) for t in rows_t], dtype=torch.long)
    device = tokens.device
    return out_t.to(device), out_p.to(device), lengths.to(device)


class HybridDrafter(Drafter):
    """``drafter``'s tree plus ``lookup``'s chain in one draft tree (see the module glossary). ``lookup`` defaults to
    prompt lookup with n-grams of 2 to 3 tokens and chains of up to 8 tokens."""

    def __init__(self, drafter: Drafter, lookup: PromptLookupDrafter | None = None):
        if getattr(drafter, "tree", None) is None:
            raise HybridDraftError("HybridDrafter needs a drafter that drafts a top-k tree (e.g. "
                                   "FeatureDrafter(head, tree=DynamicTree(...))), got one that drafts chains")
        self.drafter = drafter
        self.lookup = lookup if lookup is not None else PromptLookupDrafter(max_ngram_size=3, draft_length=8,
                                                                            min_ngram_size=2)
        self.vocab_size = drafter.vocab_size
        self.hidden_layers = drafter.hidden_layers
        self.needs_no_prefill = drafter.needs_no_prefill and self.lookup.needs_no_prefill
        self.grafted = 0  # nodes the lookup chains added (not already in the tree), summed over steps and rows

    def start(self, input_ids, attention_mask, *, sampling, rng, guidance=None, **model_inputs) -> None:
        if guidance is not None:
            raise HybridDraftError("HybridDrafter drafts text: classifier-free guidance is not supported")
        self.drafter.start(input_ids, attention_mask, sampling=sampling, rng=rng, guidance=guidance, **model_inputs)
        self.lookup.start(input_ids, attention_mask, sampling=sampling, rng=rng)
        self.grafted = 0

    def observe_prefill(self, target_hidden):
        self.drafter.observe_prefill(target_hidden)

    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        tree = self.drafter.propose(max_tokens)
        if not tree.is_tree or not isinstance(tree.tree_rule, DeterministicTreeRule):
            raise HybridDraftError("the tree drafter's draft is not a deterministic top-k tree")
        chain = self.lookup.propose(max_tokens)
        if chain.k == 0:
            return tree
        tokens, parents, num = graft_chains(tree.tokens, tree.parents, tree.num_draft, chain.tokens, chain.num_draft)
        self.grafted += int((num - tree.num_draft).sum())
        return Draft(tokens=tokens, probs=None, num_draft=num, parents=parents, tree_rule=tree.tree_rule)

    def observe(self, outcome: StepOutcome) -> None:
        self.drafter.observe(outcome)
        self.lookup.observe(outcome)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.drafter.select_rows(rows)
        self.lookup.select_rows(rows)

    # the tree drafter's hooks
    def set_default_length(self, k: Any) -> None:
        self.drafter.set_default_length(k)

    def set_stop_tokens(self, tokens) -> None:
        self.drafter.set_stop_tokens(tokens)
        self.lookup.set_stop_tokens(tokens)

    @property
    def num_calls(self) -> int:
        return self.drafter.num_calls

    def check_compatible(self, target: torch.nn.Module) -> None:
        self.drafter.check_compatible(target)

    def target_prefill_context(self, target, input_ids, attention_mask):
        return self.drafter.target_prefill_context(target, input_ids, attention_mask)

    @property
    def info(self) -> dict[str, Any]:
        return {**self.drafter.info, "lookup_nodes_grafted": self.grafted}


__all__ = ["HybridDraftError", "HybridDrafter", "graft_chains"]
