"""Draft-length policies change k: HeuristicDraftLength's +2 / -1 schedule, ConfidenceDraftLength's per-row stop,
checked on scripted counts and on engine runs whose every draft and acceptance is known in advance.

The engine runs use bigram LMs (a real HF Llama whose next-token logits depend only on the last token), so
under greedy decoding a pure-Python replay predicts each step's k, each row's num_draft and num_accepted."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mmspec
from mmspec.drafters import ConfidenceDraftLength, FixedDraftLength, HeuristicDraftLength, ModelDrafter


def bigram_lm(table: torch.Tensor) -> LlamaForCausalLM:
    """A HF Llama with next-token logits ``table[last token]`` (float64, up to the float32 RMSNorm's rounding).

    The layers add nothing (o_proj and down_proj are zero), so the residual stream is the one-hot embedding of
    the current token; the final RMSNorm scales it to sqrt(H) e_t and the LM head reads row t of ``table``.
    No EOS, so rows finish only at max_new_tokens."""
    V = table.shape[0]
    H = 4 * math.ceil(V / 4)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, rms_norm_eps=1e-12, tie_word_embeddings=False,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[torch.arange(V), torch.arange(V)] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :V] = table.to(torch.float64).T / math.sqrt(H)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


V = 8


def chain_table(nxt: dict[int, int], conf: dict[int, float]) -> torch.Tensor:
    """Bigram logits: after token t the model puts conf[t] on nxt[t] and spreads the rest uniformly."""
    table = torch.empty(V, V, dtype=torch.float64)
    for t in range(V):
        p = torch.full((V,), (1 - conf[t]) / (V - 1), dtype=torch.float64)
        p[nxt[t]] = conf[t]
        assert p.argmax() == nxt[t]
        table[t] = p.log()
    return table


# target: the cycle 3 -> 4 -> 5 -> 6 -> 7 -> 3; confident except after 5 (0.3) and after 7 (0.45)
T_NEXT = {0: 3, 1: 3, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 3}
T_CONF = {0: 0.9, 1: 0.9, 2: 0.9, 3: 0.9, 4: 0.9, 5: 0.3, 6: 0.9, 7: 0.45}
# a drafter that agrees with the target except after 6 (it drafts 3 where the target says 7)
D_NEXT = {**T_NEXT, 6: 3}
# a drafter that never agrees with the target's greedy token
ANTI_NEXT = {t: (n + 1) % V for t, n in T_NEXT.items()}


def heuristic_ref(cur: int, accepted: list[int], drafted: list[int], max_k: int) -> int:
    """HF's assisted-generation schedule, written out: +2 when every row accepted all it drafted, else -1 (min 1)."""
    return min(cur + 2, max_k) if all(a >= d for a, d in zip(accepted, drafted)) else max(1, cur - 1)


def replay(last_tokens: list[int], max_new: int, kind: str, k: int, *, drafter_next=T_NEXT, drafter_conf=T_CONF,
           threshold: float = 0.0, max_k: int = 64):
    """Greedy speculative decoding of the bigram target with a bigram drafter, in plain Python.

    Returns per step (k proposed, per-row num_draft, per-row num_accepted) and the generated tokens per row."""
    pending = dict(enumerate(last_tokens))
    generated = {r: [] for r in pending}
    active, cur, steps = list(pending), k, []
    while active:
        remaining = {r: max_new - len(generated[r]) for r in active}
        kk = max(1, min(cur, max(remaining.values()) - 1))
        nds, accs = [], []
        for r in active:
            ctx, drafts, n = pending[r], [], kk
            for i in range(kk):
                drafts.append(drafter_next[ctx])
                if kind == "confidence" and i < kk - 1 and drafter_conf[ctx] < threshold:
                    n = i + 1  # the drafter's probability of the token it just drafted fell below the threshold
                    break
                ctx = drafts[-1]
            n = min(n, max(remaining[r] - 1, 0))  # the loop caps each row at what it has left to generate, minus 1
            ctx, acc = pending[r], 0
            while acc < n and drafts[acc] == T_NEXT[ctx]:
                ctx, acc = drafts[acc], acc + 1
            emitted = drafts[:acc] + [T_NEXT[ctx]]
            generated[r] += emitted[:remaining[r]]
            pending[r] = emitted[-1]
            nds.append(n)
            accs.append(acc)
        steps.append((kk, nds, accs))
        if kind == "heuristic":
            cur = heuristic_ref(cur, accs, nds, max_k)
        active = [r for r in active if len(generated[r]) < max_new]
    return steps, [generated[r] for r in sorted(generated)]


def run_engine(drafter_table: torch.Tensor, policy, last_tokens: list[int], max_new: int):
    target = bigram_lm(chain_table(T_NEXT, T_CONF))
    drafter = ModelDrafter(bigram_lm(drafter_table), draft_length=policy)
    ids = torch.tensor([[1, 2, t] for t in last_tokens])
    steps, seqs = [], [[] for _ in last_tokens]
    for ev in mmspec.generate_stream(target, ids, drafter=drafter, max_new_tokens=max_new):
        steps.append((ev.num_draft, ev.num_accepted))
        for row, toks in zip(ev.rows, ev.tokens):
            seqs[row] += toks
        stats = ev.stats
    return steps, seqs, stats


def compare(steps, seqs, ref_steps, ref_seqs):
    assert [s[0] for s in steps] == [s[1] for s in ref_steps]  # num_draft per step and row
    assert [s[1] for s in steps] == [s[2] for s in ref_steps]  # num_accepted per step and row
    assert seqs == ref_seqs


def test_replay_reproduces_plain_greedy():
    """The replay's tokens are the target's greedy chain (what every lossless policy must emit)."""
    _, seqs = replay([3, 5], 12, "heuristic", 2, drafter_next=D_NEXT)
    for start, seq in zip([3, 5], seqs):
        chain, t = [], start
        for _ in range(12):
            t = T_NEXT[t]
            chain.append(t)
        assert seq == chain


# ---------------------------------------------------------------- HeuristicDraftLength


@pytest.mark.parametrize("start,max_k,script,expected", [
    # (num_accepted, num_draft) per row for each step -> k after the step
    (1, 64, [([1], [1]), ([3], [3]), ([5], [5])], [3, 5, 7]),  # fully accepted: +2 each step
    (5, 64, [([0], [5]), ([3], [4]), ([0], [3]), ([1], [2]), ([0], [1]), ([0], [1])], [4, 3, 2, 1, 1, 1]),  # -1, floor 1
    (4, 7, [([4], [4]), ([6], [6]), ([7], [7]), ([2], [7])], [6, 7, 7, 6]),  # +2 capped at max_k
    (3, 64, [([3, 3], [3, 3]), ([5, 4], [5, 5]), ([2, 2], [4, 2])], [5, 4, 3]),  # every row must accept fully
    (3, 64, [([2], [2]), ([0], [0])], [5, 7]),  # a short draft (num_draft < k) fully accepted counts as full
])
def test_heuristic_schedule_table(start, max_k, script, expected):
    p = HeuristicDraftLength(start, max_k=max_k)
    seq = []
    for acc, drafted in script:
        p.update(torch.tensor(acc), torch.tensor(drafted))
        seq.append(p.current())
    assert seq == expected
    cur, ref = start, []  # the written-out reference agrees
    for acc, drafted in script:
        cur = heuristic_ref(cur, acc, drafted, max_k)
        ref.append(cur)
    assert ref == expected


def test_heuristic_grows_k_when_the_drafter_is_the_target():
    """Drafter = target under greedy: every step fully accepted, so k runs 1, 3, 5, 7, ... (capped by what
    is left to generate) and the drafted tokens per step grow."""
    table = chain_table(T_NEXT, T_CONF)
    steps, seqs, stats = run_engine(table, HeuristicDraftLength(1, max_k=64), [3, 5], 30)
    ref_steps, ref_seqs = replay([3, 5], 30, "heuristic", 1, drafter_next=T_NEXT)
    compare(steps, seqs, ref_steps, ref_seqs)
    # k + 1 tokens per step: 2 + 4 + 6 + 8 + 10 = 30
    assert [nd for nd, _ in steps] == [[1, 1], [3, 3], [5, 5], [7, 7], [9, 9]]
    assert stats.acceptance_rate == 1.0 and stats.drafted_tokens == 2 * (1 + 3 + 5 + 7 + 9)


def test_heuristic_shrinks_k_when_every_draft_is_rejected():
    table = chain_table(ANTI_NEXT, T_CONF)
    steps, seqs, stats = run_engine(table, HeuristicDraftLength(5), [3, 5], 8)
    ref_steps, ref_seqs = replay([3, 5], 8, "heuristic", 5, drafter_next=ANTI_NEXT)
    compare(steps, seqs, ref_steps, ref_seqs)
    # the last step has one token left per row: nothing to draft
    assert [nd[0] for nd, _ in steps] == [5, 4, 3, 2, 1, 1, 1, 0] and stats.accepted_tokens == 0


def test_heuristic_follows_partial_acceptance():
    """A drafter wrong only after token 6: k moves up and down with the rows' acceptances."""
    table = chain_table(D_NEXT, T_CONF)
    steps, seqs, _ = run_engine(table, HeuristicDraftLength(2, max_k=6), [3, 5], 25)
    ref_steps, ref_seqs = replay([3, 5], 25, "heuristic", 2, drafter_next=D_NEXT, max_k=6)
    compare(steps, seqs, ref_steps, ref_seqs)
    ks = [s[0] for s in ref_steps]
    assert any(b > a for a, b in zip(ks, ks[1:])) and any(b < a for a, b in zip(ks, ks[1:]))
    # a policy that never changes k is told apart
    fixed, _ = replay([3, 5], 25, "fixed", 2, drafter_next=D_NEXT)
    assert [s[1] for s in fixed] != [s[1] for s in ref_steps]


# ---------------------------------------------------------------- ConfidenceDraftLength


def test_confidence_stop_rows_table():
    p = ConfidenceDraftLength(4, threshold=0.45)
    conf = torch.tensor([0.0, 0.3, 0.4499, 0.45, 0.4501, 0.9, 1.0])
    assert p.stop_rows(conf).tolist() == [True, True, True, False, False, False, False]
    assert not ConfidenceDraftLength(4, threshold=0.0).stop_rows(conf).any()
    assert p.current() == 4


@pytest.mark.parametrize("threshold,first", [(0.5, [3, 1]), (0.4, [3, 1]), (0.25, [5, 5])])
def test_confidence_stops_each_row_below_the_threshold(threshold, first):
    """Drafter = target (greedy): the drafter's confidence after token t is T_CONF[t], so a row's draft ends
    right after the first token drafted with confidence < threshold; rows stop independently.
    First step: row 0 (last token 3) drafts 4 (0.9), 5 (0.9), 6 (0.3); row 1 (last token 5) drafts 6 (0.3)."""
    table = chain_table(T_NEXT, T_CONF)
    steps, seqs, stats = run_engine(table, ConfidenceDraftLength(5, threshold=threshold), [3, 5], 20)
    ref_steps, ref_seqs = replay([3, 5], 20, "confidence", 5, threshold=threshold)
    compare(steps, seqs, ref_steps, ref_seqs)
    assert steps[0][0] == first
    assert stats.acceptance_rate == 1.0
    if threshold > 0.3:
        assert stats.drafted_tokens < 5 * stats.row_steps - 2  # drafting really stopped early


def test_confidence_schedule_differs_from_a_fixed_one():
    """The same run with FixedDraftLength(5), and with threshold 0 (never stops), drafts k every step:
    a policy ignoring the confidence is told apart from ConfidenceDraftLength(0.5)."""
    table = chain_table(T_NEXT, T_CONF)
    fixed_steps, _, _ = run_engine(table, FixedDraftLength(5), [3, 5], 20)
    never, _, _ = run_engine(table, ConfidenceDraftLength(5, threshold=0.0), [3, 5], 20)
    conf, _, _ = run_engine(table, ConfidenceDraftLength(5, threshold=0.5), [3, 5], 20)
    assert fixed_steps == never
    assert all(len(set(nd)) == 1 for nd, _ in fixed_steps)
    assert conf != fixed_steps


def drafter_prob(ctx: int, tok: int) -> float:
    return T_CONF[ctx] if tok == T_NEXT[ctx] else (1 - T_CONF[ctx]) / (V - 1)


@pytest.mark.parametrize("threshold", [0.95, 0.4, 0.01])
def test_confidence_uses_the_drafters_probability_when_sampling(threshold):
    """Sampling (temperature 1), drafter = target, so every draft is accepted and a row's drafts are the first
    num_draft tokens it commits. The confidence of a draft is the drafter's probability of the token it drew
    (T_CONF[ctx] on the chain, (1 - T_CONF[ctx]) / 7 off it, between 0.014 and 0.9): each row's draft must end
    exactly after its first draft below the threshold (0.95: always after one; 0.01: never early)."""
    target = bigram_lm(chain_table(T_NEXT, T_CONF))
    ids = torch.tensor([[1, 2, 3], [1, 2, 5], [1, 2, 7], [1, 2, 4]])
    max_new, k = 16, 4
    drafter = ModelDrafter(bigram_lm(chain_table(T_NEXT, T_CONF)),
                           draft_length=ConfidenceDraftLength(k, threshold=threshold))
    done, last = [0] * 4, ids[:, -1].tolist()
    stopped_early = reached_k = 0
    for ev in mmspec.generate_stream(target, ids, drafter=drafter, max_new_tokens=max_new, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0)):
        assert ev.num_accepted == ev.num_draft
        for row, toks, nd in zip(ev.rows, ev.tokens, ev.num_draft):
            cap = min(k, max_new - done[row] - 1)
            ctx, probs = last[row], []
            for tok in toks[:nd]:
                probs.append(drafter_prob(ctx, tok))
                ctx = tok
            assert all(q >= threshold for q in probs[:-1])  # drafting went on past every confident draft
            if nd < cap:
                assert probs[-1] < threshold  # and stopped right after an unconfident one
                stopped_early += 1
            else:
                reached_k += nd == k
            done[row] += len(toks)
            last[row] = toks[-1]
    assert done == [max_new] * 4
    if threshold == 0.95:
        assert reached_k == 0 and stopped_early > 0
    elif threshold == 0.01:
        assert stopped_early == 0
    else:
        assert stopped_early > 0 and reached_k > 0


