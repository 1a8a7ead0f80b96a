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


# ---------------------------------------------------------------- hand-computed cases

# neighbour table of a 6-token codebook (nearest first)
TABLE = torch.tensor([[1, 2, 3], [0, 2, 4], [3, 1, 5], [2, 4, 0], [5, 3, 1], [4, 2, 0]])
P_A = [0.10, 0.05, 0.20, 0.32, 0.13, 0.20]  # neighbours of 0 (1, 2, 3) have cumulative mass 0.05, 0.25, 0.57
P_B = [0.05, 0.10, 0.12, 0.10, 0.40, 0.23]  # neighbours of 3 (2, 4, 0): 0.12, 0.52, 0.57
P_C = [0.30, 0.20, 0.25, 0.05, 0.00, 0.20]  # neighbours of 5 (4, 2, 0): 0.00, 0.25, 0.55


def lantern(delta):
    return LatentNeighbourRule(TABLE, delta)


def lantern_pp(lam):
    return LatentNeighbourRule(TABLE, lam=lam)


# (rule, drafted x, p, pooled set A(x) in neighbour order, pooled mass p~(x) = p(x) + p(A(x)))
HAND_CASES = [
    (lantern(0.26), 0, P_A, [1, 2], 0.35),  # 0.25 <= 0.26 < 0.57
    (lantern(0.04), 0, P_A, [], 0.10),  # the first neighbour alone (0.05) is over budget
    (lantern(0.60), 0, P_A, [1, 2, 3], 0.67),  # the whole neighbourhood fits
    (lantern(0.26), 3, P_B, [2], 0.22),  # 0.12 <= 0.26 < 0.52
    (lantern(0.10), 5, P_C, [], 0.20),  # the prefix {4} fits but has zero mass: it counts as empty
    (lantern(0.30), 5, P_C, [4, 2], 0.45),  # 0.00, 0.25 <= 0.30 < 0.55
    (lantern_pp(3.0), 0, P_A, [1], 0.15),  # budget (3 - 1) * 0.10 = 0.20: 0.05 fits, 0.25 does not
    (lantern_pp(3.0), 3, P_B, [2], 0.22),  # budget 0.20: 0.12 fits, 0.52 does not
    (lantern_pp(2.0), 3, P_B, [], 0.10),  # budget 0.10 < 0.12
    (lantern_pp(6.5), 3, P_B, [2, 4], 0.62),  # budget 0.55: 0.52 fits, 0.57 does not
    (lantern_pp(7.0), 3, P_B, [2, 4, 0], 0.67),  # budget 0.60: the whole neighbourhood fits
    (lantern_pp(2.0), 5, P_C, [], 0.20),  # budget 0.20: only the zero-mass prefix {4} fits -> empty
]


def one_hot_q(x, qx=0.5, V=6):
    q = torch.full((V,), (1 - qx) / (V - 1))
    q[x] = qx
    return q


@pytest.mark.parametrize("rule,x,p,pooled_set,pooled_mass", HAND_CASES)
def test_hand_computed_pooling_acceptance_and_residual(rule, x, p, pooled_set, pooled_mass):
    p = torch.tensor(p)
    xs = torch.tensor([[x]])
    p_x, pooled, nbr, in_a = rule.pooled(xs, p.view(1, 1, -1))
    assert [int(t) for t, a in zip(nbr.flatten(), in_a.flatten()) if a] == pooled_set
    assert math.isclose(pooled.item(), pooled_mass, abs_tol=1e-6) and math.isclose(p_x.item(), p[x].item(), abs_tol=1e-7)
    zeroed = [x] + pooled_set
    for q in (None, one_hot_q(x)):  # deterministic draft (q one-hot), sampled draft with q(x) = 0.5
        qx = 1.0 if q is None else 0.5
        threshold = pooled_mass / qx  # accept iff u < p~(x) / q(x)
        us = [u for u in (threshold - 0.01, threshold + 0.01, 0.0, 0.999) if 0 <= u < 1]
        qq = None if q is None else q.view(1, 1, -1).expand(1, len(us), -1)
        j = rule.judge(xs.expand(1, len(us)), qq, p.view(1, 1, -1).expand(1, len(us), -1), torch.tensor([us]))
        assert j.accepted[0].tolist() == [u < threshold for u in us]
        # residual: deterministic: p with x and A(x) zeroed; sampled: max(0, p - q') with q' = q zeroed on
        # {x} and A(x) when A(x) is non-empty, else q itself (the exact rule's residual)
        if q is None:
            want = p.clone()
            want[zeroed] = 0
        else:
            q_prime = q.clone()
            if pooled_set:
                q_prime[zeroed] = 0
            want = (p - q_prime).clamp_min(0)
        assert torch.allclose(j.residual[0], want.expand(len(us), -1), atol=1e-7)
        if not pooled_set:  # nothing pooled: decision for decision the exact rule
            e = ExactRule().judge(xs.expand(1, len(us)), qq, p.view(1, 1, -1).expand(1, len(us), -1), torch.tensor([us]))
            assert torch.equal(j.accepted, e.accepted) and torch.allclose(j.residual, e.residual)


