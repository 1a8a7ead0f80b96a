"""Hybrid drafts (a drafter's top-k tree plus prompt lookup's chain in one tree): the graft's exact table, greedy
decoding token-identical to HF generate, exact sampling (chi-square, with a negative control: a tree rule without
residuals), and named errors. (A duplicated deterministic sibling would be harmless, the rule zeroes a rejected
token, but wastes a verified position: the graft merges.)"""

from __future__ import annotations

import pytest
import torch

from mmspec import engine
from mmspec.drafters.base import Draft
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.hybrid import HybridDraftError, HybridDrafter, graft_chains
from mmspec.drafters.model import ModelDrafter
from mmspec.drafters.prompt_lookup import PromptLookupDrafter
from mmspec.drafters.tree import DynamicTree, StaticTree
from mmspec.errors import InvalidDraftLengthError
from mmspec.truncate import truncated_copy
from mmspec.verify.tree_rules import DeterministicTreeRule
from stat_helpers import chisquare_pvalue, first_two_token_tables
from test_feature_drafter import V, make_head
from tiny_models import build

# a tree: root -> 5 (0) -> 6 (2), root -> 7 (1) -> 8 (3)
TREE = (torch.tensor([[5, 7, 6, 8]]), torch.tensor([[-1, -1, 0, 1]]))


@pytest.mark.parametrize("chain, tokens, parents", [
    ([], [5, 7, 6, 8], [-1, -1, 0, 1]),                              # no chain
    ([5, 6], [5, 7, 6, 8], [-1, -1, 0, 1]),                          # the chain is a path of the tree already
    ([5, 6, 9, 4], [5, 7, 6, 8, 9, 4], [-1, -1, 0, 1, 2, 4]),        # leaves the tree below node 2
    ([7, 9], [5, 7, 6, 8, 9], [-1, -1, 0, 1, 1]),                    # a new sibling of node 3
    ([3, 5], [5, 7, 6, 8, 3, 5], [-1, -1, 0, 1, -1, 4]),             # a new root child: its subtree is new too
])
def test_graft_table(chain, tokens, parents):
    t, p, n = graft_chains(*TREE, torch.tensor([4]), torch.tensor([chain + [0] * (4 - len(chain))]),
                           torch.tensor([len(chain)]))
    assert t[0].tolist() == tokens and p[0].tolist() == parents and n.tolist() == [len(tokens)]


def test_graft_pads_rows_and_ignores_padding_nodes():
    tokens = torch.tensor([[5, 7, 0], [1, 2, 3]])
    parents = torch.tensor([[-1, -1, -1], [-1, 0, 1]])
    t, p, n = graft_chains(tokens, parents, torch.tensor([2, 3]), torch.tensor([[0, 9], [1, 2]]), torch.tensor([2, 2]))
    assert n.tolist() == [4, 3]
    assert t.tolist() == [[5, 7, 0, 9], [1, 2, 3, 0]] and p.tolist() == [[-1, -1, -1, 2], [-1, 0, 1, -1]]


def _repetitive_prompts(batch: int):
    """Prompts whose last bigram occurred earlier, so prompt lookup drafts from the first step."""
    g = torch.Generator().manual_seed(batch)
    rows = []
    for _ in range(batch):
        piece = torch.randint(3, V, (5,), generator=g).tolist()
        rows.append(piece * 3 + piece[:2])
    return torch.tensor(rows), torch.ones((batch, len(rows[0])), dtype=torch.long)


@pytest.mark.parametrize("kind", ["feature", "model"])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_greedy_hybrid_is_token_identical_to_hf_generate(kind, batch):
    target = build("llama", layers=3)
    if kind == "feature":
        inner = FeatureDrafter(make_head(target), tree=DynamicTree(depth=4, top_k=3, num_nodes=10))
    else:
        inner = ModelDrafter(truncated_copy(target, 1), tree=StaticTree((2, 2, 1)))
    drafter = HybridDrafter(inner, PromptLookupDrafter(max_ngram_size=3, draft_length=6, min_ngram_size=2))
    ids, mask = _repetitive_prompts(batch)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    out = engine.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=24)
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)
    assert drafter.grafted > 0


class NoResidualRule(DeterministicTreeRule):
    """Wrong on purpose: judges every sibling against the target itself instead of the residual the rejected
    siblings leave (and emits from it), the mistake a tree with more siblings (grafted chains) exposes."""

    fused_mode = None  # the reference walk, not the fused kernel of the right rule

    def reject(self, state, tokens, draft_probs):
        return state._replace(tried=state.tried.scatter(-1, tokens.unsqueeze(-1), True))


class WrongRuleHybrid(HybridDrafter):
    """Negative control: hybrid drafts verified with :class:`NoResidualRule`."""

    def propose(self, max_tokens):
        d = super().propose(max_tokens)
        return Draft(tokens=d.tokens, probs=None, num_draft=d.num_draft, parents=d.parents, tree_rule=NoResidualRule())


def _draw(target, cls, draws=20_000):
    prompt = torch.tensor([[5, 17, 33, 9, 5, 17, 33, 9, 5, 17]])
    ids = prompt.expand(draws, -1).contiguous()
    drafter = cls(FeatureDrafter(make_head(target), tree=DynamicTree(depth=3, top_k=3, num_nodes=8)),
                  PromptLookupDrafter(max_ngram_size=2, draft_length=4, min_ngram_size=2))
    out = engine.generate(target, ids, drafter=drafter, max_new_tokens=2, temperature=1.0, seed=list(range(draws)),
                          eos_token_id=[])
    new = out.sequences[:, -2:]
    p1, p12 = first_two_token_tables(target, prompt)
    return chisquare_pvalue(new[:, 0], p1), chisquare_pvalue(new[:, 0] * V + new[:, 1], p12.flatten()), drafter


def test_sampling_with_hybrid_drafts_follows_the_target_first_and_first_two_tokens():
    target = build("llama", layers=3, init=0.08)
    first, pair, drafter = _draw(target, HybridDrafter)
    assert drafter.grafted > 0
    assert first > 1e-3 and pair > 1e-3


@pytest.mark.extended  # negative control
def test_the_sampling_test_catches_a_rule_without_residuals():
    target = build("llama", layers=3, init=0.08)
    first, pair, _ = _draw(target, WrongRuleHybrid)
    assert first < 1e-6 or pair < 1e-6


def test_hybrid_needs_a_tree_drafter_and_a_valid_lookup():
    target = build("llama", layers=3)
    with pytest.raises(HybridDraftError, match="drafts a top-k tree"):
        HybridDrafter(FeatureDrafter(make_head(target), 3))
    with pytest.raises(InvalidDraftLengthError, match="min_ngram_size"):
        PromptLookupDrafter(max_ngram_size=2, min_ngram_size=3)
