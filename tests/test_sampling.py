"""Logits processing equals HF's warpers (temperature -> top-k -> top-p)."""

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from mmspec import InvalidSamplingError, SamplingParams
from mmspec.sampling import logits_to_probs, process_logits, sample


def hf_process(scores, t, k, p):
    if t != 1.0:
        scores = TemperatureLogitsWarper(t)(None, scores)
    if k:
        scores = TopKLogitsWarper(k)(None, scores)
    if p is not None and p < 1.0:
        scores = TopPLogitsWarper(p)(None, scores)
    return scores


@pytest.mark.parametrize("t,k,p", [
    (1.0, None, None), (0.5, None, None), (1.3, 3, None), (1.0, None, 0.7), (0.8, 5, 0.9),
    (1.0, 1, None), (2.0, 100, 0.5), (1.0, None, 1.0), (0.9, 0, 0.3),
])
def test_matches_hf_warpers(t, k, p, gen):
    logits = torch.randn(4, 3, 20, generator=gen) * 3
    logits[0, 0, :5] = 1.0  # ties at the top-k boundary
    ours = process_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
    theirs = hf_process(logits.view(-1, 20).float(), t, k, p).view(4, 3, 20)
    assert torch.equal(ours, theirs)


def test_greedy_probs_are_one_hot_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    probs = logits_to_probs(logits, SamplingParams(0.0))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert sample(probs, SamplingParams(0.0), None).tolist() == [1]


def test_exponential_race_sampling_is_distributed_like_probs(gen):
    from scipy import stats
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = sample(probs.expand(200_000, 4), SamplingParams(1.0), gen)
    counts = torch.bincount(draws, minlength=4).numpy()
    assert stats.chisquare(counts, probs.double().numpy() * counts.sum() / probs.double().sum().item()).pvalue > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_k=-1), "top_k"), (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidSamplingError, match=match):
        SamplingParams(**kwargs)
