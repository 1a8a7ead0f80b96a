"""Exact (Leviathan/Chen) rejection sampling: table cases, invariants and statistical tests.

Oracles: the target distribution itself (chi-square goodness of fit with >= 1e5 draws) and the
Leviathan et al. bound E[emitted] = (1 - a^(k+1)) / (1 - a) with a = sum_x min(p(x), q(x))."""

import math

import pytest
import torch
from stat_helpers import chisquare_pvalue

from mmspec import SamplingParams
from mmspec.verify import (PLACEHOLDER_TOKEN_ID, AcceptRule, ExactRule, GreedyRule, Judgement,
                           verify_chain, verify_chain_probs)

N = 100_000
BACKENDS = ["torch", "generic"]


def onehot_logits(rows):
    """Logits whose softmax is the given probability rows (zeros -> -inf)."""
    p = torch.tensor(rows, dtype=torch.float32)
    return p.log()


# ---- tier 1: exact table-driven cases -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_equal_target_accepts_everything(backend, gen):
    p = torch.softmax(torch.randn(64, 5, 7, generator=gen), -1)  # [B, k+1, V]
    draft = torch.multinomial(p[:, :4].reshape(-1, 7), 1, generator=gen).view(64, 4)
    u = torch.rand(64, 4, generator=gen)
    noise = torch.empty(64, 7).exponential_(generator=gen)
    res = verify_chain_probs(draft, p[:, :4], p, ExactRule(), u, noise, backend=backend)
    assert res.num_accepted.eq(4).all()
    assert torch.equal(res.tokens[:, :4], draft)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_supports_accept_nothing(backend, gen):
    p = torch.zeros(32, 4, 6); p[..., :3] = 1 / 3
    q = torch.zeros(32, 3, 6); q[..., 3:] = 1 / 3
    draft = torch.randint(3, 6, (32, 3), generator=gen)
    res = verify_chain_probs(draft, q, p, ExactRule(), torch.rand(32, 3, generator=gen),
                             torch.empty(32, 6).exponential_(generator=gen), backend=backend)
    assert res.num_accepted.eq(0).all()
    assert (res.tokens[:, 0] < 3).all()  # recovered token comes from p's support
    assert res.tokens[:, 1:].eq(PLACEHOLDER_TOKEN_ID).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_zero_probability_tokens_never_accepted(backend, deterministic, gen):
    V = 5
    p = torch.full((200, 2, V), 0.25); p[..., 0] = 0.0  # target never emits 0
    q = torch.full((200, 1, V), 0.2)
    draft = torch.zeros(200, 1, dtype=torch.long)
    u = torch.zeros(200, 1)  # the most permissive uniforms
    res = verify_chain_probs(draft, None if deterministic else q, p, ExactRule(), u,
                             torch.empty(200, V).exponential_(generator=gen), backend=backend)
    assert res.num_accepted.eq(0).all() and res.tokens[:, 0].ne(0).all()
    # q(x) = 0: a token the drafter could not have drawn is never accepted
    p2 = torch.full((200, 2, V), 0.2)
    q2 = torch.full((200, 1, V), 0.25); q2[..., 0] = 0.0
    res2 = verify_chain_probs(draft, q2, p2, ExactRule(), u,
                              torch.empty(200, V).exponential_(generator=gen), backend=backend)
    assert res2.num_accepted.eq(0).all()


