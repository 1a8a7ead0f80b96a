"""Drafters, draft-length policies, cache sessions and the event stream."""

import copy

import pytest
import torch
from scipy import stats as sps

import mmspec
from mmspec.cache import CacheSession
from mmspec.drafters.prompt_lookup import find_candidate
from mmspec.verify import AcceptRule, Judgement
from test_draft_length import bigram_lm
from tiny_models import build, truncated_drafter


@pytest.mark.parametrize("context,n,k,expected", [
    ([1, 2, 3, 4, 1, 2], 2, 3, [3, 4, 1]),  # bigram match
    ([1, 2, 3, 9, 2], 2, 2, [3, 9]),  # no bigram match -> unigram
    ([5, 6, 7], 3, 2, []),  # nothing repeats
    ([1, 2, 1, 2, 1, 2], 2, 2, [1, 2]),  # earliest match first (HF order)
    ([7, 8, 7], 2, 5, [8, 7]),  # continuation shorter than k
    ([4], 2, 3, []),
])
def test_prompt_lookup_table(context, n, k, expected):
    assert find_candidate(context, n, k) == expected


def test_heuristic_policy_schedule():
    p = mmspec.HeuristicDraftLength(4, max_k=7)
    seq = []
    for acc, drafted in [(4, 4), (6, 6), (2, 7), (0, 6), (5, 5)]:
        p.update(torch.tensor([acc]), torch.tensor([drafted]))
        seq.append(p.current())
    assert seq == [6, 7, 6, 5, 7]


def test_confidence_policy_stops_rows():
    p = mmspec.ConfidenceDraftLength(5, threshold=0.5)
    assert p.stop_rows(torch.tensor([0.2, 0.7])).tolist() == [True, False]


def test_cache_session_rollback_makes_holes_and_crops():
    model = build("llama", vocab=40, dtype=torch.float64)
    s = CacheSession(model, 2, torch.device("cpu"))
    s.extend(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    s.extend(torch.tensor([[11, 12, 13], [14, 15, 16]]))
    s.rollback(torch.tensor([1, 3]))  # row 0 keeps 5 tokens, row 1 keeps 3
    assert s.valid.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert s.next_pos.tolist() == [5, 3]
    assert s.cache.get_seq_length() == 5
    # the next token's logits equal a fresh run over the kept tokens
    logits = s.extend(torch.tensor([[20], [21]]))[:, -1]
    fresh0 = model(torch.tensor([[5, 6, 7, 11, 12, 20]])).logits[0, -1]
    fresh1 = model(torch.tensor([[8, 9, 10, 21]])).logits[0, -1]
    assert torch.allclose(logits[0], fresh0, atol=1e-10) and torch.allclose(logits[1], fresh1, atol=1e-10)


def test_stream_events_reconstruct_generate():
    target = build("gpt2", vocab=64)
    drafter = truncated_drafter(target)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = mmspec.generate(target, ids, drafter=drafter, max_new_tokens=15, num_draft_tokens=4)
    rows = [[], []]
    steps, row_steps, accepted = 0, 0, []
    acc_at, drafted_at = [0] * 4, [0] * 4
    for ev in mmspec.generate_stream(target, ids, drafter=drafter, max_new_tokens=15, num_draft_tokens=4):
        steps += 1
        for r, toks, n, d in zip(ev.rows, ev.tokens, ev.num_accepted, ev.num_draft):
            assert 0 <= n <= d and len(toks) <= n + 1
            rows[r].extend(toks)
            row_steps += 1
            accepted.append(n)
            for i in range(d):
                drafted_at[i] += 1
                acc_at[i] += i < n
    assert steps == out.stats.steps
    for r in range(2):
        gen = out.sequences[r, 7:7 + len(rows[r])].tolist()
        assert gen == rows[r]
    s = out.stats
    assert s.target_calls == s.steps + 1  # prefill + one call per step
    # tau and the per-position rates are exactly what the events say (not just inside [1, k + 1])
    assert s.row_steps == row_steps and s.accepted_tokens == sum(accepted)
    assert s.mean_accepted_length == (sum(accepted) + row_steps) / row_steps
    assert s.acceptance_per_position == [a / d for a, d in zip(acc_at, drafted_at)]
    assert s.accepted_length_counts == [accepted.count(n) for n in range(max(accepted) + 1)]
    assert 0 < s.accepted_tokens < s.drafted_tokens  # the truncated drafter is partly right: both kinds of steps
    assert s.total_time >= s.target_time + s.verify_time


def test_tau_is_k_plus_one_when_the_drafter_is_the_target():
    """Drafter = target under greedy: every draft is accepted, tau = k + 1 exactly (15 tokens = 3 steps of 5)."""
    target = build("gpt2", vocab=64)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = mmspec.generate(target, ids, drafter=mmspec.ModelDrafter(target), max_new_tokens=15, num_draft_tokens=4,
                          eos_token_id=[])
    s = out.stats
    assert s.mean_accepted_length == 5.0 and s.acceptance_rate == 1.0
    assert s.steps == 3 and s.accepted_length_counts == [0, 0, 0, 0, 6]
    assert torch.equal(out.sequences, target.generate(ids, max_new_tokens=15, do_sample=False,
                                                      eos_token_id=None, pad_token_id=0))


def test_tau_is_one_when_the_drafter_always_disagrees():
    """A drafter with the target's body and a negated LM head drafts the target's argmin on the same context:
    the first draft of every step is rejected under greedy, so tau = 1 exactly."""
    target = build("llama", vocab=64)
    anti = copy.deepcopy(target)
    assert anti.lm_head.weight is not anti.model.embed_tokens.weight  # untied: negating the head keeps the body
    with torch.no_grad():
        anti.lm_head.weight.neg_()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = mmspec.generate(target, ids, drafter=anti, max_new_tokens=12, num_draft_tokens=3, eos_token_id=[])
    s = out.stats
    assert s.mean_accepted_length == 1.0 and s.accepted_tokens == 0
    assert s.steps == 12 and s.accepted_length_counts == [24] and s.drafted_tokens == 2 * (3 * 9 + 2 + 1 + 0)  # caps: min(k, tokens left - 1)
    assert torch.equal(out.sequences, target.generate(ids, max_new_tokens=12, do_sample=False,
                                                      eos_token_id=None, pad_token_id=0))


# ---------------------------------------------------------------- tau against Leviathan's expectation

# a context-free target p and drafter q: each draft is accepted independently with alpha = sum min(p, q) = 0.6
P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04], dtype=torch.float64)
Q = torch.tensor([0.10, 0.15, 0.30, 0.25, 0.10, 0.10], dtype=torch.float64)
ALPHA = float(torch.minimum(P, Q).sum())


