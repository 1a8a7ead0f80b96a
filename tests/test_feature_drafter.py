"""The EAGLE-3 feature head through the one loop: token-identical greedy decoding, exact sampling
(chi-square with a negative control), FR-Spec tables, training/inference consistency."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from mmspec import engine
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.tree import DynamicTree, StaticTree
from mmspec.errors import VocabularyMismatchError
from mmspec.heads.eagle3 import Eagle3Config, Eagle3Head
from mmspec.heads.frspec import count_tokens, coverage, rank_vocabulary
from stat_helpers import chisquare_pvalue, first_two_token_tables
from tiny_models import ARCHS, build, left_padded_prompts

V = 96


def make_head(target, draft_vocab=64, seed=0):
    torch.manual_seed(seed)
    d2t = torch.randperm(V)[:draft_vocab].sort().values
    d2t[0] = 2  # EOS stays draftable
    d2t = d2t.unique()
    head = Eagle3Head(Eagle3Config.from_target(target, d2t.numel()), d2t=d2t).to(torch.float64).eval()
    if hasattr(target, "model"):
        head.init_from_target(target)
    return head.attach(target)


SHAPES = {"chain": dict(draft_length=4), "dynamic": dict(tree=DynamicTree(depth=4, top_k=3, num_nodes=10)),
          "static": dict(tree=StaticTree((3, 2, 1)))}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_is_token_identical_to_hf_generate(arch, shape, batch):
    target = build(arch, layers=3)
    head = make_head(target)
    ids, mask = left_padded_prompts(batch, 9, V, seed=batch)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = target.generate(input_ids=ids, attention_mask=mask, **kw)
    out = engine.generate(target, ids, attention_mask=mask, drafter=FeatureDrafter(head, **SHAPES[shape]),
                          max_new_tokens=24)
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)


def test_a_one_token_prompt_drafts_nothing_first_then_decodes_like_hf():
    target = build("llama", layers=3)
    ids = torch.tensor([[7]])
    ref = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = engine.generate(target, ids, drafter=FeatureDrafter(make_head(target), 3), max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.acceptance_rate >= 0


# ------------------------------------------------------------------------------------------ sampling
_target_tables = first_two_token_tables


class WrongQ(FeatureDrafter):
    """Negative control: reports a uniform draft distribution instead of the one it sampled from."""

    def _on_target_vocab(self, p):
        full = super()._on_target_vocab(p)
        return torch.where(full > 0, 1.0 / self.head.d2t.numel(), 0.0).to(full.dtype)


def _draw(target, head, shape, cls=FeatureDrafter, draws=25_000, chunk=25_000):
    # 25k draws: the wrong draft distribution below then fails with p < 1e-60 on both tables
    prompt = torch.tensor([[5, 17, 33, 9, 41, 12]])
    firsts, pairs = [], []
    for c in range(draws // chunk):
        ids = prompt.expand(chunk, -1).contiguous()
        out = engine.generate(target, ids, drafter=cls(head, **SHAPES[shape]), max_new_tokens=2, temperature=1.0,
                              seed=[c * chunk + i for i in range(chunk)], eos_token_id=[])
        new = out.sequences[:, -2:]
        firsts.append(new[:, 0])
        pairs.append(new[:, 0] * V + new[:, 1])
    return prompt, torch.cat(firsts), torch.cat(pairs)


@pytest.mark.parametrize("shape", ["chain", pytest.param("dynamic", marks=pytest.mark.extended)])
def test_sampling_follows_the_target_first_and_first_two_tokens(shape):
    target = build("llama", layers=3, init=0.08)
    head = make_head(target)
    prompt, first, pair = _draw(target, head, shape)
    p1, p12 = _target_tables(target, prompt)
    assert chisquare_pvalue(first, p1) > 1e-3
    assert chisquare_pvalue(pair, p12.flatten()) > 1e-3


@pytest.mark.extended  # negative control
def test_the_sampling_test_catches_a_wrong_draft_distribution():
    target = build("llama", layers=3, init=0.08)
    head = make_head(target)
    prompt, first, pair = _draw(target, head, "chain", cls=WrongQ)
    p1, p12 = _target_tables(target, prompt)
    assert chisquare_pvalue(first, p1) < 1e-6 or chisquare_pvalue(pair, p12.flatten()) < 1e-6


# ---------------------------------------------------------------------------------------- FR-Spec
def test_rank_vocabulary_exact_table():
    counts = torch.tensor([0, 5, 1, 5, 0, 9, 2])
    assert rank_vocabulary(counts, 3).tolist() == [1, 3, 5]
    assert rank_vocabulary(counts, 3, always=[0]).tolist() == [0, 3, 5] or \
        rank_vocabulary(counts, 3, always=[0]).tolist() == [0, 1, 5]
    assert rank_vocabulary(counts, 3, always=[0]).tolist() == [0, 1, 5]  # ties break towards lower ids
    assert rank_vocabulary(counts, 5).tolist() == [1, 2, 3, 5, 6]
    assert rank_vocabulary(counts, 100).tolist() == list(range(7))
    d2t = rank_vocabulary(counts, 2)
    assert coverage(counts, d2t) == pytest.approx(14 / 22)
    assert count_tokens([torch.tensor([1, 1, 3])], 5).tolist() == [0, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="size"):
        rank_vocabulary(counts, 0)


def test_head_save_load_roundtrip_and_vocabulary_check(tmp_path):
    target = build("llama", layers=3)
    head = make_head(target)
    head.save(tmp_path / "h", dtype=torch.float64)
    again = Eagle3Head.load(tmp_path / "h", target, dtype=torch.float64)
    assert torch.equal(again.d2t, head.d2t)
    assert "_embed.weight" not in again.state_dict()  # the target's embedding is borrowed, never saved
    x = torch.randint(3, V, (1, 5))
    f = torch.randn(1, 5, 64, dtype=torch.float64)
    assert torch.allclose(head(x, f).logits, again(x, f).logits)
    other = build("llama", vocab=128, layers=3)
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        Eagle3Head.load(tmp_path / "h", other)
    with pytest.raises(FileNotFoundError, match="head_config"):
        Eagle3Head.load(tmp_path / "nothing")


# ------------------------------------------------------------------------ training = drafting
def test_training_time_test_matches_the_drafting_path():
    """forward_ttt's step j at row t equals drafting j tokens from pair t with the cached head."""
    target = build("llama", layers=3)
    head = make_head(target)
    g = torch.Generator().manual_seed(0)
    L = 10
    ids = torch.randint(3, V, (1, L), generator=g)
    feats3 = torch.randn(1, L, 3 * 64, generator=g, dtype=torch.float64)
    outs = head.forward_ttt(ids, feats3, torch.ones_like(ids), steps=3)
    t = 5
    cache = DynamicCache()
    o = head(ids[:, : t + 1], head.fuse(feats3[:, : t + 1]), past_key_values=cache, output_hidden_states=True)
    assert torch.allclose(o.logits[0, t], outs[0][0, t], atol=1e-9)
    feat = o.hidden_states[0][:, -1:]
    for j in (1, 2):  # the ground-truth token t + j with the head's own hidden state
        o = head(ids[:, t + j: t + j + 1], feat, past_key_values=cache, output_hidden_states=True,
                 position_ids=torch.tensor([[t + j]]))
        assert torch.allclose(o.logits[0, -1], outs[j][0, t], atol=1e-9)
        feat = o.hidden_states[0][:, -1:]


