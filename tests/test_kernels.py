"""Triton chain-verify kernel (interpreted on CPU) == its torch reference == the generic rule path."""

import pytest
import torch

from mmspec.kernels import HAS_TRITON, chain_verify, chain_verify_torch, chain_verify_triton, select_backend
from mmspec.verify import ExactRule, GreedyRule, verify_chain_probs

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton extra not installed")


def random_case(gen, ties=False):
    B = 6
    k = int(torch.randint(0, 6, (1,), generator=gen))
    V = int(torch.randint(2, 50, (1,), generator=gen))
    p = torch.rand(B, k + 1, V, generator=gen).pow(3)
    p[p < 0.3] = 0.0  # tokens with zero target mass
    p[..., 0] += 1e-3
    if ties:  # exact ties in the target and equal p, q entries
        p = (p * 4).round() + (p > 0).float()
    p = p / p.sum(-1, keepdim=True)
    q = torch.rand(B, k, V, generator=gen).pow(3)
    if ties and k:
        q[:, :, : V // 2] = p[:, :k, : V // 2]
    q = q / q.sum(-1, keepdim=True)
    x = torch.randint(0, V, (B, k), generator=gen)
    nd = torch.randint(0, k + 1, (B,), generator=gen)
    u = torch.rand(B, k, generator=gen)
    e = torch.empty(B, V).exponential_(generator=gen)
    return x, nd, p, q, u, e


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("mode,with_q", [("exact", True), ("exact", False), ("greedy", False)])
def test_triton_matches_reference(mode, with_q, ties):
    gen = torch.Generator().manual_seed(17 + ties)
    for _ in range(12):
        x, nd, p, q, u, e = random_case(gen, ties)
        qq = q if with_q else None
        ref = chain_verify_torch(mode, x, nd, qq, p, u, e)
        for block in (16, 1024):  # vocabulary split across several blocks, and one block
            tri = chain_verify_triton(mode, x, nd, qq, p, u, e, block_v=block)
            assert torch.equal(ref[0], tri[0]) and torch.equal(ref[1], tri[1])
        rule = ExactRule() if mode == "exact" else GreedyRule()
        noise = e if mode == "exact" else torch.ones_like(e)
        gen_res = verify_chain_probs(x, qq, p, rule, u, noise, nd, backend="generic")
        assert torch.equal(ref[0], gen_res.tokens) and torch.equal(ref[1], gen_res.num_accepted)


def test_residual_all_zero_falls_back_to_target():
    """A rejected draft whose residual max(0, p - q) is all zero (here: q(x) = 0 and p == q) draws
    the token from p itself; the kernel and the reference agree."""
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])  # [1, k+1=2, V=3]
    q = p[:, :1].clone()  # the drafter's distribution equals the target's...
    x = torch.tensor([[2]])  # ...but it drafted a token it gives zero mass: rejected, residual is 0
    u, e = torch.tensor([[0.0]]), torch.ones(1, 3)
    for fn in (chain_verify_torch, chain_verify_triton):
        tokens, n = fn("exact", x, torch.tensor([1]), q, p, u, e)
        assert n.tolist() == [0] and tokens.tolist() == [[0, -1]]  # argmax of p / unit noise, first index


def test_dispatch():
    assert select_backend(torch.device("cpu")) == "torch"
    assert select_backend(torch.device("cpu"), "triton") == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select_backend(torch.device("cpu"), "cuda-magic")
    gen = torch.Generator().manual_seed(3)
    x, nd, p, q, u, e = random_case(gen)
    a = chain_verify("exact", x, nd, q, p, u, e, backend="triton")
    b = chain_verify("exact", x, nd, q, p, u, e)
    assert torch.equal(a[0], b[0])


def test_engine_runs_on_triton_backend(monkeypatch):
    """The whole engine, sampled, gives identical tokens with either backend (same seed)."""
    import mmspec
    from tiny_models import build, truncated_drafter
    target = build("llama", vocab=40, dtype=torch.float32)
    drafter = truncated_drafter(target)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    outs = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MMSPEC_KERNEL_BACKEND", backend)
        out = mmspec.generate(target, ids, drafter=drafter, max_new_tokens=8, temperature=1.0,
                              num_draft_tokens=3, generator=torch.Generator().manual_seed(1))
        outs.append(out.sequences)
    assert torch.equal(outs[0], outs[1])


# ---- pooled acceptance (LANTERN / LANTERN++ / MuLo-SD) -------------------------------------------

from mmspec.kernels import pooled_acceptance_torch, pooled_acceptance_triton  # noqa: E402


@pytest.mark.parametrize("mode,param", [("lantern", 0.25), ("lantern", 0.0), ("lantern++", 2.0),
                                        ("lantern++", 1.0), ("threshold", 0.5), ("threshold", 0.25)])
@pytest.mark.parametrize("with_q", [True, False])
def test_pooled_kernel_matches_reference_with_ties_and_zero_mass(mode, param, with_q):
    gen = torch.Generator().manual_seed(hash((mode, param, with_q)) % 1000)
    for _ in range(6):
        B, k, V, K = 3, 4, 16, 5
        # dyadic probabilities: exact sums, so budgets are hit exactly (ties) in any summation order
        w = torch.randint(0, 5, (B, k, V), generator=gen).double()
        w[..., 0] += 1
        p = (w / w.sum(-1, keepdim=True) * 64).round() / 64
        p[..., 1] = 0.0  # a token with zero mass that appears among neighbours
        nbr = torch.stack([torch.cat([torch.tensor([1]), torch.randperm(V, generator=gen)[:K - 1]]) for _ in range(V)])
        x = torch.randint(0, V, (B, k), generator=gen)
        u = (torch.randint(0, 8, (B, k), generator=gen) / 8.0).float()  # ties with pooled masses
        q = (torch.randint(0, 5, (B, k), generator=gen) / 4.0).float()  # includes q(x) = 0
        qq = q if with_q else None
        ref = pooled_acceptance_torch(mode, x, qq, p.float(), nbr, u, param)
        tri = pooled_acceptance_triton(mode, x, qq, p.float(), nbr, u, param)
        for a, b in zip(ref, tri):
            assert torch.equal(a, b)
