"""Per-step overhead (issue 13, item 5): the loop feeds the target what HF's prompt lookup feeds it.

A step where no row drafts feeds one token per row (no dummy draft column); the last step drafts
nothing; prompt-lookup drafts stop before EOS; plain AR and prompt lookup feed the prompt in their
first step, with the first draft (as many target forwards, as wide, as HF ``generate``); the greedy
verification fast path and the uniform rollback give exactly what the general paths give. No timing
assertions."""

import functools

import pytest
import torch

import mmspec
from mmspec.cache import CacheSession
from mmspec.config import SamplingParams
from mmspec.drafters.prompt_lookup import PromptLookupDrafter
from mmspec.engine import prefill_causal_lm
from mmspec.errors import InvalidDraftLengthError, NonFiniteError, TokenIdError
from mmspec.verify.chain import verify_chain
from tiny_models import build, truncated_drafter

EOS = 2


@functools.lru_cache(maxsize=None)
def target():
    return build("llama")


class Widths:
    """Tokens fed per target forward (a forward pre-hook)."""

    def __init__(self, model):
        self.calls: list[int] = []
        self.handle = model.register_forward_pre_hook(
            lambda m, args, kwargs: self.calls.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _steps_and_widths(model, ids, mask=None, **kwargs):
    """[(event, widths of the forwards run for that event)] from generate_stream."""
    out = []
    with Widths(model) as w:
        seen = 0
        for event in mmspec.generate_stream(model, ids, attention_mask=mask, **kwargs):
            out.append((event, w.calls[seen:]))
            seen = len(w.calls)
    return out


def test_a_step_without_drafts_feeds_one_token_per_row():
    model = target()
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 26, 27, 28]])  # no repeats
    steps = _steps_and_widths(model, ids, drafter="prompt_lookup", num_draft_tokens=4, max_new_tokens=24,
                              eos_token_id=[])
    event0, calls0 = steps[0]
    assert event0.num_draft == [0, 0] and calls0 == [ids.shape[1]]  # step 0 feeds the prompt, no dummy column
    no_draft = 0
    for event, calls in steps[1:]:
        assert calls == [1 + max(event.num_draft)]
        no_draft += max(event.num_draft) == 0
    assert no_draft > 0  # the prompts were chosen so that some steps find no n-gram


def test_drafts_never_exceed_what_the_row_may_still_emit():
    model = target()
    ids = torch.tensor([[5, 6, 7, 8] * 6])  # step 0 finds a match
    for max_new in (1, 2, 3, 7):
        steps = _steps_and_widths(model, ids, drafter="prompt_lookup", num_draft_tokens=5, max_new_tokens=max_new,
                                  eos_token_id=[])
        assert steps[0][0].num_draft == [min(5, max_new - 1)]
        emitted = 0
        for event, calls in steps:
            remaining = max_new - emitted
            assert max(event.num_draft) <= min(5, remaining - 1)  # the last step (remaining 1) drafts nothing
            assert calls == [(ids.shape[1] if event.step == 0 else 1) + max(event.num_draft)]
            emitted += len(event.tokens[0])
        assert emitted == max_new


def test_prompt_lookup_drafts_stop_before_eos():
    d = PromptLookupDrafter(draft_length=5)
    ids = torch.tensor([[5, 6, 9, EOS, 7, 8, 5, 6]])
    d.start(ids, torch.ones_like(ids), sampling=SamplingParams())
    assert d.propose(5).tokens.tolist() == [[9, EOS, 7, 8, 5]]  # no stop tokens: as found
    d.set_stop_tokens({EOS})
    assert d.propose(5).tokens.tolist() == [[9]]
    d.contexts = [[5, 6, EOS, 7, 5, 6]]  # the continuation starts with EOS: no draft at all, as HF
    draft = d.propose(5)
    assert draft.k == 0 and draft.num_draft.tolist() == [0]
    own = PromptLookupDrafter(draft_length=5, stop_tokens=())  # given at construction: the call's EOS is ignored
    own.set_stop_tokens({EOS})
    own.start(ids, torch.ones_like(ids), sampling=SamplingParams())
    assert own.propose(5).tokens.tolist() == [[9, EOS, 7, 8, 5]]


def test_the_loop_cuts_prompt_lookup_drafts_at_the_calls_eos():
    model = target()
    ids = torch.tensor([[5, 6, 9, EOS, 7, 8, 5, 6, 9, EOS, 7, 5, 6]])
    steps = _steps_and_widths(model, ids, drafter="prompt_lookup", num_draft_tokens=5, max_new_tokens=8,
                              eos_token_id=EOS)
    assert steps[0][0].num_draft == [1]  # the match [5, 6] continues with [9, EOS, ...]: cut before EOS
    for event, calls in steps:
        assert all(t != EOS for t in event.tokens[0][: event.num_accepted[0]])  # EOS is never a draft


@pytest.mark.parametrize("prompt_lookup", [False, True])
def test_as_many_target_forwards_as_hf_generate(prompt_lookup):
    model = target()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 10, 5, 6]])
    k, max_new = 4, 20
    hf_kwargs = dict(prompt_lookup_num_tokens=k) if prompt_lookup else {}
    with Widths(model) as w:
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                            **hf_kwargs)
    hf_calls = w.calls
    with Widths(model) as w:
        out = mmspec.generate(model, ids, drafter="prompt_lookup" if prompt_lookup else None, num_draft_tokens=k,
                              max_new_tokens=max_new)
    mm_calls = w.calls
    assert out.sequences[0, : hf.shape[1]].tolist() == hf[0].tolist()
    assert len(mm_calls) == len(hf_calls) == out.stats.target_calls
    assert mm_calls[0] == hf_calls[0]  # the prompt with the first draft
    assert mm_calls[0] > ids.shape[1] if prompt_lookup else mm_calls[0] == ids.shape[1]
    # near the end HF drafts past max_new_tokens (and trims the output); mmspec drafts what the row may emit
    assert all(m <= h for m, h in zip(mm_calls, hf_calls)) and mm_calls[:10] == hf_calls[:10]