# ---------------------------------------------------------------- CostAwareDraftLength

from mmspec.drafters import CostAwareDraftLength, CostModel, PromptLookupDrafter  # noqa: E402
from mmspec.errors import InvalidDraftLengthError  # noqa: E402

FLAT = CostModel(widths=(1, 16), seconds=(1.0, 1.0))  # verifying up to 16 tokens costs one forward
LINEAR = CostModel(widths=(1, 2), seconds=(1.0, 2.0))  # every token costs a forward: drafts never pay
# SmolLM2-135M packed on the 2-core AVX2 machine (benchmarks/RESULTS.md, issue 32): verify(w) in 1-token forwards
SMOLLM2 = CostModel(widths=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                    seconds=(1.0, 1.10, 1.16, 1.19, 1.33, 1.36, 1.66, 1.81, 2.11, 2.60))


@pytest.mark.parametrize("cost, a, rows, max_k, expected", [
    (FLAT, 0.9, 1, 10, 10),  # free verification: draft all that is allowed
    (FLAT, 0.9, 1, 4, 4),
    (LINEAR, 0.9, 1, 10, 1),  # each drafted token costs a forward: the least drafting
    (SMOLLM2, 0.9, 1, 10, 10),
    (SMOLLM2, 0.3, 1, 10, 2),  # rate(2) = (1 + .3 + .09) / verify(3) = 1.39 / 1.16
    (SMOLLM2, 0.1, 1, 10, 1),
    (SMOLLM2, 0.9, 4, 10, 5),  # four rows: the same drafts make forwards four times as wide
    (SMOLLM2, 0.6, 4, 10, 3),
    (CostModel(widths=SMOLLM2.widths, seconds=SMOLLM2.seconds, level_cost=0.2), 0.9, 1, 10, 7),  # drafter forwards: 7, not 10
])
def test_cost_aware_k_table(cost, a, rows, max_k, expected):
    p = CostAwareDraftLength(cost, max_k=max_k)
    assert p.best_k(a, rows) == expected
    rates = [rows * sum(a ** i for i in range(k + 1)) / (cost.relative(rows * (1 + k)) + k * cost.level_cost)
             for k in range(1, max_k + 1)]
    assert expected == 1 + max(range(max_k), key=rates.__getitem__)  # the written-out argmax agrees


