"""Draft trees on the one loop: greedy output token-identical to HF ``generate`` with static and
EAGLE-2 dynamic trees (Llama, Qwen2, GPT-2; batch 1 and 3 with left padding and rows accepting paths
of different lengths), the KV cache compaction, tree bookkeeping in the drafter, tree shapes' errors.

Oracle: HF transformers' greedy search on the same float64 target."""

import functools

import pytest
import torch

import mmspec
from mmspec.cache import CacheSession
from mmspec.drafters.model import TreeDrafter
from mmspec.drafters.tree import DynamicTree, StaticTree
from tiny_models import ARCHS, build, left_padded_prompts, truncated_drafter

MAX_NEW = 24
TREES = {"static": StaticTree((3, 2, 1)), "dynamic": DynamicTree(depth=4, top_k=3, num_nodes=10)}


@functools.lru_cache(maxsize=None)
def models(arch):
    target = build(arch)
    return target, {"truncated": truncated_drafter(target), "smaller": build(arch, hidden=32, layers=1, seed=7)}


@functools.lru_cache(maxsize=None)
def reference(arch, batch):
    target, _ = models(arch)
    ids, mask = left_padded_prompts(batch, 12, target.config.vocab_size, seed=batch)
    return ids, mask, target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("drafter_kind", ["truncated", "smaller"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_greedy_matches_hf_generate(arch, drafter_kind, tree, batch):
    target, drafters = models(arch)
    ids, mask, expected = reference(arch, batch)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=TreeDrafter(drafters[drafter_kind], TREES[tree]),
                          max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)


def test_rows_accept_paths_of_different_lengths():
    """The batch-3 sweep exercises ragged acceptance: some step has rows accepting different depths."""
    target, drafters = models("llama")
    ids, mask, expected = reference("llama", 3)
    ragged = []
    for ev in mmspec.generate_stream(target, ids, attention_mask=mask, drafter=TreeDrafter(drafters["truncated"],
                                     TREES["static"]), max_new_tokens=MAX_NEW):
        if len(ev.num_accepted) > 1:
            ragged.append(len(set(ev.num_accepted)) > 1)
    assert any(ragged)
    counts = mmspec.generate(target, ids, attention_mask=mask, drafter=TreeDrafter(drafters["truncated"],
                             TREES["static"]), max_new_tokens=MAX_NEW).stats.accepted_length_counts
    assert sum(c > 0 for c in counts) >= 3  # depths 0, 1, 2 (or 3) all occur


@pytest.mark.parametrize("tree", [StaticTree((2, 2, 2)), DynamicTree(depth=3, top_k=2, num_nodes=10)])
def test_self_drafting_tree_accepts_the_full_depth(tree):
    """With the target as drafter, the top child at every level is the target's argmax: every step
    accepts the whole depth (tau = depth + 1 exactly, but for the last, capped step)."""
    target, _ = models("qwen2")
    ids, mask, expected = reference("qwen2", 1)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=TreeDrafter(target, tree), max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)
    counts = out.stats.accepted_length_counts
    assert counts[tree.depth] == MAX_NEW // (tree.depth + 1) and sum(counts) == -(-MAX_NEW // (tree.depth + 1))


def test_a_tree_accepts_more_than_a_chain_of_the_same_depth():
    """Same drafter, same depth: the top-1 chain is one branch of the tree, so the tree's mean accepted
    length is at least the chain's (strictly more here)."""
    target, drafters = models("llama")
    ids, mask, expected = reference("llama", 3)
    chain = mmspec.generate(target, ids, attention_mask=mask, drafter=drafters["truncated"], num_draft_tokens=3,
                            max_new_tokens=MAX_NEW)
    tree = mmspec.generate(target, ids, attention_mask=mask, drafter=TreeDrafter(drafters["truncated"],
                           StaticTree((4, 2, 1))), max_new_tokens=MAX_NEW)
    assert torch.equal(chain.sequences, expected) and torch.equal(tree.sequences, expected)
    assert tree.stats.mean_accepted_length > chain.stats.mean_accepted_length


