"""Triton tree-verify kernel (interpreted on CPU) == its torch reference == the generic rule walk."""

import pytest
import torch

from mmspec.errors import TokenIdError
from mmspec.kernels import HAS_TRITON, select_backend, tree_verify, tree_verify_torch, tree_verify_triton
from mmspec.verify import (DeterministicTreeRule, GreedyTreeRule, SpecInferTreeRule, WithoutReplacementTreeRule,
                           compute_depths, verify_tree_probs)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton extra not installed")

RULES = {"greedy": GreedyTreeRule(), "iid": SpecInferTreeRule(),
         "without_replacement": WithoutReplacementTreeRule(), "deterministic": DeterministicTreeRule()}


def random_case(gen, ties=False):
    """Small ragged trees: zero-mass tokens, duplicate siblings, garbage ids and parents in the padding."""
    B = 5
    N = int(torch.randint(0, 8, (1,), generator=gen))
    V = int(torch.randint(2, 40, (1,), generator=gen))
    p = torch.rand(B, N + 1, V, generator=gen).pow(3)
    p[p < 0.3] = 0.0  # tokens with zero target mass
    p[..., 0] += 1e-3
    if ties:  # exact ties in the target, equal p and q entries, dyadic sums
        p = (p * 4).round() + (p > 0).float()
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(B, N, V, generator=gen).pow(3)
    if ties and N:
        q[:, :, : V // 2] = p[:, 1:, : V // 2]
    q = q / q.sum(-1, keepdim=True)
    parents = torch.stack([torch.randint(-1, i, (B,), generator=gen) if i else torch.full((B,), -1)
                           for i in range(N)], 1) if N else torch.zeros(B, 0, dtype=torch.long)
    parents = torch.where(torch.rand(B, N, generator=gen) < 0.4, -1, parents)  # wide root: several rejections
    x = torch.randint(0, min(V, 4), (B, N), generator=gen)  # few distinct ids: duplicate siblings
    at_parent = p.argmax(-1).gather(1, parents + 1)  # [B, N]: the target's favourite at the parent
    x = torch.where(torch.rand(B, N, generator=gen) < 0.5, at_parent, x)  # often accepted, so trees descend
    nd = torch.randint(0, N + 1, (B,), generator=gen)
    pad = torch.arange(N) >= nd[:, None]
    x = torch.where(pad, torch.tensor([-1, V, 10**12])[torch.randint(0, 3, (B, N), generator=gen)], x)
    parents = torch.where(pad, torch.tensor([-7, N + 3, 10**12])[torch.randint(0, 3, (B, N), generator=gen)], parents)
    u = torch.rand(B, N, generator=gen)
    if ties:
        u = (u * 4).floor() / 4  # u * q(x) == p(x) happens
    e = torch.empty(B, V).exponential_(generator=gen)
    depth = int(compute_depths(parents, nd).max()) if N else 0
    return x, parents, nd, p, q, u, e, depth


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("mode,with_q", [("greedy", False), ("iid", True), ("without_replacement", True),
                                         ("deterministic", False), ("iid", False)])
def test_triton_matches_reference(mode, with_q, ties):
    gen = torch.Generator().manual_seed(23 + ties)
    for _ in range(6):
        x, par, nd, p, q, u, e, depth = random_case(gen, ties)
        qq = q if with_q else None
        ref = tree_verify_torch(mode, x, par, nd, qq, p, u, e, depth)
        for block in (16, 1024):  # vocabulary split across several blocks, and one block
            tri = tree_verify_triton(mode, x, par, nd, qq, p, u, e, depth, block_v=block)
            for a, b in zip(ref, tri):
                assert torch.equal(a, b), (mode, block, a, b)
        noise = torch.ones_like(e) if mode == "greedy" else e
        generic = verify_tree_probs(x, par, qq, p, RULES[mode], u, noise, nd, backend="generic")
        if mode != "greedy":
            ref = tree_verify_torch(mode, x, par, nd, qq, p, u, noise, depth)
        assert torch.equal(ref[0], generic.tokens) and torch.equal(ref[1], generic.accepted_nodes)
        assert torch.equal(ref[2], generic.num_accepted)


@pytest.mark.parametrize("mode", ["iid", "without_replacement"])
def test_zero_residual_falls_back_to_target(mode):
    """A rejected child whose residual max(p - q, 0) is all zero (q(x) = 0 and p == q) leaves the target
    at the node as p for the next sibling and the emitted token; kernel and reference agree."""
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]])  # [1, N+1=3, V=3]
    q = p[:, :1].expand(1, 2, 3).clone()
    x = torch.tensor([[2, 2]])  # drafted a token q gives zero mass, twice
    par = torch.tensor([[-1, -1]])
    u, e = torch.zeros(1, 2), torch.tensor([[1.0, 0.5, 1.0]])
    for fn in (tree_verify_torch, tree_verify_triton):
        tokens, nodes, n = fn(mode, x, par, torch.tensor([2]), q, p, u, e, 1)
        assert n.tolist() == [0] and tokens.tolist() == [[1, -1]] and nodes.tolist() == [[-1]]


