"""Relaxed acceptance rules: LANTERN / LANTERN++ (latent-neighbour pooling) and MuLo-SD's pooled threshold."""

import math

import pytest
import torch
from scipy import stats

import mmspec.image_gen as ig
from mmspec import SamplingParams
from mmspec.errors import MMSpecError
from mmspec.image_gen.neighbours import build_latent_neighbours
from mmspec.verify import ExactRule, LatentNeighbourRule, PooledThresholdRule, verify_chain, verify_chain_probs


def random_case(gen, B=64, k=3, V=12):
    p = torch.softmax(torch.randn(B, k + 1, V, generator=gen) * 2, -1)
    q = torch.softmax(torch.randn(B, k, V, generator=gen) * 2, -1)
    x = torch.multinomial(q.view(-1, V), 1, generator=gen).view(B, k)
    u = torch.rand(B, k, generator=gen)
    e = torch.empty(B, V).exponential_(generator=gen)
    table = build_latent_neighbours(torch.randn(V, 3, generator=gen), 4)
    return p, q, x, u, e, table


@pytest.mark.parametrize("deterministic", [False, True])
def test_reduces_to_exact_at_delta_zero_k_zero_lambda_one(deterministic, gen):
    for _ in range(20):
        p, q, x, u, e, table = random_case(gen)
        qq = None if deterministic else q
        exact = verify_chain_probs(x, qq, p, ExactRule(), u, e, backend="generic")
        for rule in (LatentNeighbourRule(table, 0.0), LatentNeighbourRule(table[:, :0], 0.3),
                     LatentNeighbourRule(table, lam=1.0)):
            got = verify_chain_probs(x, qq, p, rule, u, e, backend="generic")
            assert torch.equal(got.tokens, exact.tokens) and torch.equal(got.num_accepted, exact.num_accepted)


@pytest.mark.parametrize("deterministic", [False, True])
def test_never_accepts_less_than_exact(deterministic, gen):
    for _ in range(20):
        p, q, x, u, e, table = random_case(gen)
        qq = None if deterministic else q
        exact = ExactRule().judge(x, qq, p[:, :3], u).accepted
        for rule in (LatentNeighbourRule(table, 0.1), LatentNeighbourRule(table, 0.5), LatentNeighbourRule(table, lam=2.0)):
            relaxed = rule.judge(x, qq, p[:, :3], u).accepted
            assert (relaxed | ~exact).all()
        more = verify_chain_probs(x, qq, p, LatentNeighbourRule(table, 0.5), u, e, backend="generic").num_accepted
        assert (more >= verify_chain_probs(x, qq, p, ExactRule(), u, e, backend="generic").num_accepted).all()


def test_pooled_set_table():
    # token 0's neighbours in order: 1, 2, 3
    table = torch.tensor([[1, 2, 3], [0, 2, 3], [1, 3, 0], [2, 1, 0]])
    p = torch.tensor([[[0.3, 0.05, 0.1, 0.55]]])
    rule = LatentNeighbourRule(table, 0.12)
    p_x, pooled, _, in_a = rule.pooled(torch.tensor([[0]]), p)
    # cumulative neighbour mass 0.05, 0.15, 0.70 -> A = {1} under delta 0.12
    assert in_a.tolist() == [[[True, False, False]]] and math.isclose(pooled.item(), 0.35, rel_tol=1e-6)
    pp = LatentNeighbourRule(table, lam=1.5)  # budget 0.5 * p(x) = 0.15 -> A = {1, 2}
    assert pp.pooled(torch.tensor([[0]]), p)[3].tolist() == [[[True, True, False]]]


def test_lantern_tv_bound_for_deterministic_drafts():
    """Emitted distribution = p with A(x)'s mass moved onto x: TV = p(A(x)) <= delta, and > 0."""
    V, N, delta = 8, 100_000, 0.15
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(V, generator=gen) * 1.2, -1)
    table = build_latent_neighbours(torch.randn(V, 2, generator=gen), 3)
    rule = LatentNeighbourRule(table, delta)
    # the drafted token whose neighbourhood pools the most mass (deterministic choice)
    moved_mass = [rule.pooled(torch.tensor([[t]]), p.view(1, 1, V))[1].item() - p[t].item() for t in range(V)]
    x = max(range(V), key=lambda t: moved_mass[t])
    _, pooled, nbr, in_a = rule.pooled(torch.tensor([[x]]), p.view(1, 1, V))
    moved = [int(t) for t, a in zip(nbr.flatten(), in_a.flatten()) if a]
    assert moved, "the case must pool at least one neighbour"
    predicted = p.clone().double()
    predicted[x] += predicted[moved].sum()
    predicted[moved] = 0
    tv_pred = 0.5 * (predicted - p.double()).abs().sum().item()
    assert 0 < tv_pred <= delta + 1e-9
    res = verify_chain(torch.full((N, 1), x), None, p.log().expand(N, 2, V), rule, SamplingParams(temperature=1.0),
                       torch.Generator().manual_seed(5))
    first = res.tokens[:, 0]
    counts = torch.bincount(first, minlength=V).double()
    keep = predicted > 0
    assert counts[~keep].sum() == 0
    expected = predicted[keep] / predicted[keep].sum() * counts[keep].sum()
    assert stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
    tv_emp = 0.5 * (counts / N - p.double()).abs().sum().item()
    assert tv_emp <= delta + 4 / math.sqrt(N) and tv_emp > 0.5 * tv_pred