def test_cost_aware_acceptance_estimate_counts_rejections_per_row_step():
    p = CostAwareDraftLength(SMOLLM2, prior=0.5, decay=1.0)
    assert p.acceptance == pytest.approx(0.5) and p.current() == p.best_k(0.5, 1)
    # rows accept 2 of 3 (2 successes, 1 failure), draft nothing (ignored), accept 3 of 3 (3 successes)
    p.update(torch.tensor([2, 0, 3]), torch.tensor([3, 0, 3]))
    assert p.acceptance == pytest.approx((5 + 1) / (6 + 2))
    # depth 1: tried 2, passed 2; depth 2: tried 2, passed 2; depth 3: tried 2, passed 1 (the first row's miss)
    assert p.acceptance_by_depth[:4] == pytest.approx([(2 + 1.5) / 4, (2 + 1.5) / 4, (1 + 1.5) / 4, 0.75])
    assert p.current() == p.best_k(p.acceptance_by_depth, 3)
    assert CostAwareDraftLength(SMOLLM2, profile=False).acceptance_by_depth == [0.5] * 10
    q = CostAwareDraftLength(SMOLLM2, prior=0.5, decay=0.5)
    q.update(torch.tensor([0]), torch.tensor([4]))
    q.update(torch.tensor([4]), torch.tensor([4]))
    assert q.acceptance == pytest.approx((4 + 1) / (4 + 0.5 + 2))  # the older failure counts half


