"""Lossless VLM speculative decoding with a pruned drafter (LLaVA, Qwen2-VL, Qwen2.5-VL).

Oracle: HF ``generate(**inputs, do_sample=False)`` of the target (float64)."""

import functools

import pytest
import torch
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

import mmspec
import mmspec.vision as mv
from mmspec import SamplingParams, VocabularyMismatchError
from mmspec.rng import RowRandom
from tiny_vlms import VLM_ARCHS, build_vlm, tiled_llava_inputs, truncated_vlm_drafter, vlm_inputs

MAX_NEW = 10
STRATEGIES = ["verifier", "cls", "diversity", "uniform", "none"]
RATIOS = [0.0, 0.1, 0.25, 0.5, 1.0]


@functools.lru_cache(maxsize=None)
def pair(arch):
    target = build_vlm(arch)
    return target, truncated_vlm_drafter(target)


@functools.lru_cache(maxsize=None)
def reference(arch, batch):
    target, _ = pair(arch)
    inputs = vlm_inputs(arch, batch, seed=batch)
    return inputs, target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_greedy_matches_hf_generate(arch, strategy, ratio, batch):
    target, drafter = pair(arch)
    inputs, expected = reference(arch, batch)
    if strategy == "cls" and arch != "llava" and ratio > 0:
        with pytest.raises(mv.PruningError, match="needs a vision encoder with a \\[CLS\\] token"):
            mv.generate(target, drafter, inputs, pruning=strategy, keep_ratio=ratio, max_new_tokens=MAX_NEW)
        return
    out = mv.generate(target, drafter, inputs, pruning=strategy, keep_ratio=ratio, max_new_tokens=MAX_NEW,
                      num_draft_tokens=3)
    assert torch.equal(out.sequences, expected)
    n = out.stats.extra["visual_tokens"]
    kept = out.stats.extra["drafter_visual_tokens"]
    want = n if strategy == "none" else [min(v, -(-int(ratio * v * 1000) // 1000)) for v in n]
    assert kept == [mv.pruning.keep_budget(v, 1.0 if strategy == "none" else ratio) for v in n]
    assert kept == want


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_llava_tiled_multi_image_context_greedy_matches_hf_generate(strategy, batch):
    """Base image + crops as separate images of one prompt (the long visual context): 192 visual tokens a row."""
    target, drafter = pair("llava")
    inputs = tiled_llava_inputs(batch, seed=batch)
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    for ratio in (0.1, 0.25):
        out = mv.generate(target, drafter, inputs, pruning=strategy, keep_ratio=ratio, max_new_tokens=MAX_NEW,
                          num_draft_tokens=3)
        assert torch.equal(out.sequences, expected), (strategy, ratio)
        assert out.stats.extra["visual_tokens"] == [192] * batch


@pytest.mark.parametrize("strategy", ["verifier", "diversity", "uniform", "none"])
def test_llava_next_any_resolution_ragged_rows(strategy):
    """LLaVA-NeXT: two images of different sizes give rows with different visual-token counts."""
    target, drafter = pair("llava_next")
    inputs, expected = reference("llava_next", 2)
    out = mv.generate(target, drafter, inputs, pruning=strategy, keep_ratio=0.5, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)
    n = out.stats.extra["visual_tokens"]
    assert n[0] != n[1]
    assert out.stats.extra["drafter_visual_tokens"] == [mv.pruning.keep_budget(v, 1.0 if strategy == "none" else 0.5) for v in n]


def test_cls_on_any_resolution_packing_is_a_named_error():
    target, drafter = pair("llava_next")
    inputs, _ = reference("llava_next", 1)
    with pytest.raises(mv.PruningError, match="one image token per encoder patch"):
        mv.generate(target, drafter, inputs, pruning="cls", keep_ratio=0.5, max_new_tokens=2)


@pytest.mark.parametrize("arch", VLM_ARCHS + ("llava_next",))
def test_self_drafting_with_all_tokens_accepts_everything(arch):
    """Drafter = target with every visual token at original positions: the pruned-prefill path
    reproduces the target's context exactly, so every draft is accepted."""
    target, _ = pair(arch)
    inputs, expected = reference(arch, 2)
    out = mv.generate(target, target, inputs, pruning="none", max_new_tokens=MAX_NEW, num_draft_tokens=4)
    assert torch.equal(out.sequences, expected)
    assert out.stats.acceptance_rate == 1.0


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_contiguous_positions_stay_lossless(arch):
    target, drafter = pair(arch)
    inputs, expected = reference(arch, 2)
    out = mv.generate(target, drafter, inputs, pruning="uniform", keep_ratio=0.5, positions="contiguous",
                      max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)


def test_text_only_drafter():
    target, _ = pair("llava")
    inputs, expected = reference("llava", 2)
    torch.manual_seed(3)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)).double().eval()
    out = mv.generate(target, lm, inputs, keep_ratio=0.0, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)
    assert out.stats.extra["drafter_visual_tokens"] == [0, 0]


@pytest.mark.parametrize("arch", VLM_ARCHS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0])
def test_drafter_prefill_really_removes_tokens(arch, ratio):
    """The drafter's cache holds exactly the text tokens + ceil(r*N) visual tokens (minus the pending
    last token): pruned tokens are removed, not masked."""
    _, drafter_model = pair(arch)
    inputs = dict(vlm_inputs(arch, 1))
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    n = int((ids == 100).sum())
    d = mv.VLMDrafter(drafter_model, pruning="uniform", keep_ratio=ratio, draft_length=3)
    d.start(ids, mask, sampling=SamplingParams(), rng=RowRandom.from_seed(0, 1), **inputs)
    kept = mv.pruning.keep_budget(n, ratio)
    expected_slots = ids.shape[1] - n + kept - 1
    assert d.session.cache.get_seq_length() == expected_slots
    assert int(d.session.valid.sum()) == expected_slots
    assert d.info["drafter_visual_tokens"] == [kept]


