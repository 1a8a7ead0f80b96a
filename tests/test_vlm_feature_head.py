"""The EAGLE-3 head as a VLM drafter whose context keeps only the pruned visual positions
(:class:`mmspec.vision.PrunedFeatureDrafter`): greedy output token-identical to HF ``generate`` for every
strategy and keep ratio, batch 1 and 2, one image and a tiled multi-image context; exact sampling
(chi-square against the target's own tables, with a negative control); what the head's cache holds."""

from __future__ import annotations

import functools

import pytest
import torch

import mmspec.vision as mv
from mmspec.drafters.tree import DynamicTree
from mmspec.errors import MMSpecError
from mmspec.heads.eagle3 import Eagle3Config, Eagle3Head
from stat_helpers import chisquare_pvalue
from tiny_vlms import build_vlm, tiled_llava_inputs, vlm_inputs

MAX_NEW = 12
STRATEGIES = ["verifier", "cls", "diversity", "uniform", "none"]
RATIOS = [0.0, 0.1, 0.25, 0.5, 1.0]
V = 120


def make_head(target, seed=0, draft_vocab=96, dtype=torch.float64):
    torch.manual_seed(seed)
    d2t = torch.randperm(V)[:draft_vocab].sort().values
    head = Eagle3Head(Eagle3Config.from_target(target, draft_vocab), d2t=d2t).to(dtype).eval()
    return head.attach(target)


@functools.lru_cache(maxsize=None)
def target_and_head():
    target = build_vlm("llava", layers=3)
    return target, make_head(target)


@functools.lru_cache(maxsize=None)
def reference(kind: str, batch: int):
    target, _ = target_and_head()
    inputs = vlm_inputs("llava", batch, seed=batch) if kind == "single" else tiled_llava_inputs(batch, seed=batch)
    return inputs, target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_matches_hf_generate(strategy, ratio, batch):
    target, head = target_and_head()
    inputs, expected = reference("single", batch)
    out = mv.generate(target, head, inputs, pruning=strategy, keep_ratio=ratio, max_new_tokens=MAX_NEW,
                      num_draft_tokens=3)
    assert torch.equal(out.sequences, expected)
    n = out.stats.extra["visual_tokens"]
    assert out.stats.extra["drafter_visual_tokens"] == [mv.pruning.keep_budget(v, 1.0 if strategy == "none" else ratio)
                                                       for v in n]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_tiled_long_context_greedy_matches_hf_generate_with_trees(strategy, batch):
    target, head = target_and_head()
    inputs, expected = reference("tiled", batch)
    for ratio in (0.1, 0.25):
        out = mv.generate(target, head, inputs, pruning=strategy, keep_ratio=ratio, max_new_tokens=MAX_NEW,
                          tree=DynamicTree(depth=3, top_k=2, num_nodes=6))
        assert torch.equal(out.sequences, expected), (strategy, ratio)
        assert out.stats.extra["visual_tokens"] == [192] * batch


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_the_heads_cache_holds_text_pairs_and_kept_visual_pairs_only(positions):
    target, head = target_and_head()
    inputs, expected = reference("single", 2)
    drafter = mv.PrunedFeatureDrafter(head, 3, pruning="uniform", keep_ratio=0.25, positions=positions)
    out = mv.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
    assert torch.equal(out.sequences, expected)
    assert out.stats.extra["drafter_visual_tokens"] == [16, 16]
    assert out.stats.extra["drafter_kept_visual_indices"][0] == list(range(0, 64, 4))
    # pairs fed: every valid prompt position but the last, minus the 48 pruned visual ones, then one more for
    # the token the single decoding step committed
    mask = inputs["attention_mask"]
    fed = (mask.sum(dim=1) - 1 - 48 + 1).tolist()
    drafter2 = mv.PrunedFeatureDrafter(head, 3, pruning="uniform", keep_ratio=0.25, positions=positions)
    mv.generate(target, drafter2, inputs, max_new_tokens=1)
    assert drafter2.session.next_pos.tolist() == fed


def test_bad_keep_ratio_and_positions_are_named_errors():
    _, head = target_and_head()
    with pytest.raises(mv.KeepRatioError, match="keep_ratio must be in"):
        mv.PrunedFeatureDrafter(head, 3, keep_ratio=1.5)
    with pytest.raises(MMSpecError, match="positions must be one of"):
        mv.PrunedFeatureDrafter(head, 3, positions="packed")


# ------------------------------------------------------------------------------------------ sampling
class WrongQ(mv.PrunedFeatureDrafter):
    """Negative control: reports a uniform draft distribution instead of the one it sampled from."""

    def _on_target_vocab(self, p):
        full = super()._on_target_vocab(p)
        return torch.where(full > 0, 1.0 / self.head.d2t.numel(), 0.0).to(full.dtype)


@functools.lru_cache(maxsize=None)
def sampling_pair():
    """float32 (the greedy tests' float64 exactness is not needed to compare distributions, and the 40,000 draws
    take half the time): the tables are computed by the same float32 model."""
    target = build_vlm("llava", layers=3, init=0.08, dtype=torch.float32)
    return target, make_head(target, seed=1, dtype=torch.float32)


def _tables(target, inputs):
    """The target's first-token distribution and the joint of the first two (the second token fed through the
    prompt's cache, so a first token equal to the image placeholder id is just a token, as in decoding)."""
    with torch.no_grad():
        out = target(**inputs, use_cache=True)
        p1 = out.logits[0, -1].double().softmax(-1)  # [V]
        cache = out.past_key_values
        cache.batch_repeat_interleave(V)
        mask = torch.ones((V, inputs["input_ids"].shape[1] + 1), dtype=torch.long)
        p2 = target(input_ids=torch.arange(V)[:, None], attention_mask=mask, past_key_values=cache,
                    use_cache=True).logits[:, -1].double().softmax(-1)  # [V, V]
    return p1, p1[:, None] * p2


def _draw(cls, draws=40_000, chunk=10_000):
    target, head = sampling_pair()
    one = vlm_inputs("llava", 1, seed=5, dtype=torch.float32)
    firsts, pairs = [], []
    for c in range(draws // chunk):
        inputs = {k: v.expand(chunk, *v.shape[1:]).contiguous() for k, v in one.items()}
        drafter = cls(head, 3, pruning="verifier", keep_ratio=0.25)
        out = mv.generate(target, drafter, inputs, max_new_tokens=2, temperature=1.0,
                          seed=[c * chunk + i for i in range(chunk)], eos_token_id=[])
        new = out.sequences[:, -2:]
        firsts.append(new[:, 0])
        pairs.append(new[:, 0] * V + new[:, 1])
    p1, p12 = _tables(target, {k: v for k, v in one.items() if k != "attention_mask"})
    return chisquare_pvalue(torch.cat(firsts), p1), chisquare_pvalue(torch.cat(pairs), p12.flatten())


# 40,000 draws through a tiny LLaVA: minutes each, the extended tier
@pytest.mark.extended
def test_sampling_with_the_pruned_head_follows_the_target():
    first, pair = _draw(mv.PrunedFeatureDrafter)
    assert first > 1e-3 and pair > 1e-3


@pytest.mark.extended
def test_the_sampling_test_catches_a_wrong_draft_distribution():
    first, pair = _draw(WrongQ)
    assert first < 1e-6 or pair < 1e-6