def test_hand_computed_chain():
    """Two drafted positions, sampled drafts with q(x) = 0.5, noise of ones (the emitted token is the argmax of
    the distribution it is drawn from). LANTERN delta 0.26: position 0 pools {1, 2} (p~ = 0.35, accept iff
    u < 0.70), position 1 (x = 3) pools {2} (p~ = 0.22, accept iff u < 0.44)."""
    p_d = [0.05, 0.05, 0.10, 0.10, 0.10, 0.60]  # after both drafts: argmax 5
    target = torch.tensor([P_A, P_B, p_d]).expand(4, 3, 6)
    q = torch.stack([one_hot_q(0), one_hot_q(3)]).expand(4, 2, 6)
    x = torch.tensor([[0, 3]]).expand(4, 2)
    u = torch.tensor([[0.69, 0.43],  # both accepted -> bonus from p_d: 5
                      [0.69, 0.45],  # rejected at 1 -> residual (P_B - q')+, q' = q zeroed on {3, 2}: argmax 4
                      [0.71, 0.00],  # rejected at 0 -> residual (P_A - q')+, q' = q zeroed on {0, 1, 2}: argmax 3
                      [0.19, 0.19]])  # the exact rule would accept these too
    noise = torch.ones(4, 6)
    res = verify_chain_probs(x, q, target, lantern(0.26), u, noise, backend="generic")
    assert res.num_accepted.tolist() == [2, 1, 0, 2]
    assert res.tokens.tolist() == [[0, 3, 5], [0, 4, -1], [3, -1, -1], [0, 3, 5]]
    # the exact rule on the same inputs: accept iff u < p(x) / q(x) = 0.2 at both positions
    ex = verify_chain_probs(x, q, target, ExactRule(), u, noise, backend="generic")
    assert ex.num_accepted.tolist() == [0, 0, 0, 2]
    # LANTERN++ lambda 3 on the same inputs: position 0 pools {1} (accept iff u < 0.30), position 1 pools {2}
    pp = verify_chain_probs(x, q, target, lantern_pp(3.0), u, noise, backend="generic")
    assert pp.num_accepted.tolist() == [0, 0, 0, 2]
    u_pp = torch.tensor([[0.29, 0.43], [0.29, 0.45], [0.31, 0.00], [0.19, 0.19]])
    pp = verify_chain_probs(x, q, target, lantern_pp(3.0), u_pp, noise, backend="generic")
    assert pp.num_accepted.tolist() == [2, 1, 0, 2]
    # row 2's residual now zeroes q on {0, 1} only: (P_A - q')+ = [.1, .05, .1, .22, .03, .1] -> 3
    assert pp.tokens.tolist() == [[0, 3, 5], [0, 4, -1], [3, -1, -1], [0, 3, 5]]


# ---------------------------------------------------------------- monotone in delta / lambda on shared inputs