# ---- sampling: distribution of the first generated tokens with pruning on ---------------------

def first_two_pvalue(rule=None):
    """Chi-square p-value of the engine's first two sampled tokens (pruned drafter) against the
    target's exact distribution under the same top-k processing; also returns the stats."""
    arch, N, topk = "llava", 6_000, 3
    target = build_vlm(arch, dtype=torch.float32, init=0.3, seed=5)
    drafter = truncated_vlm_drafter(target)
    one = vlm_inputs(arch, 1, dtype=torch.float32)
    batch = {k: v.expand(N, *v.shape[1:]).contiguous() for k, v in one.items()}
    out = mv.generate(target, drafter, batch, pruning="uniform", keep_ratio=0.25, max_new_tokens=2,
                      temperature=1.0, top_k=topk, num_draft_tokens=2, generator=torch.Generator().manual_seed(0),
                      rule=rule)
    L = one["input_ids"].shape[1]
    first, second = out.sequences[:, L], out.sequences[:, L + 1]
    with torch.no_grad():
        p1 = mmspec.sampling.logits_to_probs(target(**one).logits[:, -1], SamplingParams(1.0, top_k=topk))[0]
        support = p1.nonzero().flatten()
        ids2 = torch.cat([one["input_ids"].expand(len(support), -1), support[:, None]], 1)
        rep = {k: v.expand(len(support), *v.shape[1:]) for k, v in one.items() if k != "input_ids"}
        rep["attention_mask"] = torch.ones_like(ids2)
        p2 = mmspec.sampling.logits_to_probs(target(input_ids=ids2, **rep).logits[:, -1], SamplingParams(1.0, top_k=topk))
    V = p1.numel()
    joint = torch.zeros(V, V, dtype=torch.float64)
    joint[support] = p1[support, None].double() * p2.double()
    counts = torch.bincount(first * V + second, minlength=V * V).double()
    exp = joint.flatten() * N
    if counts[exp == 0].sum() > 0:
        return 0.0, out.stats
    keep = exp > 5
    obs = torch.cat([counts[keep], counts[~keep & (exp > 0)].sum()[None]])
    e = torch.cat([exp[keep], exp[~keep & (exp > 0)].sum()[None]])
    if e[-1] == 0:
        obs, e = obs[:-1], e[:-1]
    return stats.chisquare(obs.numpy(), (e * obs.sum() / e.sum()).numpy()).pvalue, out.stats


def test_sampling_distribution_matches_target_with_pruning():
    pvalue, st = first_two_pvalue()
    assert st.extra["drafter_visual_tokens"][0] == 16
    assert 0.05 < st.acceptance_rate < 0.95  # rejections and residual draws are exercised
    assert pvalue > 1e-3