@pytest.mark.parametrize("profile, expected", [
    ([0.4] + [0.95] * 9, 10),  # a copy that starts goes on (prompt lookup): draft long
    ([0.53] * 10, 3),  # one rate for every depth, about the pooled rate of such tries: draft short
    ([0.9, 0.9, 0.0] + [0.9] * 7, 2),  # a wall at depth 3 stops the chain before it
])
def test_cost_aware_k_follows_the_acceptance_profile(profile, expected):
    p = CostAwareDraftLength(SMOLLM2, max_k=10)
    assert p.best_k(profile, 1) == expected
    reach = [math.prod(profile[:i]) for i in range(11)]
    rates = [sum(reach[:k + 1]) / SMOLLM2.relative(1 + k) for k in range(1, 11)]
    assert expected == 1 + max(range(10), key=rates.__getitem__)  # the written-out argmax agrees


def test_cost_aware_profile_learns_that_long_copies_go_on():
    """Steps that miss the first draft three times in four and otherwise accept all ten: the per-depth rates see
    a_1 ~ 0.25 and a_2.. ~ 1, so k is 10; the geometric model pools the same counts to one rate (~ 0.7) and drafts
    less."""
    prof, geo = (CostAwareDraftLength(SMOLLM2, max_k=10, profile=on) for on in (True, False))
    for acc in [0, 0, 0, 10] * 10:
        for p in (prof, geo):
            p.update(torch.tensor([acc]), torch.tensor([10]))
    assert prof.acceptance_by_depth[0] == pytest.approx(0.25, abs=0.1) and min(prof.acceptance_by_depth[1:]) > 0.9
    assert prof.current() == 10 and geo.current() < 10