def test_a_model_drafter_keeps_the_last_prompt_token_pending():
    model = target()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with Widths(model) as w:
        mmspec.generate(model, ids, drafter=truncated_drafter(model), num_draft_tokens=3, max_new_tokens=6)
    assert w.calls[0] == ids.shape[1] - 1


def _separate_prefill(session, input_ids, attention_mask, model_inputs):
    """The default prefill under another name: the loop then prefills and keeps the last prompt token pending."""
    prefill_causal_lm(session, input_ids, attention_mask, model_inputs)


@pytest.mark.parametrize("drafter", [None, "prompt_lookup"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_feeding_the_prompt_in_the_first_step_changes_no_output(drafter, temperature):
    model = target()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 3, 4], [0, 0, 11, 12, 13, 11, 12, 13, 14, 15]])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [2]])).long()
    kw = dict(attention_mask=mask, drafter=drafter, num_draft_tokens=3, max_new_tokens=12, temperature=temperature,
              seed=[3, 4], eos_token_id=[])
    new = mmspec.generate(model, ids, **kw)
    old = mmspec.generate(model, ids, prefill=_separate_prefill, **kw)
    assert torch.equal(new.sequences, old.sequences)  # same tokens, positions and keyed random numbers
    assert new.stats.target_calls == old.stats.target_calls - 1
    assert new.stats.steps == old.stats.steps


def _random_case(g, trial):
    batch, k, vocab = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (0, 5), (2, 12)))
    dtype = (torch.float32, torch.float64, torch.bfloat16)[trial % 3]
    if trial % 4:
        logits = torch.randint(-3, 3, (batch, k + 1, vocab), generator=g).to(dtype)  # many ties
    else:
        logits = torch.randn(batch, k + 1, vocab, generator=g).to(dtype)
    best = logits.float().argmax(-1)
    draft = torch.where(torch.rand(batch, k, generator=g) < 0.7, best[:, :k],
                        torch.randint(0, vocab, (batch, k), generator=g))
    num_draft = torch.randint(0, k + 1, (batch,), generator=g)
    if trial % 7 == 0 and k:
        draft[0, 0] = vocab + 3  # an id outside the vocabulary (an error only inside num_draft)
    if trial % 11 == 0:
        logits[0, -1, 0] = float("nan")  # an error only where the row may emit
    if trial % 13 == 0:
        num_draft[0] = k + 1
    return draft, logits, num_draft


def test_the_greedy_fast_path_equals_the_fused_reference():
    g = torch.Generator().manual_seed(0)
    errors = set()
    for trial in range(600):
        draft, logits, num_draft = _random_case(g, trial)
        results = []
        for backend in (None, "torch"):  # None on CPU: the fast path; "torch": the fused kernel's reference
            try:
                r = verify_chain(draft, None, logits, sampling=SamplingParams(), num_draft=num_draft, backend=backend)
                results.append((r.tokens.tolist(), r.num_accepted.tolist()))
            except (NonFiniteError, TokenIdError, InvalidDraftLengthError) as e:
                results.append((type(e).__name__, str(e)))
                errors.add(type(e).__name__)
        assert results[0] == results[1], (trial, results)
    assert errors == {"NonFiniteError", "TokenIdError", "InvalidDraftLengthError"}


def _session_pair():
    model = target()
    return CacheSession(model, 3, torch.device("cpu")), CacheSession(model, 3, torch.device("cpu"))


def _state(s):
    return (s.valid.tolist(), s.next_pos.tolist(), s.cache.get_seq_length() if s.cache is not None else 0)


@pytest.mark.parametrize("case", ["uniform", "zero", "everything_new", "per_row", "hole_before", "dead_tail"])
def test_the_uniform_rollback_equals_the_general_one(case):
    fast, general = _session_pair()
    general._drop_uniform_tail = lambda num_remove: False
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 90, (3, 6), generator=g)
    block = torch.randint(3, 90, (3, 4), generator=g)
    for s in (fast, general):
        s.extend(prompt, num_logits=1)
        if case == "hole_before":
            s.extend(block[:, :1], valid=torch.tensor([[0], [0], [0]]))  # a column no row uses
        s.extend(block[:, 1:] if case == "dead_tail" else block)
        if case == "dead_tail":
            s.extend(block[:, :1], valid=torch.tensor([[0], [0], [0]]))
    remove = {"uniform": [2, 2, 2], "zero": [0, 0, 0], "everything_new": [4, 4, 4], "per_row": [1, 3, 0],
              "hole_before": [4, 4, 4], "dead_tail": [1, 1, 1]}[case]
    for s in (fast, general):
        s.rollback(torch.tensor(remove))
    assert _state(fast) == _state(general)
    nxt = torch.randint(3, 90, (3, 2), generator=g)
    torch.testing.assert_close(fast.extend(nxt), general.extend(nxt))


def test_the_time_split_has_bookkeeping():
    model = target()
    out = mmspec.generate(model, torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]]), drafter="prompt_lookup",
                          max_new_tokens=10, eos_token_id=[])
    s = out.stats
    assert s.bookkeeping_time > 0
    assert s.total_time >= s.prefill_time + s.target_time + s.verify_time + s.bookkeeping_time
    assert "bookkeeping_time" in s.as_dict()