DELTAS = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0]
LAMS = [1.0, 1.1, 1.3, 1.6, 2.0, 3.0, 5.0, 10.0, 1e6]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("family", ["lantern", "lantern++"])
def test_acceptance_is_monotone_in_the_budget_position_by_position(family, deterministic, gen):
    """Same drafts, same target distributions, same uniforms: a larger delta (lambda) pools a longer prefix of
    B_k(x), so p~ grows and every position accepted under the smaller budget stays accepted; the chain's
    accepted length can only grow, and the strictly larger budgets accept strictly more somewhere."""
    grew = 0
    for _ in range(10):
        p, q, x, u, e, table = random_case(gen)
        qq = None if deterministic else q
        rules = ([LatentNeighbourRule(table, d) for d in DELTAS] if family == "lantern"
                 else [LatentNeighbourRule(table, lam=lam) for lam in LAMS])
        prev = None
        for rule in rules:
            acc = rule.judge(x, qq, p[:, :3], u).accepted
            _, pooled, _, in_a = rule.pooled(x, p[:, :3])
            n_acc = verify_chain_probs(x, qq, p, rule, u, e, backend="generic").num_accepted
            if prev is not None:
                p_acc, p_pooled, p_in_a, p_n = prev
                assert (acc | ~p_acc).all()  # accepted before -> accepted now, position by position
                assert (pooled >= p_pooled - 1e-12).all() and (in_a | ~p_in_a).all()
                assert (n_acc >= p_n).all()
                grew += int((acc & ~p_acc).sum())
            prev = acc, pooled, in_a, n_acc
    assert grew > 50  # the sweep really changes decisions


# ---------------------------------------------------------------- TV bound for deterministic drafts

# a deterministic draft x = 0 over 8 tokens; its neighbours 2, 1, 5 have cumulative mass 0.05, 0.13, 0.25
TV_P = torch.tensor([0.22, 0.08, 0.05, 0.18, 0.15, 0.12, 0.12, 0.08])
TV_TABLE = torch.tensor([[(t + 2) % 8, (t + 1) % 8, (t + 5) % 8] for t in range(8)])
TV_DELTA, TV_N = 0.15, 100_000
TV_TOL = 4 / math.sqrt(TV_N)  # sampling slack of an empirical TV over 8 cells (bias + 4 sd < 0.011)


class KeepsPooledMass(LatentNeighbourRule):
    """Wrong rule: pools like LANTERN but draws rejections from p with only x zeroed (A(x) keeps its mass, so it
    is emitted twice over). Same TV to p as the right rule here, same support: only the chi-square can tell."""

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
        j = super().judge(draft_tokens, draft_probs, target_probs, uniforms)
        return j._replace(residual=target_probs.scatter(-1, draft_tokens.unsqueeze(-1), 0.0))


def tv_trial(rule):
    """(chi-square p-value against LANTERN's predicted emission at delta 0.15, empirical TV to p) of the first
    token emitted for TV_N rows drafting x = 0 deterministically."""
    V = len(TV_P)
    predicted = TV_P.double().clone()  # p with A(x) = {2, 1} (mass 0.13 <= 0.15 < 0.25) moved onto x
    predicted[0] += predicted[[2, 1]].sum()
    predicted[[2, 1]] = 0
    res = verify_chain(torch.zeros((TV_N, 1), dtype=torch.long), None, TV_P.log().expand(TV_N, 2, V), rule,
                       SamplingParams(temperature=1.0), torch.Generator().manual_seed(5))
    counts = torch.bincount(res.tokens[:, 0], minlength=V).double()
    assert counts.sum() == TV_N and (counts[TV_P == 0] == 0).all()  # every rule here stays inside p's support
    keep = predicted > 0
    # cells where LANTERN puts no mass are folded into one cell with a tiny expectation: any count there
    # makes the statistic huge (the statistic, not a support assertion, rejects)
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([predicted[keep] * TV_N, torch.tensor([1e-3], dtype=torch.float64)])
    pvalue = stats.chisquare(obs.numpy(), (exp / exp.sum() * obs.sum()).numpy()).pvalue
    return pvalue, 0.5 * (counts / TV_N - TV_P.double()).abs().sum().item()