def test_cost_aware_no_drafts_is_a_choice_with_probes():
    """min_k = 0: where even one draft costs more than it is expected to give (verify(2) = 1.5 forwards, a = 0.2),
    the policy drafts nothing, except one token every probe_every-th step; once probes are accepted it drafts again."""
    costly = CostModel(widths=(1, 2, 16), seconds=(1.0, 1.5, 3.0))
    p = CostAwareDraftLength(costly, max_k=4, prior=0.2, min_k=0, probe_every=4)
    assert p.best_k(0.2, 1) == 0 and CostAwareDraftLength(costly, max_k=4).best_k(0.2, 1) == 1  # min_k = 1: never 0
    assert [p.current() for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    for _ in range(6):
        p.update(torch.tensor([1]), torch.tensor([1]))  # the probes are accepted
    assert p.current() >= 1


def test_cost_aware_prompt_lookup_that_abstains_is_greedy_identical():
    """Prompt lookup with min_k = 0: the prompt's repeats mislead it (3 5 3 5 3, the target says 3 4 5 6 7), so it
    abstains and probes, then the target's own cycle is copyable and it drafts; greedy output is HF's throughout."""
    torch.manual_seed(0)
    target = bigram_lm(chain_table(T_NEXT, T_CONF))
    ids = torch.tensor([[3, 5, 3, 5, 3, 5, 3]])
    costly = CostModel(widths=(1, 2, 16), seconds=(1.0, 1.5, 3.0))
    policy = CostAwareDraftLength(costly, max_k=4, prior=0.5, min_k=0)
    ks = []
    record = policy.current
    policy.current = lambda: ks.append(record()) or ks[-1]
    out = mmspec.generate(target, ids, drafter=PromptLookupDrafter(2, draft_length=policy), max_new_tokens=24)
    assert torch.equal(out.sequences, target.generate(ids, do_sample=False, max_new_tokens=24))
    assert 0 in ks and max(ks) >= 2 and out.stats.accepted_tokens > 0  # it abstained, and later drafted


@pytest.mark.parametrize("kwargs, match", [(dict(cost_model=None), "cost_model must have relative"),
                                           (dict(cost_model=FLAT, min_k=2), "min_k 0 or 1"),
                                           (dict(cost_model=FLAT, probe_every=0), "probe_every an int"),
                                           (dict(cost_model=FLAT, prior_weight=0), "prior_weight > 0"),
                                           (dict(cost_model=FLAT, max_k=0), "max_k must be an int >= 1"),
                                           (dict(cost_model=FLAT, prior=1.5), "prior in"),
                                           (dict(cost_model=FLAT, decay=0.0), "decay in")])
def test_cost_aware_bad_input_is_named(kwargs, match):
    with pytest.raises(InvalidDraftLengthError, match=match):
        CostAwareDraftLength(**kwargs)


def test_cost_aware_prompt_lookup_is_greedy_identical_and_adapts_k():
    """Prompt lookup under the cost-aware policy emits the target's greedy tokens; on a repetitive target its
    drafts are accepted, so k climbs from the prior's choice (1) to max_k."""
    target = bigram_lm(chain_table(T_NEXT, T_CONF))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 3]])
    policy = CostAwareDraftLength(SMOLLM2, max_k=8, prior=0.1)
    assert policy.current() == 1
    out = mmspec.generate(target, ids, drafter=PromptLookupDrafter(2, draft_length=policy), max_new_tokens=40)
    ref = target.generate(ids, do_sample=False, max_new_tokens=40)
    assert torch.equal(out.sequences, ref)
    assert policy.acceptance > 0.8 and policy.current() == 8