@pytest.mark.extended  # negative control
def test_sampling_test_rejects_a_wrong_rule(monkeypatch):
    """Negative control: a plausible lossy bug, accepting a draft with probability p(x) instead of
    min(1, p(x) / q(x)). It only accepts tokens the target can emit (p(x) > 0) and redraws rejections from
    max(0, p - q), so every sample stays inside the target's top-k support: the support shortcut of
    first_two_pvalue never fires, and only the chi-square statistic can reject it."""
    from mmspec.verify import AcceptRule, Judgement

    class ForgetsQ(AcceptRule):
        def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
            p_x = target_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
            return Judgement(uniforms < p_x, (target_probs - draft_probs).clamp_min(0.0))

    statistic_used = []
    chisquare = stats.chisquare
    monkeypatch.setattr(stats, "chisquare", lambda *a, **kw: statistic_used.append(True) or chisquare(*a, **kw))
    pvalue, st = first_two_pvalue(ForgetsQ())
    assert statistic_used == [True]  # the p-value is the statistic's, not the support check's 0.0
    assert 0.05 < st.acceptance_rate < 0.95  # accepted drafts and residual draws both shape the samples
    assert pvalue < 1e-6


# ---- named errors ------------------------------------------------------------------------------

def test_named_errors():
    target, drafter = pair("llava")
    inputs, _ = reference("llava", 1)
    qwen, _ = pair("qwen2_vl")
    with pytest.raises(mv.FamilyMismatchError, match="drafter is a Qwen2-VL model but the target is LLaVA"):
        mv.generate(target, qwen, inputs, max_new_tokens=2)
    other_vocab = build_vlm("llava")
    other_vocab.resize_token_embeddings(130)
    with pytest.raises(VocabularyMismatchError, match="vocabulary size 130 != target vocabulary size 120"):
        mv.generate(target, other_vocab, inputs, max_new_tokens=2)
    no_image = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(mv.NoImageError, match="no image in the inputs"):
        mv.generate(target, drafter, no_image, max_new_tokens=2)
    for bad in (-0.1, 1.5):
        with pytest.raises(mv.KeepRatioError, match="keep_ratio must be in \\[0, 1\\]"):
            mv.generate(target, drafter, inputs, keep_ratio=bad, max_new_tokens=2)
    text_lm = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(mv.FamilyMismatchError, match="is not a supported VLM"):
        mv.generate(text_lm, drafter, inputs, max_new_tokens=2)
    q_target, q_drafter = pair("qwen2_vl")
    q_inputs, _ = reference("qwen2_vl", 1)
    with pytest.raises(mv.PruningError, match="needs a vision encoder with a \\[CLS\\] token"):
        mv.generate(q_target, q_drafter, q_inputs, pruning="cls", max_new_tokens=2)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_stream_commits_exactly_the_tokens_of_generate(arch):
    """generate_stream (the demos' API) yields the tokens of generate, and reports the kept visual tokens."""
    target = build_vlm(arch)
    drafter = truncated_vlm_drafter(target)
    inputs = vlm_inputs(arch, 2)
    out = mv.generate(target, drafter, inputs, keep_ratio=0.25, max_new_tokens=10)
    streamed = [[] for _ in range(2)]
    events = list(mv.generate_stream(target, drafter, inputs, keep_ratio=0.25, max_new_tokens=10))
    for ev in events:
        for row, toks, n_acc in zip(ev.rows, ev.tokens, ev.num_accepted):
            assert n_acc <= len(toks)
            streamed[row] += toks
    assert out.sequences[:, inputs["input_ids"].shape[1]:].tolist() == streamed
    extra = events[-1].stats.extra
    kept = extra["drafter_kept_visual_indices"]
    assert [len(k) for k in kept] == extra["drafter_visual_tokens"]
    assert all(k == sorted(set(k)) and 0 <= min(k) and max(k) < n for k, n in zip(kept, extra["visual_tokens"]))


def test_stream_validates_eagerly():
    target = build_vlm("llava")
    with pytest.raises(mv.KeepRatioError, match="keep_ratio"):
        mv.generate_stream(target, target, vlm_inputs("llava"), keep_ratio=2.0, max_new_tokens=4)
