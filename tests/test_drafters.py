"""Drafters, draft-length policies, cache sessions and the event stream."""

import pytest
import torch

import mmspec
from mmspec.cache import CacheSession
from mmspec.drafters.prompt_lookup import find_candidate
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
    steps = 0
    for ev in mmspec.generate_stream(target, ids, drafter=drafter, max_new_tokens=15, num_draft_tokens=4):
        steps += 1
        for r, toks, n, d in zip(ev.rows, ev.tokens, ev.num_accepted, ev.num_draft):
            assert 0 <= n <= d and len(toks) <= n + 1
            rows[r].extend(toks)
    assert steps == out.stats.steps
    for r in range(2):
        gen = out.sequences[r, 7:7 + len(rows[r])].tolist()
        assert gen == rows[r]
    s = out.stats
    assert s.target_calls == s.steps + 1  # prefill + one call per step
    assert len(s.acceptance_per_position) == 4 and 1 <= s.mean_accepted_length <= 5
    assert s.total_time >= s.target_time + s.verify_time


def test_drafter_reused_across_calls_with_different_k():
    target = build("qwen2", vocab=64)
    drafter = mmspec.ModelDrafter(truncated_drafter(target))
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    a = mmspec.generate(target, ids, drafter=drafter, max_new_tokens=10, num_draft_tokens=2)
    b = mmspec.generate(target, ids, drafter=drafter, max_new_tokens=10, num_draft_tokens=5)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.stats.acceptance_per_position) == 2 and len(b.stats.acceptance_per_position) == 5
