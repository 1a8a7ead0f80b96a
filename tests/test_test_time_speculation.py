"""Test-Time Speculation: the head learns online from verified target distributions, the output never changes.

Greedy output stays token-identical to HF ``generate`` (three families, chains and trees, batches with
padding) while the head's weights change; sampled output keeps the target's first- and first-two-token
distributions (chi-square, with update every step); scopes reset or keep what was learnt; bad settings are
named errors; on a repetitive continuation the learning head's acceptance grows."""

from __future__ import annotations

import pytest
import torch

from mmspec import engine
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.test_time_speculation import TTSConfig, TTSConfigError, TTSDrafter
from mmspec.drafters.tree import DynamicTree
from stat_helpers import chisquare_pvalue
from test_feature_drafter import V, _target_tables, make_head
from tiny_models import ARCHS, build, left_padded_prompts

FAST = dict(update_every=1, window=24, lr=3e-3)


def _weights(head):
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def _changed(before, head):
    return any(not torch.equal(before[k], v) for k, v in head.state_dict().items() if k in before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_greedy_identical_to_hf_while_the_head_learns(arch, shape):
    target = build(arch, layers=3)
    head = make_head(target)
    before = _weights(head)
    ids, mask = left_padded_prompts(3, 9, V, seed=4)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    inner = FeatureDrafter(head, 4) if shape == "chain" else FeatureDrafter(head, tree=DynamicTree(depth=3, top_k=3,
                                                                                                      num_nodes=8))
    tts = TTSDrafter(inner, TTSConfig(scope="persistent", **FAST))
    out = engine.generate(target, ids, attention_mask=mask, drafter=tts, max_new_tokens=24)
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)
    assert tts.updates > 0 and _changed(before, tts.head)
    assert not _changed(before, head)  # the wrapper learns on its own copy


def test_lora_updates_only_adapters_and_keeps_greedy_identity():
    target = build("llama", layers=3)
    head = make_head(target)
    ids, mask = left_padded_prompts(2, 7, V, seed=1)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    tts = TTSDrafter(FeatureDrafter(head, 3), TTSConfig(params="lora", lora_rank=4, scope="persistent", **FAST))
    head = tts.head
    base = {k: v.clone() for k, v in head.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in head.state_dict().items() if "lora_" in k}
    assert lora  # adapters were added
    out = engine.generate(target, ids, attention_mask=mask, drafter=tts, max_new_tokens=20)
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)
    after = head.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert any(not torch.equal(v, after[k]) for k, v in lora.items())


def test_scopes_reset_or_keep_what_was_learnt():
    target = build("llama", layers=3)
    ids, mask = left_padded_prompts(2, 7, V, seed=2)
    for scope in ("request", "persistent"):
        head = make_head(target)
        start = _weights(head)
        tts = TTSDrafter(FeatureDrafter(head, 3), TTSConfig(scope=scope, **FAST))
        head = tts.head
        engine.generate(target, ids, attention_mask=mask, drafter=tts, max_new_tokens=16)
        learnt = _weights(head)
        assert _changed(start, head)
        tts.start(ids, mask, sampling=engine.SamplingParams(), rng=engine.RowRandom([0, 1]))
        assert _changed(learnt, head) == (scope == "request")  # request scope: back to the start
        if scope == "request":
            assert not _changed(start, head)
        tts.reset()
        assert not _changed(start, head)


@pytest.mark.extended  # an update every step
def test_sampling_keeps_the_targets_distribution_with_updates_every_step():
    target = build("llama", layers=3, init=0.08)
    head = make_head(target)
    prompt = torch.tensor([[5, 17, 33, 9, 41, 12]])
    n = 25_000
    tts = TTSDrafter(FeatureDrafter(head, 1), TTSConfig(update_every=1, window=16, lr=1e-2))
    out = engine.generate(target, prompt.expand(n, -1).contiguous(), drafter=tts, max_new_tokens=2, temperature=1.0,
                          seed=list(range(n)), eos_token_id=[])
    assert tts.updates >= 1  # the second token of rows that rejected their first draft came from an updated head
    new = out.sequences[:, -2:]
    p1, p12 = _target_tables(target, prompt)
    assert chisquare_pvalue(new[:, 0], p1) > 1e-3
    assert chisquare_pvalue(new[:, 0] * V + new[:, 1], p12.flatten()) > 1e-3


def test_the_head_learns_a_periodic_continuation():
    """A weakly initialised target falls into a period-2 loop: the fixed random head never drafts it, the learning
    head picks it up from the verified distributions (no extra target forward)."""
    target = build("llama", layers=3, init=0.1)
    ids = torch.tensor([[11, 23, 5, 42, 8, 61, 19, 33]])
    accepted, seqs = {}, {}
    for name, drafter in (("fixed", FeatureDrafter(make_head(target), 4)),
                          ("tts", TTSDrafter(FeatureDrafter(make_head(target), 4),
                                             TTSConfig(update_every=1, window=48, lr=1e-2)))):
        out = engine.generate(target, ids, drafter=drafter, max_new_tokens=200, eos_token_id=[])
        accepted[name], seqs[name] = out.stats.accepted_tokens, out.sequences
    assert torch.equal(seqs["tts"], seqs["fixed"])
    assert accepted["fixed"] <= 5 and accepted["tts"] >= 25


@pytest.mark.parametrize("kw,match", [(dict(update_every=0), "update_every"), (dict(window=1), "window"),
                                      (dict(lr=float("nan")), "lr"), (dict(lr=-1.0), "lr"),
                                      (dict(params="everything"), "params"), (dict(scope="forever"), "scope")])
def test_bad_settings_are_named_errors(kw, match):
    with pytest.raises(TTSConfigError, match=match):
        TTSConfig(**kw)


def test_wraps_only_feature_drafters():
    target = build("llama", layers=2)
    with pytest.raises(TypeError, match="wraps a FeatureDrafter"):
        TTSDrafter(target)