def test_table_cases():
    """Hand-computed outcomes with explicit uniforms and noise."""
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]])  # [1, 3, 3]
    q = torch.tensor([[[0.25, 0.75, 0.0], [0.1, 0.8, 0.1]]])
    draft = torch.tensor([[0, 1]])
    noise = torch.ones(1, 3)
    # pos 0: p/q = 2 -> accept. pos 1: p/q = 0.25 -> u=0.3 rejects; residual (0, 0, 0.6) -> 2
    res = verify_chain_probs(draft, q, p, ExactRule(), torch.tensor([[0.9, 0.3]]), noise)
    assert res.num_accepted.tolist() == [1] and res.tokens.tolist() == [[0, 2, -1]]
    # u = 0.2 < 0.25 accepts both; bonus from p[2] with unit noise = argmax = 2
    res = verify_chain_probs(draft, q, p, ExactRule(), torch.tensor([[0.9, 0.2]]), noise)
    assert res.num_accepted.tolist() == [2] and res.tokens.tolist() == [[0, 1, 2]]
    # num_draft = 1: the second column is not a draft; the token there is drawn from p[1]
    res = verify_chain_probs(draft, q, p, ExactRule(), torch.tensor([[0.9, 0.0]]), noise,
                             torch.tensor([1]))
    assert res.tokens.tolist() == [[0, 2, -1]]
    # greedy: accept iff argmax; first index wins ties (p[0] ties 0 and 1 -> 0)
    res = verify_chain_probs(torch.tensor([[1, 2]]), None, p, GreedyRule(), torch.zeros(1, 2), noise)
    assert res.num_accepted.tolist() == [0] and res.tokens.tolist() == [[0, -1, -1]]


def test_verify_chain_shape_errors():
    with pytest.raises(ValueError, match="target_logits must be"):
        verify_chain(torch.zeros(2, 3, dtype=torch.long), None, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="draft_probs must be"):
        verify_chain(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="draft_tokens must be a long"):
        verify_chain(torch.zeros(2, 3), None, torch.zeros(2, 4, 5))


# ---- tier 2: invariants on random inputs ----------------------------------------------------

def test_invariants_random(gen):
    for _ in range(50):
        B, k, V = 16, int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(2, 12, (1,), generator=gen))
        logits = torch.randn(B, k + 1, V, generator=gen) * 3
        q = torch.softmax(torch.randn(B, k, V, generator=gen) * 3, -1)
        draft = torch.multinomial(q.view(-1, V), 1, generator=gen).view(B, k)
        res = verify_chain(draft, q, logits, ExactRule(), SamplingParams(temperature=1.0), gen)
        n = res.num_accepted
        assert ((0 <= n) & (n <= k)).all()
        cols = torch.arange(k + 1)
        assert torch.equal(torch.where(cols[:k] < n[:, None], res.tokens[:, :k], draft),
                           draft)  # accepted prefix equals the draft
        assert (res.tokens[cols[None] > n[:, None]] == PLACEHOLDER_TOKEN_ID).all()
        emitted = res.tokens.gather(1, n[:, None]).squeeze(1)
        assert ((emitted >= 0) & (emitted < V)).all()


def test_seeded_reproducible():
    logits = torch.randn(8, 5, 11, generator=torch.Generator().manual_seed(0))
    q = torch.softmax(torch.randn(8, 4, 11, generator=torch.Generator().manual_seed(1)), -1)
    draft = torch.multinomial(q.view(-1, 11), 1, generator=torch.Generator().manual_seed(2)).view(8, 4)
    a = verify_chain(draft, q, logits, None, SamplingParams(1.0), torch.Generator().manual_seed(5))
    b = verify_chain(draft, q, logits, None, SamplingParams(1.0), torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)


# ---- tier 3: statistical tests -------------------------------------------------------------

class AlwaysAcceptRule(AcceptRule):
    """Deliberately wrong: accepts every draft (emits the drafter's distribution)."""

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
        return Judgement(torch.ones_like(draft_tokens, dtype=torch.bool), target_probs)


class ResampleFromTargetRule(ExactRule):
    """Deliberately wrong: correct acceptance test, but recovers from p instead of max(0, p - q)."""

    fused_mode = None

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
        j = super().judge(draft_tokens, draft_probs, target_probs, uniforms)
        return Judgement(j.accepted, target_probs)


def markov(V, seed, sharp):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, V, generator=g) * sharp, -1)  # [prev, next]


