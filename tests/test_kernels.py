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


# ---- drafted ids outside the vocabulary (issue 12) -----------------------------------------------

from mmspec.errors import TokenIdError  # noqa: E402

CHAIN_BACKENDS = ("torch", "triton", "generic")


def _run_chain(backend, mode, x, nd, q, p, u, e):
    if backend == "generic":
        rule = ExactRule() if mode == "exact" else GreedyRule()
        res = verify_chain_probs(x, q, p, rule, u, e if mode == "exact" else torch.ones_like(e), nd, backend="generic")
        return res.tokens, res.num_accepted
    fn = chain_verify_torch if backend == "torch" else chain_verify_triton
    return fn(mode, x, nd, q, p, u, e if mode == "exact" else torch.ones_like(e))


@pytest.mark.parametrize("backend", CHAIN_BACKENDS)
@pytest.mark.parametrize("mode,with_q", [("exact", True), ("exact", False), ("greedy", False)])
def test_padding_ids_beyond_num_draft_never_matter(backend, mode, with_q):
    """Padding columns (col >= num_draft) holding -1 or >= V give exactly the result of padding with a
    valid id, on every backend (the kernel masks its reads to its own row)."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(8):
        x, nd, p, q, u, e = random_case(gen)
        B, k = x.shape
        V = p.shape[-1]
        if k == 0:
            continue
        nd = torch.randint(0, k, (B,), generator=gen)  # every row has padding
        nd[0] = 0
        pad = torch.arange(k) >= nd.unsqueeze(1)
        qq = q if with_q else None
        ref = _run_chain(backend, mode, torch.where(pad, torch.zeros_like(x), x), nd, qq, p, u, e)
        torch_ref = _run_chain("torch", mode, torch.where(pad, torch.zeros_like(x), x), nd, qq, p, u, e)
        assert torch.equal(ref[0], torch_ref[0]) and torch.equal(ref[1], torch_ref[1])
        for bad in (-1, V, V + 7, -V - 3):
            got = _run_chain(backend, mode, torch.where(pad, torch.full_like(x, bad), x), nd, qq, p, u, e)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (bad, backend)
            assert not ((got[0] < -1) | (got[0] >= V)).any()


@pytest.mark.parametrize("backend", CHAIN_BACKENDS)
@pytest.mark.parametrize("mode,with_q", [("exact", True), ("exact", False), ("greedy", False)])
@pytest.mark.parametrize("bad", [-1, 7, 1000])
def test_out_of_vocabulary_draft_inside_num_draft_raises(backend, mode, with_q, bad):
    gen = torch.Generator().manual_seed(9)
    B, k, V = 3, 4, 7
    p = torch.softmax(torch.randn(B, k + 1, V, generator=gen), -1)
    q = torch.softmax(torch.randn(B, k, V, generator=gen), -1)
    x = torch.randint(0, V, (B, k), generator=gen)
    nd = torch.tensor([4, 2, 3])
    x[1, 1] = bad  # column 1 < num_draft 2: a real draft
    u, e = torch.rand(B, k, generator=gen), torch.ones(B, V)
    with pytest.raises(TokenIdError, match=rf"drafted token id {bad} \(row 1, column 1.*outside the vocabulary \[0, 7\)"):
        _run_chain(backend, mode, x, nd, q if with_q else None, p, u, e)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_num_draft_outside_zero_to_k_raises(backend):
    from mmspec.errors import InvalidDraftLengthError

    x, p, u, e = torch.zeros(1, 2, dtype=torch.long), torch.full((1, 3, 4), 0.25), torch.zeros(1, 2), torch.ones(1, 4)
    for nd in (3, -1):
        with pytest.raises(InvalidDraftLengthError, match=r"num_draft must be in \[0, k\] = \[0, 2\]"):
            chain_verify("exact", x, torch.tensor([nd]), None, p, u, e, backend=backend)