# ------------------------------------------------------------------------------------- cost model
def test_cost_model_exact_cases_and_tree_size():
    from mmspec.drafters.cost_model import CostModel

    cm = CostModel(widths=(1, 2, 4, 16), seconds=(1.0, 1.0, 1.2, 1.8), level_cost=0.1)
    assert cm.relative(1) == 1.0 and cm.relative(3) == pytest.approx(1.1) and cm.relative(10) == pytest.approx(1.5)
    assert cm.relative(28) == pytest.approx(1.8 + 12 * 0.6 / 12)
    # confident drafts: a bigger tree pays; hopeless drafts: the smallest tree
    assert cm.best_num_nodes(torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]]), 2) == 5
    assert cm.best_num_nodes(torch.tensor([[0.01, 0.01, 0.01, 0.01]]), 2) == 1
    with pytest.raises(ValueError, match="widths"):
        CostModel(widths=(2, 4), seconds=(1.0, 2.0))
    with pytest.raises(TypeError, match="CostModel"):
        DynamicTree(cost_model="fast")


def test_a_cost_model_sized_tree_stays_token_identical():
    from mmspec.drafters.cost_model import measure_cost_model

    target = build("llama", layers=3)
    cm = measure_cost_model(target, widths=(1, 4, 16), context=16, repeats=1)
    ids, mask = left_padded_prompts(2, 9, V, seed=3)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    tree = DynamicTree(depth=4, top_k=3, num_nodes=12, cost_model=cm)
    out = engine.generate(target, ids, attention_mask=mask, drafter=FeatureDrafter(make_head(target), tree=tree),
                          max_new_tokens=20)
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)


