"""EAGLE feature heads as image drafters: the head drafts both CFG halves from the target's features, greedy
output equals plain AR, sampled output follows the guided target (chi-square), the first draft equals a
cache-free computation by hand, and bad combinations are named errors.

Oracle: :mod:`tiny_image_models` (full forward per token, no cache) and the head's cache-free forward."""

import functools

import pytest
import torch

import mmspec.image_gen as ig
from mmspec import SamplingParams
from mmspec.heads.ttt import ttt_loss
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.tree import DynamicTree
from mmspec.errors import VocabularyMismatchError
from mmspec.heads.eagle3 import Eagle3Head
from test_image_gen import exact_first_two, gof
from tiny_image_models import WORDS, reference_greedy, tiny_ar

LAYERS = (1, 2, 3)


@functools.lru_cache(maxsize=None)
def target_and_head(grid=4, steps=80):
    """A tiny text-conditional target and a head trained briefly (training-time test) on the target's own
    samples under both halves: accepted sometimes (a random tiny target is hard to predict; the zoo's head
    reaches its acceptance in ``benchmarks/image_gen.py``)."""
    target = tiny_ar(text=True, layers=3, hidden=32, dtype=torch.float32, init=0.4, seed=3, grid=grid)
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (3,), generator=g).tolist()) for _ in range(64)]
    codes = ig.generate(target, condition=prompts, method="ar", temperature=1.0, cfg_scale=1.0,
                        generator=torch.Generator().manual_seed(1)).tokens.flatten(1)
    prefixes = [target.prefix_ids(p, unconditional=i % 2 == 1) for i, p in enumerate(prompts)]
    torch.manual_seed(0)
    head = ig.image_head(target, LAYERS)
    batch = ig.forced_batch(target, prefixes, codes, LAYERS)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = ttt_loss(head, batch, 2, 0.8)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return target, head.eval()


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (3.0, "constant"), (2.5, "linear")])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_plain_ar(cfg, schedule, k):
    target, head = target_and_head()
    prompts = ["a red circle left", "blue square", "right"]  # different prefix lengths: left padding
    expected = [reference_greedy(target, p, cfg, schedule) for p in prompts]
    out = ig.generate(target, condition=prompts, method="exact", drafter=head, num_draft_tokens=k,
                      cfg_scale=cfg, cfg_schedule=schedule, temperature=0.0)
    assert out.tokens.view(3, -1).tolist() == expected
    assert out.stats.accepted_tokens > 0  # drafts were accepted: the accept path ran, not only corrections


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (3.0, "constant"), (2.5, "linear")])
def test_greedy_trees_equal_plain_ar(cfg, schedule):
    """EAGLE-2's dynamic trees drafted from the guided head, verified in one guided target forward."""
    target, head = target_and_head()
    prompts = ["a red circle left", "blue square", "right"]
    expected = [reference_greedy(target, p, cfg, schedule) for p in prompts]
    drafter = FeatureDrafter(head, tree=DynamicTree(depth=3, top_k=3, num_nodes=8))
    out = ig.generate(target, condition=prompts, method="exact", drafter=drafter, cfg_scale=cfg,
                      cfg_schedule=schedule, temperature=0.0)
    assert out.tokens.view(3, -1).tolist() == expected
    assert out.stats.accepted_tokens > 0


def test_first_draft_equals_head_by_hand():
    """The guided drafter's first distribution = guide(head(cond pairs), head(uncond pairs)) computed without
    a cache from full target forwards of each half."""
    from mmspec.config import SamplingParams as SP
    from mmspec.guidance import Guidance
    from mmspec.rng import RowRandom

    target, head = target_and_head()
    prompt = "a blue circle"
    cond, unc = target.prefix_ids(prompt), target.prefix_ids(prompt, unconditional=True)
    scale = 2.0
    with torch.no_grad():
        logits = []
        for ids in (cond, unc):
            hs = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
            feats = head.fuse(torch.cat([hs[i] for i in LAYERS], dim=-1))[:, :-1]  # pairs (feature t, token t+1)
            logits.append(head(torch.tensor([ids[1:]]), feats).logits[0, -1])
        expected = ig.guide(logits[0], logits[1], scale)
        d = FeatureDrafter(head, 1)
        d.check_compatible(target)
        ids = torch.tensor([cond])
        guidance = Guidance(uncond=[unc], scale=scale, num_tokens=16)
        from mmspec.guidance import open_session

        session = open_session(target, ids, torch.ones_like(ids), guidance=guidance, record_hidden=d.hidden_layers)
        d.start(ids, torch.ones_like(ids), sampling=SP(temperature=0.0), rng=RowRandom([0]), guidance=guidance)
        d.observe_prefill(session.last_hidden)
        got = d._sequence_logits(d.next_logits, torch.zeros(1, dtype=torch.long))[0]
    assert torch.allclose(got, expected, atol=1e-5)


N = 30_000


@pytest.mark.extended  # 1 min a shape (default: the head's greedy exactness above; exact SD's sampling in test_image_gen)
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_first_tokens_follow_guided_target(shape):
    target, head = target_and_head(grid=2, steps=80)
    cfg, sampling = 2.0, SamplingParams(temperature=1.0, top_k=6)
    expected = exact_first_two(target, "red square", cfg, sampling)
    drafter = head if shape == "chain" else FeatureDrafter(head, tree=DynamicTree(depth=2, top_k=2, num_nodes=4))
    out = ig.generate(target, condition="red square", method="exact", drafter=drafter, num_draft_tokens=2,
                      cfg_scale=cfg, temperature=1.0, top_k=6, num_images=N, generator=torch.Generator().manual_seed(2))
    assert 0.05 < out.stats.accepted_tokens / out.stats.emitted_tokens < 0.95
    flat = out.tokens.view(N, -1)
    assert gof(flat[:, 0] * target.config.codebook_size + flat[:, 1], expected, N) > 1e-3


def test_same_seed_same_image_alone_and_in_a_batch():
    target, head = target_and_head()
    kw = dict(method="exact", drafter=head, num_draft_tokens=3, cfg_scale=2.0, temperature=1.0)
    both = ig.generate(target, condition=["red circle", "blue square left"], seed=[5, 9], **kw)
    alone = ig.generate(target, condition="blue square left", seed=[9], **kw)
    assert torch.equal(both.tokens[1], alone.tokens[0])


def test_bad_combinations_are_named_errors(tmp_path):
    target, head = target_and_head()
    other = tiny_ar(text=True, layers=3, hidden=32, codebook=24)
    with pytest.raises(VocabularyMismatchError, match="vocabulary of 16"):
        ig.generate(other, condition="red circle", method="exact", drafter=head, cfg_scale=2.0)
    with pytest.raises(ValueError, match="three hidden-state indices"):
        ig.image_head(target, (1, 2, 9))
    head.save(tmp_path / "h", dtype=torch.float32)  # round trip through the saved format
    loaded = Eagle3Head.load(tmp_path / "h", target)
    a = ig.generate(target, condition="red circle", method="exact", drafter=head, num_draft_tokens=3,
                    cfg_scale=2.0, temperature=1.0, seed=[4])
    b = ig.generate(target, condition="red circle", method="exact", drafter=loaded, num_draft_tokens=3,
                    cfg_scale=2.0, temperature=1.0, seed=[4])
    assert torch.equal(a.tokens, b.tokens) and a.stats.accepted_tokens == b.stats.accepted_tokens