def test_pooled_threshold_table():
    table = torch.tensor([[1], [0], [3], [2]])
    p = torch.tensor([[[0.2, 0.25, 0.5, 0.05], [0.1, 0.1, 0.4, 0.4]]])
    rule = PooledThresholdRule(table, tau=0.4)
    j = rule.judge(torch.tensor([[0, 1]]), None, p[:, :2], torch.zeros(1, 2))
    # token 0 at pos 0: 0.2 + 0.25 = 0.45 >= 0.4 accept; token 1 at pos 1: 0.1 + 0.1 = 0.2 reject
    assert j.accepted.tolist() == [[True, False]] and torch.equal(j.residual, p[:, :2])
    assert not PooledThresholdRule(table, tau=1.01).judge(torch.tensor([[2]]), None, p[:, :1], torch.zeros(1, 1)).accepted.any()


def test_rule_errors():
    table = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(MMSpecError, match="exactly one of delta"):
        LatentNeighbourRule(table)
    with pytest.raises(MMSpecError, match="delta must be in \\[0, 1\\]"):
        LatentNeighbourRule(table, 1.5)
    with pytest.raises(MMSpecError, match="lam must be >= 1"):
        LatentNeighbourRule(table, lam=0.5)
    with pytest.raises(MMSpecError, match="neighbours must be a long tensor"):
        PooledThresholdRule(table.float(), 0.5)
    with pytest.raises(MMSpecError, match="covers 4 tokens but the vocabulary has 6"):
        LatentNeighbourRule(table, 0.1).judge(torch.zeros(1, 1, dtype=torch.long), None, torch.ones(1, 1, 6) / 6,
                                              torch.zeros(1, 1))


def test_relaxed_rules_plug_into_image_generation():
    from tiny_image_models import tiny_ar, truncated_ar
    target = tiny_ar(dtype=torch.float32, init=0.4)
    table = build_latent_neighbours(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), 3)
    base = ig.generate(target, condition=[1, 2], drafter=truncated_ar(target), method="exact", cfg_scale=2.0,
                       num_draft_tokens=3, generator=torch.Generator().manual_seed(0), num_images=8)
    relaxed = ig.generate(target, condition=[1, 2], drafter=truncated_ar(target), method="exact", cfg_scale=2.0,
                          num_draft_tokens=3, generator=torch.Generator().manual_seed(0), num_images=8,
                          rule=LatentNeighbourRule(table, 0.3))
    assert relaxed.tokens.shape == base.tokens.shape
    assert relaxed.stats.acceptance_rate >= base.stats.acceptance_rate


def test_lantern_methods_end_to_end():
    """method='lantern' at delta 0 reproduces method='exact' image for image (same seed); with a budget it runs,
    and the script accepts the method."""
    from tiny_image_models import tiny_ar, truncated_ar
    target = tiny_ar(dtype=torch.float32, init=0.4)
    drafter = truncated_ar(target)
    table = build_latent_neighbours(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), 3)
    common = dict(condition=[1, 2], drafter=drafter, cfg_scale=2.0, num_draft_tokens=3, num_images=4)
    exact = ig.generate(target, method="exact", generator=torch.Generator().manual_seed(0), **common)
    zero = ig.generate(target, method="lantern", neighbours=table, lantern_delta=0.0,
                       generator=torch.Generator().manual_seed(0), **common)
    assert torch.equal(exact.tokens, zero.tokens)
    for method in ("lantern", "lantern++"):
        out = ig.generate(target, method=method, neighbours=table, generator=torch.Generator().manual_seed(0), **common)
        assert out.tokens.shape == exact.tokens.shape
    with pytest.raises(ig.MethodError, match="needs neighbours= or a tokenizer"):
        ig.generate(target, method="lantern", **common)


def test_script_lantern(tmp_path):
    from mmspec.cli import main
    from mmspec.image_gen import tiny_vq_tokenizer
    from tiny_image_models import tiny_ar, truncated_ar
    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)
    target = tiny_ar(codebook=16, grid=tok.grid_size[0], dtype=torch.float32)
    tok.save_pretrained(tmp_path / "tok"); target.save_pretrained(tmp_path / "t"); truncated_ar(target).save_pretrained(tmp_path / "d")
    rc = main(["imagegen", "--model", str(tmp_path / "t"), "--tokenizer", str(tmp_path / "tok"), "--drafter",
               str(tmp_path / "d"), "--class", "2", "--method", "lantern", "--lantern-delta", "0.2",
               "--lantern-k", "4", "--out", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "image_000.png").exists()
