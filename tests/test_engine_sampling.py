"""End-to-end sampling: the engine's distribution over the first three generated tokens equals the
target's own sampling distribution (exact enumeration with HF's warpers, and HF ``generate``)."""

import functools
import itertools

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import mmspec
from mmspec.verify import AcceptRule, Judgement
from tiny_models import build, truncated_drafter

V = 8
N = 40_000
PROMPT = torch.tensor([[3, 5, 1, 6]])
CONFIGS = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)]


@functools.lru_cache(maxsize=None)
def pair():
    target = build("llama", vocab=V, hidden=32, init=0.3, dtype=torch.float32, seed=4)
    target.generation_config.eos_token_id = None
    drafter = truncated_drafter(target)
    return target, drafter


def warp(scores, temperature, top_k, top_p):
    for w in ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
             ([TopKLogitsWarper(top_k)] if top_k else []) + \
             ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []):
        scores = w(None, scores)
    return scores.softmax(-1)


def exact_joint(target, cfg):
    """P(a, b, c) under the processed target distribution, by enumeration (V^3 cells)."""
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # [V^2, 2]
    ids = torch.cat([PROMPT.expand(len(pairs), -1), pairs], 1)
    with torch.no_grad():
        logits = target(ids).logits[:, -3:].float()  # positions predicting a, b, c
    probs = warp(logits.reshape(-1, V), **cfg).view(len(pairs), 3, V)
    pa = probs[0, 0]  # same for every row
    pb = probs[:, 1].view(V, V, V)[:, 0]  # [a, b]
    pc = probs[:, 2].view(V, V, V)  # [a, b, c]
    return (pa[:, None, None] * pb[:, :, None] * pc).flatten().double()


def cell_index(seqs):
    tail = seqs[:, PROMPT.shape[1]:PROMPT.shape[1] + 3]
    return tail[:, 0] * V * V + tail[:, 1] * V + tail[:, 2]


def pooled(counts_list, expected):
    """Cells with expected count <= 5 are pooled into one; impossible cells must stay empty."""
    impossible = expected == 0
    for c in counts_list:
        assert c[impossible].sum() == 0, "a sequence the target cannot produce was sampled"
    keep = expected * N > 5
    rest = ~keep & ~impossible
    if not rest.any():
        return [c[keep] for c in counts_list], expected[keep]
    return [torch.cat([c[keep], c[rest].sum()[None]]) for c in counts_list], \
        torch.cat([expected[keep], expected[rest].sum()[None]])


def gof_pvalue(idx, expected):
    (counts,), exp = pooled([torch.bincount(idx, minlength=V ** 3).double()], expected)
    return stats.chisquare(counts.numpy(), (exp / exp.sum() * counts.sum()).numpy()).pvalue


def engine_samples(cfg, seed, rule=None):
    target, drafter = pair()
    out = mmspec.generate(target, PROMPT.expand(N, -1).contiguous(), drafter=drafter, max_new_tokens=3,
                          num_draft_tokens=2, generator=torch.Generator().manual_seed(seed), rule=rule,
                          **cfg)
    return out


@pytest.mark.parametrize("cfg", CONFIGS)
def test_engine_first_three_tokens_match_target(cfg):
    target, _ = pair()
    expected = exact_joint(target, cfg)
    out = engine_samples(cfg, seed=11)
    assert 0.2 < out.stats.acceptance_rate < 0.95  # rejection + residual paths are exercised
    idx = cell_index(out.sequences)
    assert gof_pvalue(idx, expected) > 1e-3
    # two-sample test against HF's own sampling of the same target
    torch.manual_seed(5)
    hf = target.generate(PROMPT.expand(N, -1), attention_mask=torch.ones(N, PROMPT.shape[1], dtype=torch.long),
                         do_sample=True, max_new_tokens=3, **cfg)
    (a, b), _ = pooled([torch.bincount(idx, minlength=V ** 3).double(),
                        torch.bincount(cell_index(hf), minlength=V ** 3).double()], expected)
    table = torch.stack([a, b]).numpy()
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


class AlwaysAccept(AcceptRule):
    def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
        return Judgement(torch.ones_like(draft_tokens, dtype=torch.bool), target_probs)


def test_end_to_end_test_detects_a_wrong_rule():
    target, _ = pair()
    cfg = CONFIGS[0]
    out = engine_samples(cfg, seed=12, rule=AlwaysAccept())
    assert gof_pvalue(cell_index(out.sequences), exact_joint(target, cfg)) < 1e-6


def test_seeded_runs_are_reproducible():
    target, drafter = pair()
    ids = PROMPT.expand(4, -1).contiguous()
    run = lambda s: mmspec.generate(target, ids, drafter=drafter, max_new_tokens=12, temperature=1.0,
                                    num_draft_tokens=3, generator=torch.Generator().manual_seed(s)).sequences
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
