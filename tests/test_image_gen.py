"""AR image generation: every method equals plain AR at temperature 0 (CFG on and off), exact and
SJD sample the target's distribution (chi-square, CFG on), CFG arithmetic, persistence, errors.

Oracle: a cache-free reference (full forward per token) written independently of the engine."""

import functools

import pytest
import torch
from scipy import stats

import mmspec.image_gen as ig
from mmspec import InvalidDraftLengthError, SamplingParams
from mmspec.errors import MethodParameterError, NonFiniteError
from mmspec.sampling import logits_to_probs
from tiny_image_models import reference_greedy, reference_logits, tiny_ar, truncated_ar

METHODS = ["ar", "exact", "sjd"]


@functools.lru_cache(maxsize=None)
def models(text=False):
    t = tiny_ar(text=text)
    return t, truncated_ar(t), tiny_ar(text=text, layers=1, hidden=16, seed=5)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_plain_ar_class_conditional(method, cfg, schedule, k):
    target, truncated, small = models()
    conds = [3, 7, 0]
    expected = [list(reference_greedy(target, c, cfg, schedule)) for c in conds]
    for drafter in ([truncated, small] if method == "exact" else [None]):
        extra = ig.METHODS[method].select(dict(drafter=drafter, num_draft_tokens=k))
        out = ig.generate(target, condition=conds, method=method, cfg_scale=cfg,
                          cfg_schedule=schedule, temperature=0.0, **extra)
        assert out.tokens.view(3, -1).tolist() == expected
        assert out.tokens.shape == (3, 4, 4)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_plain_ar_text_conditional(method):
    target, truncated, _ = models(text=True)
    prompts = ["a red circle left", "blue square"]  # different prefix lengths: left padding
    expected = [reference_greedy(target, p, 2.5) for p in prompts]
    extra = ig.METHODS[method].select(dict(drafter=truncated, num_draft_tokens=3))
    out = ig.generate(target, condition=prompts, method=method, cfg_scale=2.5, temperature=0.0, **extra)
    assert out.tokens.view(2, -1).tolist() == expected


def test_self_drafting_accepts_everything_and_map():
    target, _, _ = models()
    out = ig.generate(target, condition=[1, 2], drafter=target, method="exact", cfg_scale=3.0, temperature=1.0,
                      num_draft_tokens=3, generator=torch.Generator().manual_seed(0))
    assert out.stats.acceptance_rate == 1.0
    m = out.stats.accepted_map
    assert m.shape == (4, 4) and torch.equal(m.flatten(), torch.tensor([1.0, 1, 1, 0] * 4))
    assert out.stats.target_forwards == 4  # 16 tokens in blocks of 3 + 1 bonus


def test_cfg_guided_logits_by_hand():
    cond = torch.tensor([[1.0, 2.0, -1.0]])
    uncond = torch.tensor([[0.5, 0.0, 1.0]])
    # uncond + s (cond - uncond) with s = 4: [0.5 + 2, 0 + 8, 1 - 8]
    assert ig.guide(cond, uncond, 4.0).tolist() == [[2.5, 8.0, -7.0]]
    assert ig.guide(cond, uncond, 1.0).tolist() == cond.tolist()
    s = ig.guidance_scale(5.0, "linear", torch.tensor([0, 3, 6]), 7)
    assert s.tolist() == [1.0, 3.0, 5.0]
    # the engine's first-token guided logits equal the hand computation from the two halves
    target, _, _ = models()
    with torch.no_grad():
        c = target(torch.tensor([target.prefix_ids(4)])).logits[0, -1].float()
        u = target(torch.tensor([target.prefix_ids(4, unconditional=True)])).logits[0, -1].float()
    assert torch.allclose(reference_logits(target, 4, [], 2.0), u + 2.0 * (c - u))