def test_a_new_draft_vocabulary_keeps_the_heads_layers_and_selects_other_target_rows():
    """``with_draft_vocabulary``: the same hidden states; the logits are those of the full vocabulary at the new
    rows (the output rows are the target's, so only the selection changes)."""
    target = build("llama", layers=2)
    head = make_head(target, draft_vocab=32)
    new = torch.tensor([2, 5, 7, 11, 40, 90])
    other = head.with_draft_vocabulary(new).attach(target)
    assert other.config.draft_vocab_size == 6 and torch.equal(other.d2t, new) and other.fc.weight.dtype == torch.float64
    full = head.with_draft_vocabulary(torch.arange(V)).attach(target)
    h = torch.randn(3, head.config.hidden_size, dtype=torch.float64)
    assert torch.allclose(other.lm_logits(h), full.lm_logits(h)[:, new])
    assert torch.allclose(head.lm_logits(h), full.lm_logits(h)[:, head.d2t])


@pytest.mark.parametrize("shape", ["chain", "dynamic"])
def test_rows_joining_a_running_batch_draft_exactly_as_alone(shape):
    """Continuous batching with the head (FeatureDrafter.add_rows): rows admitted after steps 2 and 4 decode to HF
    generate's tokens, and every step accepts as many drafts for them as when each row runs alone (the head's
    context for a joining row is built from its prefill's hidden states, as for a first row)."""
    from mmspec.engine import Admission, generate_stream

    target = build("llama", layers=3)
    head = make_head(target)
    ids, mask = left_padded_prompts(3, 9, V, seed=5)
    ref = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=None)

    def run(first, queue):
        calls, toks, acc = [], {}, {}

        def admit(running):
            calls.append(running)
            if len(calls) in (2, 4) and queue:
                i, m = queue.pop(0)
                return Admission(i, m, [20], [0])
            return None

        for ev in generate_stream(target, first[0], attention_mask=first[1], max_new_tokens=20, eos_token_id=[],
                                  drafter=FeatureDrafter(head, **SHAPES[shape]), admit=admit):
            for r, t, a in zip(ev.rows, ev.tokens, ev.num_accepted):
                toks.setdefault(r, []).extend(t)
                acc.setdefault(r, []).append(a)
        assert not queue
        return toks, acc

    joined_toks, joined_acc = run((ids[:1], mask[:1]), [(ids[1:2], mask[1:2]), (ids[2:3], mask[2:3])])
    for b in range(3):
        alone_toks, alone_acc = run((ids[b:b + 1], mask[b:b + 1]), [])
        assert joined_toks[b] == alone_toks[0] == ref[b, ids.shape[1]:].tolist()
        assert joined_acc[b] == alone_acc[0]
    assert sum(sum(a) for a in joined_acc.values()) > 0  # the head's drafts were accepted: it had its context