def test_keep_path_compacts_the_cache_like_a_chain():
    """Feeding a tree and keeping one root-to-leaf path leaves the same keys/values (and next logits)
    as feeding that path as a chain."""
    target, _ = models("llama")
    ids = torch.tensor([[5, 9, 17, 33]])
    path_tokens = [40, 41, 42]
    a, b = CacheSession(target, 1, ids.device), CacheSession(target, 1, ids.device)
    for s in (a, b):
        s.extend(ids[:, :-1])
    a.extend(torch.tensor([[33] + path_tokens]))
    # tree: pending 33 (node 0), children 50, 40; 40's children 41, 60; 41's child 42
    b.begin_tree()
    tokens = torch.tensor([[33, 50, 40, 41, 60, 42]])
    parents = torch.tensor([[-1, 0, 0, 2, 2, 3]])
    logits = b.extend_tree(tokens, parents)
    b.keep_path(torch.tensor([[0, 2, 3, 5]]), torch.tensor([4]))
    assert torch.equal(a.valid, b.valid) and torch.equal(a.next_pos, b.next_pos)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.allclose(la.keys, lb.keys, atol=1e-10) and torch.allclose(la.values, lb.values, atol=1e-10)
    nxt = torch.tensor([[7]])
    assert torch.allclose(a.extend(nxt), b.extend(nxt), atol=1e-10)
    # the tree forward's logit after node 42 equals the chain's after 42
    chain = CacheSession(target, 1, ids.device)
    chain.extend(ids[:, :-1])
    assert torch.allclose(chain.extend(torch.tensor([[33] + path_tokens]))[0, -1], logits[0, 5], atol=1e-10)


def test_tree_shapes_are_validated():
    with pytest.raises(mmspec.InvalidDraftLengthError, match="branching must be"):
        StaticTree((2, 0))
    with pytest.raises(mmspec.InvalidDraftLengthError, match="num_nodes must be an int >= 1"):
        DynamicTree(num_nodes=0)
    with pytest.raises(TypeError, match="tree must be a StaticTree"):
        mmspec.ModelDrafter(models("llama")[0], tree=(2, 2))


def test_relaxed_rules_are_refused_for_trees():
    from mmspec.verify import LatentNeighbourRule

    target, drafters = models("llama")
    ids, mask, _ = reference("llama", 1)
    rule = LatentNeighbourRule(torch.zeros((96, 1), dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="lossless tree rules only"):
        mmspec.generate(target, ids, attention_mask=mask, drafter=TreeDrafter(drafters["truncated"]), rule=rule,
                        max_new_tokens=4, temperature=1.0)


def test_eagle2_rerank_keeps_the_best_nodes_as_a_tree_listed_by_depth():
    from mmspec.drafters.tree import rerank_nodes

    # root children 0 (-0.1), 1 (-2.0); 0's children 2 (-0.3), 3 (-0.2); 3's child 4 (-0.25); 1's child 5 (-2.1)
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15]])
    parents = torch.tensor([[-1, -1, 0, 0, 3, 1]])
    scores = torch.tensor([[-0.1, -2.0, -0.3, -0.2, -0.25, -2.1]], dtype=torch.float64)
    depths = torch.tensor([[1, 1, 2, 2, 3, 2]])
    slot = torch.arange(6).unsqueeze(0)
    tok, par, dep, sl = rerank_nodes(4, tokens, parents, scores, depths, slot)
    assert tok.tolist() == [[10, 12, 13, 14]] and par.tolist() == [[-1, 0, 0, 2]]
    assert dep.tolist() == [[1, 2, 2, 3]] and sl.tolist() == [[0, 2, 3, 4]]
    # ties: a parent and its child with equal path scores (child probability 1): the parent ranks first
    scores = torch.tensor([[-0.1, -2.0, -0.1, -0.5, -0.6, -2.1]], dtype=torch.float64)
    tok, par, _, _ = rerank_nodes(2, tokens, parents, scores, depths, slot)
    assert tok.tolist() == [[10, 12]] and par.tolist() == [[-1, 0]]


def test_dynamic_tree_with_rerank_matches_hf_generate():
    target, drafters = models("gpt2")
    ids, mask, expected = reference("gpt2", 3)
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                          drafter=TreeDrafter(drafters["truncated"], DynamicTree(depth=5, top_k=4, num_nodes=7)))
    assert torch.equal(out.sequences, expected)