def test_deep_chains_and_wide_stars_on_a_larger_vocabulary():
    """Several vocabulary blocks, depth-6 chains and 6-way stars whose siblings are mostly rejected
    (so p_j and, without replacement, q_j are renormalised several times before the next sibling)."""
    gen = torch.Generator().manual_seed(5)
    B, N, V = 8, 6, 300
    chain, star = torch.arange(N) - 1, torch.full((N,), -1)
    par = torch.stack([chain, star, chain, star, star, star, star, star])
    p = torch.softmax(torch.randn(B, N + 1, V, generator=gen) * 2, -1)
    q = torch.softmax(torch.randn(B, 1, V, generator=gen) * 2, -1).expand(B, N, V).clone()  # siblings share q
    q[0] = p[0, :N]  # the chain of row 0 drafts from the target itself
    draws = torch.multinomial(q[:, 0], N, replacement=False, generator=gen)  # distinct siblings
    x = torch.where(torch.rand(B, N, generator=gen) < 0.5, draws, draws[:, :1])  # and duplicates
    x[0] = torch.multinomial(q[0], 1, generator=gen).squeeze(1)
    u = torch.rand(B, N, generator=gen).sqrt()  # large uniforms: many rejections
    e = torch.empty(B, V).exponential_(generator=gen)
    nd = torch.tensor([6, 6, 3, 0, 6, 6, 5, 4])
    for mode in RULES:
        qq = q if mode in ("iid", "without_replacement") else None
        ref = tree_verify_torch(mode, x, par, nd, qq, p, u, e, 6)
        tri = tree_verify_triton(mode, x, par, nd, qq, p, u, e, 6, block_v=128)
        assert all(torch.equal(a, b) for a, b in zip(ref, tri))
        gen_walk = verify_tree_probs(x, par, qq, p, RULES[mode], u, torch.ones_like(e) if mode == "greedy" else e,
                                     nd, backend="generic")
        if mode != "greedy":
            assert torch.equal(ref[0], gen_walk.tokens) and torch.equal(ref[2], gen_walk.num_accepted)
    # q == p on row 0: every chain node is accepted by the sampled rules
    assert tree_verify_triton("iid", x, par, nd, q, p, u, e, 6)[2][0] == 6


def test_no_nodes_and_empty_batch():
    p = torch.softmax(torch.randn(3, 1, 7, generator=torch.Generator().manual_seed(0)), -1)
    x = torch.zeros(3, 0, dtype=torch.long)
    e = torch.ones(3, 7)
    for mode in RULES:
        tokens, nodes, n = tree_verify_triton(mode, x, x.clone(), torch.zeros(3, dtype=torch.long), None, p,
                                              torch.zeros(3, 0), e, 0)
        assert tokens[:, 0].tolist() == p[:, 0].argmax(-1).tolist() and nodes.shape == (3, 0)
    tokens, nodes, n = tree_verify_triton("iid", x[:0], x[:0], torch.zeros(0, dtype=torch.long), None, p[:0],
                                          torch.zeros(0, 0), e[:0], 0)
    assert tokens.shape == (0, 1) and n.shape == (0,)


def test_dispatch_and_token_ids():
    assert select_backend(torch.device("cpu")) == "torch"
    gen = torch.Generator().manual_seed(3)
    x, par, nd, p, q, u, e, depth = random_case(gen)
    while x.shape[1] < 3:
        x, par, nd, p, q, u, e, depth = random_case(gen)
    a = tree_verify("iid", x, par, nd, q, p, u, e, depth, backend="triton")
    b = tree_verify("iid", x, par, nd, q, p, u, e, depth)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    with pytest.raises(ValueError, match="unknown tree-verify mode"):
        tree_verify("typical", x, par, nd, q, p, u, e, depth)
    nd = torch.full_like(nd, x.shape[1])
    par = torch.arange(x.shape[1]).expand_as(x) - 1
    x = x.clamp(0, p.shape[-1] - 1)
    x[0, -1] = p.shape[-1]
    with pytest.raises(TokenIdError):
        verify_tree_probs(x, par, q, p, SpecInferTreeRule(), u, e, nd, backend="triton")