def test_lantern_tv_bound_for_deterministic_drafts():
    """Emitted distribution = p with A(x)'s mass moved onto x: TV = p(A(x)) = 0.13 <= delta = 0.15."""
    rule = LatentNeighbourRule(TV_TABLE, TV_DELTA)
    _, pooled, nbr, in_a = rule.pooled(torch.tensor([[0]]), TV_P.view(1, 1, -1))
    assert [int(t) for t, a in zip(nbr.flatten(), in_a.flatten()) if a] == [2, 1]
    pvalue, tv = tv_trial(rule)
    assert pvalue > 1e-3
    assert abs(tv - 0.13) <= TV_TOL and tv <= TV_DELTA + TV_TOL  # the TV is p(A(x)), within the bound


def test_tv_bound_rejects_a_wrong_pooling():
    """Negative controls, same draft and randomness: pooling one neighbour too many (the next one, as a
    budget check that looks one step ahead would) moves 0.25 > delta + tolerance, and the bound check fails;
    keeping A(x)'s mass in the residual keeps the TV at 0.13 but the chi-square rejects it."""
    pvalue, tv = tv_trial(LatentNeighbourRule(TV_TABLE, 0.26))  # pools {2, 1, 5}
    assert tv > TV_DELTA + TV_TOL and abs(tv - 0.25) <= TV_TOL and pvalue < 1e-6
    pvalue, tv = tv_trial(KeepsPooledMass(TV_TABLE, TV_DELTA))
    assert abs(tv - 0.13) <= TV_TOL and pvalue < 1e-6


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
    """The rule given to image generation decides: with every other code a neighbour and delta = 1, every draft
    pools all the mass and is accepted (the exact rule is not: acceptance < 1); with delta = 0 the images are
    the exact rule's, token for token (same seed)."""
    from tiny_image_models import tiny_ar, truncated_ar
    target = tiny_ar(dtype=torch.float32, init=0.4)
    full = build_latent_neighbours(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), 15)
    common = dict(condition=[1, 2], method="exact", cfg_scale=2.0, num_draft_tokens=3, num_images=4)
    base = ig.generate(target, drafter=truncated_ar(target), generator=torch.Generator().manual_seed(0), **common)
    zero = ig.generate(target, drafter=truncated_ar(target), generator=torch.Generator().manual_seed(0),
                       rule=LatentNeighbourRule(full, 0.0), **common)
    everything = ig.generate(target, drafter=truncated_ar(target), generator=torch.Generator().manual_seed(0),
                             rule=LatentNeighbourRule(full, 1.0), **common)
    assert base.stats.acceptance_rate < 0.9
    assert torch.equal(zero.tokens, base.tokens)
    assert everything.stats.acceptance_rate == 1.0


def test_lantern_methods_end_to_end():
    """method='lantern' / 'lantern++' build the rule from their parameters: delta 0 and lambda 1 reproduce
    method='exact' image for image (same seed); delta 1 and a huge lambda over the full neighbour table accept
    every draft."""
    from tiny_image_models import tiny_ar, truncated_ar
    target = tiny_ar(dtype=torch.float32, init=0.4)
    drafter = truncated_ar(target)
    full = build_latent_neighbours(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), 15)
    common = dict(condition=[1, 2], drafter=drafter, cfg_scale=2.0, num_draft_tokens=3, num_images=4)

    def run(method, **kw):
        return ig.generate(target, method=method, generator=torch.Generator().manual_seed(0), **common, **kw)

    exact = run("exact")
    assert exact.stats.acceptance_rate < 0.9
    assert torch.equal(run("lantern", neighbours=full, lantern_delta=0.0).tokens, exact.tokens)
    assert torch.equal(run("lantern++", neighbours=full, lantern_lambda=1.0).tokens, exact.tokens)
    assert run("lantern", neighbours=full, lantern_delta=1.0).stats.acceptance_rate == 1.0
    assert run("lantern++", neighbours=full, lantern_lambda=1e9).stats.acceptance_rate == 1.0
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
