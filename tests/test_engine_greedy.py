"""Greedy speculative decoding is token-identical to HF ``generate(do_sample=False)``.

Oracle: HF transformers' own greedy search on the same target (float64 so that the different
matmul shapes of block verification cannot flip a near-tie)."""

import functools

import pytest
import torch

import mmspec
from tiny_models import ARCHS, build, left_padded_prompts, truncated_drafter

MAX_NEW = 24


@functools.lru_cache(maxsize=None)
def models(arch):
    target = build(arch)
    return target, {
        "smaller": build(arch, hidden=32, layers=1, seed=7),
        "truncated": truncated_drafter(target),
        "self": target,
        "prompt_lookup": "prompt_lookup",
    }


@functools.lru_cache(maxsize=None)
def reference(arch, batch):
    target, _ = models(arch)
    ids, mask = left_padded_prompts(batch, 12, target.config.vocab_size, seed=batch)
    # repeat a chunk so prompt lookup finds matches
    ids = torch.cat([ids, ids[:, -6:]], dim=1)
    mask = torch.cat([mask, torch.ones_like(mask[:, -6:])], dim=1)
    out = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)
    return ids, mask, out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("drafter_kind", ["smaller", "truncated", "self", "prompt_lookup"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate(arch, drafter_kind, k, batch):
    target, drafters = models(arch)
    ids, mask, expected = reference(arch, batch)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=drafters[drafter_kind],
                          max_new_tokens=MAX_NEW, num_draft_tokens=k)
    assert out.sequences.shape == expected.shape
    assert torch.equal(out.sequences, expected)
    if drafter_kind == "self":
        assert out.stats.acceptance_rate == 1.0


def test_partial_acceptance_is_exercised():
    """The truncated drafter must give partial acceptance, or the sweep above proves little."""
    target, drafters = models("llama")
    ids, mask, expected = reference("llama", 3)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=drafters["truncated"],
                          max_new_tokens=MAX_NEW, num_draft_tokens=3)
    assert torch.equal(out.sequences, expected)
    assert 0.05 < out.stats.acceptance_rate < 0.95


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_inside_accepted_block_truncates_row(arch):
    """Force an EOS into the middle of generation: rows stop there, like HF."""
    target, drafters = models(arch)
    ids, mask, free = reference(arch, 3)
    # choose as EOS a token that row 0 emits mid-way through its greedy continuation
    eos = int(free[0, ids.shape[1] + MAX_NEW // 2])
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                               eos_token_id=eos, pad_token_id=0)
    for drafter in (drafters["self"], drafters["truncated"]):
        out = mmspec.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=MAX_NEW,
                              num_draft_tokens=8, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out.sequences, expected)
        row0 = out.sequences[0, ids.shape[1]:].tolist()
        assert eos in row0 and row0.index(eos) <= MAX_NEW // 2


@pytest.mark.parametrize("policy", [
    mmspec.HeuristicDraftLength(2, max_k=10),
    mmspec.ConfidenceDraftLength(6, threshold=0.3),
])
def test_adaptive_draft_length_stays_lossless(policy):
    target, drafters = models("qwen2")
    ids, mask, expected = reference("qwen2", 3)
    out = mmspec.generate(target, ids, attention_mask=mask, drafter=drafters["truncated"],
                          max_new_tokens=MAX_NEW, num_draft_tokens=policy)
    assert torch.equal(out.sequences, expected)