class ForgetsQ(AcceptRule):
    """Wrong rule (a plausible bug): accept with probability p(x) instead of min(1, p(x) / q(x)). Its output
    stays inside the support (0..k accepted drafts, residual max(0, p - q)), so only the statistic can tell."""

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
        p_x = target_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        return Judgement(uniforms < p_x, (target_probs - draft_probs).clamp_min(0.0))


def accepted_lengths(rule, k=3, rows=6000):
    """First step of ``rows`` rows drafting k each: accepted-length counts [k + 1] and that step's tau."""
    target = bigram_lm(P.log().expand(len(P), -1))
    drafter = mmspec.ModelDrafter(bigram_lm(Q.log().expand(len(Q), -1)))
    ids = torch.full((rows, 2), 1)
    stream = mmspec.generate_stream(target, ids, drafter=drafter, max_new_tokens=k + 1, num_draft_tokens=k,
                                    temperature=1.0, rule=rule, generator=torch.Generator().manual_seed(0))
    ev = next(stream)
    assert ev.num_draft == [k] * rows
    st = ev.stats  # after one step the call's stats are this step's
    assert st.row_steps == rows and st.drafted_tokens == k * rows
    counts = st.accepted_length_counts
    return torch.tensor(counts + [0] * (k + 1 - len(counts)), dtype=torch.float64), st.mean_accepted_length


def truncated_geometric(alpha, k):
    """P(n accepted of k) when each draft is accepted independently with probability alpha."""
    return torch.tensor([alpha ** n * (1 - alpha) for n in range(k)] + [alpha ** k], dtype=torch.float64)


def leviathan_check(counts, tau, alpha, k=3):
    """(chi-square p-value of the counts, z-score of tau) against Leviathan et al.'s i.i.d. acceptance model:
    E[tau] = (1 - alpha^(k+1)) / (1 - alpha)."""
    probs = truncated_geometric(alpha, k)
    n = counts.sum()
    expected_tau = (1 - alpha ** (k + 1)) / (1 - alpha)
    assert abs(float((probs * torch.arange(1, k + 2)).sum()) - expected_tau) < 1e-12
    sd = float(((torch.arange(1, k + 2) - expected_tau) ** 2 * probs).sum().sqrt())
    return sps.chisquare(counts.numpy(), (probs * n).numpy()).pvalue, (tau - expected_tau) / (sd / n.sqrt().item())


def test_tau_matches_leviathan_expectation():
    counts, tau = accepted_lengths(None)  # the default rule at temperature 1: exact speculative sampling
    pvalue, z = leviathan_check(counts, tau, ALPHA)
    assert pvalue > 1e-3 and abs(z) < 4, (counts, tau, pvalue, z)
    # resolution: alpha off by 0.04 either way is rejected by the same counts (power > 0.999 at 6000 rows)
    for wrong_alpha in (ALPHA - 0.04, ALPHA + 0.04):
        assert leviathan_check(counts, tau, wrong_alpha)[0] < 1e-6


def test_tau_check_rejects_a_rule_that_forgets_q():
    counts, tau = accepted_lengths(ForgetsQ())
    assert counts.sum() == 6000 and (counts > 0).all()  # inside the support: every row accepted 0..k drafts
    pvalue, z = leviathan_check(counts, tau, ALPHA)
    assert pvalue < 1e-6 and abs(z) > 4


def test_drafter_reused_across_calls_with_different_k():
    target = build("qwen2", vocab=64)
    drafter = mmspec.ModelDrafter(truncated_drafter(target))
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    a = mmspec.generate(target, ids, drafter=drafter, max_new_tokens=10, num_draft_tokens=2)
    b = mmspec.generate(target, ids, drafter=drafter, max_new_tokens=10, num_draft_tokens=5)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.stats.acceptance_per_position) == 2 and len(b.stats.acceptance_per_position) == 5