def run_markov(P, Q, start, k, rule, gen, steps_needed=2, sampling=SamplingParams(temperature=1.0)):
    """Speculative sampling of a Markov chain P with drafter chain Q; returns first tokens [N, steps]."""
    n_rows = start.shape[0]
    out = [[] for _ in range(n_rows)]
    state = start.clone()
    while min(len(o) for o in out) < steps_needed:
        drafts, probs, prev = [], [], state
        for _ in range(k):
            qd = Q[prev]
            tok = torch.multinomial(qd, 1, generator=gen).squeeze(1)
            drafts.append(tok); probs.append(qd); prev = tok
        draft = torch.stack(drafts, 1)
        ctx = torch.cat([state[:, None], draft], 1)  # [N, k+1] contexts of the k+1 positions
        logits = P[ctx].log()
        res = verify_chain(draft, torch.stack(probs, 1), logits, rule, sampling, gen)
        toks = res.tokens.tolist()
        for i, (row, n) in enumerate(zip(toks, res.num_accepted.tolist())):
            out[i].extend(row[: n + 1])
        state = res.tokens.gather(1, res.num_accepted[:, None]).squeeze(1)
    return torch.tensor([o[:steps_needed] for o in out])


@pytest.mark.parametrize("k", [1, 3])
def test_exact_first_two_tokens_match_target(k):
    V = 6
    P, Q = markov(V, 0, 1.5), markov(V, 1, 1.5)
    gen = torch.Generator().manual_seed(k)
    start = torch.zeros(N, dtype=torch.long)
    toks = run_markov(P, Q, start, k, ExactRule(), gen)
    first = P[0]
    joint = (P[0][:, None] * P).flatten()  # P(a | 0) P(b | a)
    assert chisquare_pvalue(toks[:, 0], first) > 1e-3
    assert chisquare_pvalue(toks[:, 0] * V + toks[:, 1], joint) > 1e-3


@pytest.mark.parametrize("wrong", [AlwaysAcceptRule(), ResampleFromTargetRule()])
def test_statistical_test_detects_a_wrong_rule(wrong):
    V = 6
    P, Q = markov(V, 0, 1.5), markov(V, 1, 1.5)
    toks = run_markov(P, Q, torch.zeros(N, dtype=torch.long), 3, wrong, torch.Generator().manual_seed(0))
    joint = (P[0][:, None] * P).flatten()
    assert chisquare_pvalue(toks[:, 0] * V + toks[:, 1], joint) < 1e-6


def test_exact_with_temperature_top_k_top_p_matches_processed_target():
    """The emitted distribution is the *processed* target distribution (HF warpers)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    V = 8
    sampling = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
    P, Q = markov(V, 3, 1.0), markov(V, 4, 1.0)
    scores = P.log()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.8)):
        scores = w(None, scores)
    Pp = scores.softmax(-1)  # HF-processed target rows
    gen = torch.Generator().manual_seed(9)
    # drafter samples from its own processed distribution
    from mmspec.sampling import logits_to_probs
    Qp = logits_to_probs(Q.log(), sampling)
    toks = run_markov(P, Qp, torch.zeros(N, dtype=torch.long), 3, ExactRule(), gen, sampling=sampling)
    joint = (Pp[0][:, None] * Pp).flatten()
    assert chisquare_pvalue(toks[:, 0] * V + toks[:, 1], joint) > 1e-3


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("deterministic", [False, True])
def test_mean_emitted_length_matches_leviathan_formula(k, deterministic, gen):
    V = 7
    p = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    if deterministic:  # always draft the drafter's argmax: alpha = p(x*)
        x = int(q.argmax())
        alpha = float(p[x])
        draft = torch.full((N, k), x, dtype=torch.long)
        probs = None
    else:
        alpha = float(torch.minimum(p, q).sum())
        draft = torch.multinomial(q, N * k, replacement=True, generator=gen).view(N, k)
        probs = q.expand(N, k, V)
    logits = p.log().expand(N, k + 1, V)
    res = verify_chain(draft, probs, logits, ExactRule(), SamplingParams(1.0), gen)
    emitted = res.num_emitted.double()
    expected = (1 - alpha ** (k + 1)) / (1 - alpha)
    se = emitted.std().item() / math.sqrt(N)
    assert abs(emitted.mean().item() - expected) < 5 * se + 1e-9