def test_a_budget_per_row_ends_each_row_at_its_own():
    """generate_stream(max_new_tokens=[...]): each row stops (and leaves the batch) at its own budget, with the
    tokens HF generate gives it; a wrong list is a named error."""
    from mmspec.engine import generate_stream
    from mmspec.errors import InvalidLengthError

    target, drafters = models(ARCHS[0])
    ids, mask, expected = reference(ARCHS[0], 3)
    budgets = [5, MAX_NEW, 11]
    rows = [[] for _ in budgets]
    last_rows = None
    for ev in generate_stream(target, ids, attention_mask=mask, drafter="prompt_lookup", max_new_tokens=budgets):
        for r, toks in zip(ev.rows, ev.tokens):
            rows[r].extend(toks)
        last_rows = ev.rows
    assert last_rows == [1]  # the longest row ran alone at the end
    for b, (row, n) in enumerate(zip(rows, budgets)):
        assert row == expected[b, ids.shape[1]: ids.shape[1] + n].tolist()
    with pytest.raises(InvalidLengthError, match="one per row \\(3\\)"):
        generate_stream(target, ids, attention_mask=mask, drafter="prompt_lookup", max_new_tokens=[5, 6])
    with pytest.raises(InvalidLengthError, match="one per row"):
        generate_stream(target, ids, attention_mask=mask, drafter="prompt_lookup", max_new_tokens=[5, 0, 2])


@pytest.mark.parametrize("drafter", ["prompt_lookup", None])
def test_rows_joining_a_running_batch_get_what_they_get_alone(drafter):
    """Continuous batching: prompts admitted between steps (Admission) decode greedily to HF generate's tokens
    for each alone, and a seeded sampled row gives the same tokens joining late as decoded alone."""
    from mmspec.engine import Admission, generate_stream

    target, _ = models(ARCHS[0])
    ids, mask, expected = reference(ARCHS[0], 3)
    start = ids[:1], mask[:1]
    queue = [(ids[1:2], mask[1:2]), (ids[2:3], mask[2:3])]
    calls = []

    def admit(running):
        calls.append(running)
        if len(calls) in (2, 5) and queue:  # one row joins after step 2, the other after step 5
            i, m = queue.pop(0)
            return Admission(i, m, [MAX_NEW], [0])
        return None

    rows: dict[int, list[int]] = {}
    for ev in generate_stream(target, start[0], attention_mask=start[1], drafter=drafter, max_new_tokens=MAX_NEW,
                              admit=admit):
        for r, toks in zip(ev.rows, ev.tokens):
            rows.setdefault(r, []).extend(toks)
    assert sorted(rows) == [0, 1, 2] and not queue
    for b in range(3):
        assert rows[b] == expected[b, ids.shape[1]:].tolist()

    # sampled: a seeded row joining late = the same row alone
    def sample(prompt_ids, prompt_mask, seed, admit_fn=None, first=None):
        out: dict[int, list[int]] = {}
        a, m = first if first is not None else (prompt_ids, prompt_mask)
        for ev in generate_stream(target, a, attention_mask=m, drafter=drafter, max_new_tokens=12,
                                  temperature=1.0, seed=[seed] if first is None else [7], admit=admit_fn):
            for r, toks in zip(ev.rows, ev.tokens):
                out.setdefault(r, []).extend(toks)
        return out

    alone = sample(ids[2:3], mask[2:3], 123)[0]
    pending = [(ids[2:3], mask[2:3])]
    late = sample(None, None, None, first=(ids[:1], mask[:1]),
                  admit_fn=lambda n: Admission(*pending.pop(0), [12], [123]) if pending else None)
    assert late[1] == alone


def test_rows_the_caller_ends_leave_and_the_others_are_unchanged():
    """generate_stream(leave=...): a row the caller ends leaves the batch after that step; the other rows still
    get HF generate's tokens."""
    from mmspec.engine import generate_stream

    target, _ = models(ARCHS[0])
    ids, mask, expected = reference(ARCHS[0], 3)
    rows: dict[int, list[int]] = {}
    seen_after: list[list[int]] = []
    for ev in generate_stream(target, ids, attention_mask=mask, drafter="prompt_lookup", max_new_tokens=MAX_NEW,
                              leave=lambda r: r == 1 and len(rows.get(1, [])) >= 3):
        for r, toks in zip(ev.rows, ev.tokens):
            rows.setdefault(r, []).extend(toks)
        if len(rows.get(1, [])) >= 3:
            seen_after.append(ev.rows)
    assert all(1 not in r for r in seen_after[1:])  # gone from the step after it was ended
    assert 3 <= len(rows[1]) < MAX_NEW
    for b in (0, 2):
        assert rows[b] == expected[b, ids.shape[1]:].tolist()