def test_cost_aware_k_through_num_draft_tokens_with_a_head_at_batch_two_is_greedy_identical():
    """The policy passed as ``num_draft_tokens`` reaches an EAGLE-3 head's chains; two left-padded rows, one
    ending early at EOS, decode exactly as HF greedy generate."""
    from test_feature_drafter import make_head
    from tiny_models import build

    from mmspec.drafters import FeatureDrafter

    torch.manual_seed(0)
    target = build("llama", layers=2)
    head = make_head(target)
    ids = torch.tensor([[5, 17, 33, 9, 5, 17], [0, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
    plain = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    eos = int(plain[1, 6 + 5])  # row 1's sixth new token: it ends there (or earlier, where it repeats before)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                          eos_token_id=eos)
    policy = CostAwareDraftLength(SMOLLM2, max_k=4, prior=0.9)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=FeatureDrafter(head), num_draft_tokens=policy,
                          max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences[:, :ref.shape[1]], ref)
    assert out.stats.drafted_tokens > 0 and 0.0 <= policy.acceptance <= 1.0


def _lookup_prompts(batch: int):
    """Left-padded rows whose last bigram occurred earlier, so prompt lookup drafts from the first step."""
    g = torch.Generator().manual_seed(batch)
    rows, mask = [], []
    for i in range(batch):
        piece = torch.randint(3, 60, (4,), generator=g).tolist()
        row = piece * 3 + piece[:2]
        rows.append([0] * i + row[i:])
        mask.append([0] * i + [1] * (len(row) - i))
    return torch.tensor(rows), torch.tensor(mask)


def test_cost_aware_prompt_lookup_at_batch_four_is_greedy_identical():
    """Four left-padded rows of a random tiny Llama: cost-aware prompt lookup (no drafts a choice) emits HF greedy
    generate's tokens in every row."""
    from tiny_models import build

    target = build("llama", layers=2)
    ids, mask = _lookup_prompts(4)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    policy = CostAwareDraftLength(SMOLLM2, max_k=4, prior=0.6, min_k=0)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=PromptLookupDrafter(2, draft_length=policy),
                          max_new_tokens=24, pad_token_id=0)
    assert torch.equal(out.sequences[:, :ref.shape[1]], ref)
    assert out.stats.drafted_tokens > 0


class _ClaimsUniformLookup(PromptLookupDrafter):
    """Wrong on purpose: deterministic lookup drafts verified as if drawn from a uniform distribution, so each is
    accepted with min(1, V p(x)) instead of p(x) (the negative control of the sampling test below)."""

    def propose(self, max_tokens):
        d = super().propose(max_tokens)
        vocab = self._vocab
        return type(d)(tokens=d.tokens, probs=torch.full((*d.tokens.shape, vocab), 1.0 / vocab),
                       num_draft=d.num_draft)


def _lookup_draws(cls, draws=20_000):
    from stat_helpers import chisquare_pvalue, first_two_token_tables
    from tiny_models import build

    target = build("llama", layers=3, init=0.08)
    prompt = torch.tensor([[5, 17, 33, 9, 5, 17, 33, 9, 5, 17]])
    drafter = cls(2, draft_length=CostAwareDraftLength(FLAT, max_k=3, prior=0.9))
    drafter._vocab = target.config.vocab_size
    out = mmspec.generate(target, prompt.expand(draws, -1).contiguous(), drafter=drafter, max_new_tokens=2,
                          temperature=1.0, seed=list(range(draws)), eos_token_id=[])
    new = out.sequences[:, -2:]
    p1, p12 = first_two_token_tables(target, prompt)
    vocab = p1.numel()
    return (chisquare_pvalue(new[:, 0], p1), chisquare_pvalue(new[:, 0] * vocab + new[:, 1], p12.flatten()),
            out.stats)


def test_sampling_with_cost_aware_prompt_lookup_follows_the_target_first_and_first_two_tokens():
    """T = 1: the fallback of ``mmspec run`` / ``text`` / ``chat`` (prompt lookup under the cost-aware policy) emits
    the target's distribution of the first token and of the first two (chi-square, 20,000 seeded rows)."""
    first, pair, stats = _lookup_draws(PromptLookupDrafter)
    assert stats.drafted_tokens > 0
    assert first > 1e-3 and pair > 1e-3


@pytest.mark.extended  # negative control
def test_the_lookup_sampling_test_catches_drafts_verified_as_if_sampled():
    first, pair, _ = _lookup_draws(_ClaimsUniformLookup)
    assert first < 1e-6 or pair < 1e-6