def test_save_load_bit_exact(tmp_path):
    target, _, _ = models(text=True)
    target.save_pretrained(tmp_path / "m")
    loaded = ig.ARImageModel.from_pretrained(tmp_path / "m")
    assert loaded.config == target.config
    for (ka, a), (kb, b) in zip(target.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    a = ig.generate(target, condition="red circle", method="ar", temperature=0.0, cfg_scale=2.0)
    b = ig.generate(loaded, condition="red circle", method="ar", temperature=0.0, cfg_scale=2.0)
    assert torch.equal(a.tokens, b.tokens)


# ---- statistical: first two emitted tokens with CFG on ----------------------------------------

N = 30_000


def exact_first_two(model, condition, cfg, sampling):
    V = model.config.codebook_size
    p1 = logits_to_probs(reference_logits(model, condition, [], cfg), sampling)
    joint = torch.zeros(V, V, dtype=torch.float64)
    for a in range(V):
        if p1[a] > 0:
            p2 = logits_to_probs(reference_logits(model, condition, [a], cfg), sampling)
            joint[a] = p1[a].double() * p2.double()
    return joint.flatten()


def gof(idx, expected, n):
    counts = torch.bincount(idx, minlength=expected.numel()).double()
    assert counts[expected == 0].sum() == 0
    keep = expected * n > 5
    rest = ~keep & (expected > 0)
    obs, exp = counts[keep], expected[keep] * n
    if rest.any():
        obs, exp = torch.cat([obs, counts[rest].sum()[None]]), torch.cat([exp, expected[rest].sum()[None] * n])
    return stats.chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue


@pytest.mark.parametrize("method", ["exact", pytest.param("sjd", marks=pytest.mark.extended)])
def test_first_tokens_follow_target_distribution_with_cfg(method):
    target = tiny_ar(dtype=torch.float32, init=0.4, seed=11, grid=2)
    drafter = truncated_ar(target)
    cfg, sampling = 2.0, SamplingParams(temperature=1.0, top_k=6)
    expected = exact_first_two(target, 5, cfg, sampling)
    extra = ig.METHODS[method].select(dict(drafter=drafter, num_draft_tokens=3))
    out = ig.generate(target, condition=5, method=method, cfg_scale=cfg, temperature=1.0, top_k=6,
                      num_images=N, generator=torch.Generator().manual_seed(2), **extra)
    assert 0.05 < out.stats.acceptance_rate < 0.95
    flat = out.tokens.view(N, -1)
    assert gof(flat[:, 0] * 16 + flat[:, 1], expected, N) > 1e-3


@pytest.mark.extended  # negative control
def test_statistical_test_catches_a_wrong_rule():
    """Exact SD whose rejections resample from p instead of norm(max(0, p - q)) (the classic wrong
    rule): every token it emits lies inside the target's support, so only the statistic can reject it."""
    from mmspec.verify import ExactRule, Judgement

    class NoResidual(ExactRule):
        fused_mode = None  # judged by this class, not the fused kernel

        def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
            j = super().judge(draft_tokens, draft_probs, target_probs, uniforms)
            return Judgement(j.accepted, target_probs)

    target = tiny_ar(dtype=torch.float32, init=0.4, seed=11, grid=2)
    sampling = SamplingParams(temperature=1.0, top_k=6)
    expected = exact_first_two(target, 5, 2.0, sampling)
    out = ig.generate(target, condition=5, method="exact", drafter=truncated_ar(target), cfg_scale=2.0,
                      temperature=1.0, top_k=6, rule=NoResidual(), num_draft_tokens=3, num_images=N,
                      generator=torch.Generator().manual_seed(3))
    flat = out.tokens.view(N, -1)
    idx = flat[:, 0] * 16 + flat[:, 1]
    counts = torch.bincount(idx, minlength=expected.numel())
    assert counts[expected == 0].sum() == 0  # inside the support: the support check alone passes
    assert gof(idx, expected, N) < 1e-6


def test_same_seed_same_image_alone_and_in_a_batch():
    """Per-row randomness: an image depends only on its condition and its seed, for every method."""
    target, truncated, _ = models()
    tok = None
    for method in ["ar", "exact", "sjd", "lantern", "lantern++"]:
        extra = ig.METHODS[method].select(dict(drafter=truncated, num_draft_tokens=3,
                                               neighbours=torch.arange(16).roll(1).view(16, 1)))
        run = lambda conds, seeds: ig.generate(target, tok, condition=conds, method=method, cfg_scale=2.0,
                                               temperature=1.0, seed=seeds, **extra).tokens
        alone = run([3], [7])[0]
        batch_a = run([1, 3, 5, 0], [11, 7, 12, 13])
        batch_b = run([5, 0, 1, 3], [12, 13, 11, 7])
        assert torch.equal(batch_a[1], alone), method
        assert torch.equal(batch_b[3], alone), method
        assert torch.equal(batch_a[0], batch_b[2]), method
        assert not torch.equal(run([3], [8])[0], alone), method  # the seed matters


# ---- named errors ------------------------------------------------------------------------------

def test_bad_input():
    target, truncated, _ = models()
    text_target, _, _ = models(text=True)
    with pytest.raises(ig.ConditionError, match="unknown class id 12"):
        ig.generate(target, condition=12, method="ar")
    with pytest.raises(ig.ConditionError, match="empty prompt"):
        ig.generate(text_target, condition="  ", method="ar")
    with pytest.raises(ig.ConditionError, match="unknown word\\(s\\) \\['green'\\]"):
        ig.generate(text_target, condition="green circle", method="ar")
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        ig.generate(target, condition=1, method="ar", cfg_scale=-1.0)
    with pytest.raises(ig.MethodError, match="needs a drafter model"):
        ig.generate(target, condition=1, method="exact")
    with pytest.raises(ig.MethodError, match="unknown method 'medusa'"):
        ig.generate(target, condition=1, method="medusa")
    with pytest.raises(InvalidDraftLengthError):
        ig.generate(target, condition=1, method="sjd", num_draft_tokens=0)
    other = tiny_ar(codebook=32)
    with pytest.raises(ValueError, match="drafter codebook size 32 != target codebook size 16"):
        ig.generate(target, condition=1, method="exact", drafter=other)
    with pytest.raises(MethodParameterError, match="method 'ar' does not use num_draft_tokens"):
        ig.generate(target, condition=1, method="ar", num_draft_tokens=8)
    with pytest.raises(MethodParameterError, match="method 'sjd' does not use drafter"):
        ig.generate(target, condition=1, method="sjd", drafter=truncated)
    with pytest.raises(MethodParameterError, match="method 'lantern' does not use mulo_tau"):
        ig.generate(target, condition=1, method="lantern", drafter=truncated, mulo_tau=0.2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match="cfg_scale must be finite"):
            ig.generate(target, condition=1, method="ar", cfg_scale=bad)
        with pytest.raises(NonFiniteError, match="lantern_lambda must be finite"):
            ig.generate(target, condition=1, method="lantern++", drafter=truncated, lantern_lambda=bad)
        with pytest.raises(NonFiniteError, match="lantern_delta must be finite"):
            ig.generate(target, condition=1, method="lantern", drafter=truncated, lantern_delta=bad)
    with pytest.raises(FileNotFoundError, match="no AR image model"):
        ig.ARImageModel.from_pretrained("/nonexistent/model")
