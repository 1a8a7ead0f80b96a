"""Blockwise parallel drafts with lattice rescoring: token-identical greedy decoding (three families, three
rescorers), exact sampling (chi-square with a negative control), exact lattice and n-gram tables, the
p-best search against brute force, training and loading heads for another family, named errors."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from mmspec import engine
from mmspec.distill import load_drafter
from mmspec.distill.data import target_features
from mmspec.distill.train_blockwise import BlockwiseTraining, load_corpus_ngram, train_blockwise_heads
from mmspec.drafters.base import Draft
from mmspec.drafters.blockwise import BlockwiseDrafter, Lattice, build_candidate_tree, search_lattice
from mmspec.drafters.lattice_rescoring import NeuralRescorer, NGramModel, NGramRescorer
from mmspec.errors import InvalidDraftLengthError, MethodParameterError, VocabularyMismatchError
from mmspec.heads.blockwise import BlockwiseConfig, BlockwiseHeads
from mmspec.verify.tree_rules import DeterministicTreeRule
from stat_helpers import chisquare_pvalue, first_two_token_tables
from tiny_models import ARCHS, build, left_padded_prompts, truncated_drafter

V = 96


def make_heads(target, num_heads=3, seed=0, scale=0.5):
    """Heads with random blocks (an untrained head repeats the target's next-token guess)."""
    torch.manual_seed(seed)
    heads = BlockwiseHeads(BlockwiseConfig.from_target(target, num_heads=num_heads, draft_vocab_size=V))
    with torch.no_grad():
        for h in heads.heads:
            h[0].linear.weight.normal_(0, scale / math.sqrt(h[0].linear.weight.shape[0]))
    return heads.to(torch.float64).eval().attach(target)


def rescorers(target):
    return {"heads": None, "ngram": NGramRescorer(order=3, weight=1.0),
            "ngram+global": NGramRescorer(NGramModel.from_sequences([list(range(V)) * 3], 2, V), weight=0.5),
            "neural": NeuralRescorer(truncated_drafter(target, 1), weight=1.0)}


# ------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescorer", ["heads", "ngram", "ngram+global", "neural"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_is_token_identical_to_hf_generate(arch, rescorer, batch):
    target = build(arch, layers=3)
    heads = make_heads(target)
    ids, mask = left_padded_prompts(batch, 9, V, seed=batch)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = target.generate(input_ids=ids, attention_mask=mask, **kw)
    drafter = BlockwiseDrafter(heads, Lattice(top_k=3, num_candidates=4), rescorer=rescorers(target)[rescorer])
    out = engine.generate(target, ids, attention_mask=mask, drafter=drafter, max_new_tokens=24)
    assert torch.equal(out.sequences[:, : ref.shape[1]], ref)
    assert out.stats.drafted_tokens > 0


def test_a_one_token_prompt_drafts_nothing_first_then_decodes_like_hf():
    target = build("gpt2", layers=3)
    ids = torch.tensor([[7]])
    ref = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = engine.generate(target, ids, drafter=make_heads(target), max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_tokens > 0  # gpt2 at init 0.2 repeats itself: the heads get some right


def test_rescoring_with_an_oracle_lm_accepts_more_than_the_heads_alone():
    """The target itself as the neural rescorer picks the lattice path it will accept (when it is in the
    lattice): acceptance only grows."""
    target = build("llama", layers=3)
    heads = make_heads(target)
    ids, mask = left_padded_prompts(2, 9, V, seed=4)
    acc = {}
    for name, resc in {"heads": None, "oracle": NeuralRescorer(target, weight=100.0)}.items():
        d = BlockwiseDrafter(heads, Lattice(top_k=8, num_candidates=1), rescorer=resc)
        acc[name] = engine.generate(target, ids, attention_mask=mask, drafter=d, max_new_tokens=32).stats.accepted_tokens
    assert acc["oracle"] > acc["heads"]


# ---------------------------------------------------------------------------------------- sampling
class KeepsRejected(DeterministicTreeRule):
    """Negative control: a rejected sibling's token is not removed from the residual (over-emits drafts)."""

    fused_mode = None

    def reject(self, state, tokens, draft_probs):
        return state


class WrongRuleDrafter(BlockwiseDrafter):
    def propose(self, max_tokens):
        d = super().propose(max_tokens)
        return Draft(tokens=d.tokens, probs=None, num_draft=d.num_draft, parents=d.parents, tree_rule=KeepsRejected())


def _draw(target, heads, cls=BlockwiseDrafter, draws=25_000):
    prompt = torch.tensor([[5, 17, 33, 9, 41, 12]])
    ids = prompt.expand(draws, -1).contiguous()
    # any rescorer only reorders deterministic candidates (its plumbing is covered by the greedy tests)
    drafter = cls(heads, Lattice(top_k=4, num_candidates=6))
    out = engine.generate(target, ids, drafter=drafter, max_new_tokens=3, temperature=1.0,
                          seed=list(range(draws)), eos_token_id=[])
    new = out.sequences[:, prompt.shape[1]:]
    return prompt, new[:, 0], new[:, 0] * V + new[:, 1], out.stats


@pytest.mark.extended  # 50 s (default: the blockwise drafter's greedy exactness; the tree rule's sampling in test_verify_tree)
def test_sampling_follows_the_target_first_and_first_two_tokens():
    target = build("llama", layers=3, init=0.08)
    heads = make_heads(target, num_heads=2)
    prompt, first, pair, stats = _draw(target, heads)
    assert 0.05 < stats.accepted_tokens / stats.row_steps < 0.95  # drafts are tried and some are accepted
    p1, p12 = first_two_token_tables(target, prompt)
    assert chisquare_pvalue(first, p1) > 1e-3
    assert chisquare_pvalue(pair, p12.flatten()) > 1e-3


@pytest.mark.extended  # negative control of the sampling test above
def test_the_sampling_test_catches_a_wrong_tree_rule():
    target = build("llama", layers=3, init=0.08)
    heads = make_heads(target, num_heads=2)
    prompt, first, pair, _ = _draw(target, heads, cls=WrongRuleDrafter)
    p1, p12 = first_two_token_tables(target, prompt)
    assert chisquare_pvalue(first, p1) < 1e-6 or chisquare_pvalue(pair, p12.flatten()) < 1e-6


# ---------------------------------------------------------------------------------- exact tables
def test_search_lattice_and_candidate_tree_exact_case():
    # two columns, two tokens each; path scores: (10,20)=-0.3 (10,21)=-1.2 (11,20)=-0.8 (11,21)=-1.7
    tokens = torch.tensor([[[10, 11], [20, 21]]])
    logp = torch.tensor([[[-0.1, -0.6], [-0.2, -1.1]]])
    s = search_lattice(tokens, logp, width=3)
    assert s.tokens[1].tolist() == [[20, 20, 21]] and s.parents[1].tolist() == [[0, 1, 0]]
    assert torch.allclose(s.scores, torch.tensor([[-0.3, -0.8, -1.2]]))
    tree = build_candidate_tree(s)
    # nodes by depth, siblings best first: 10, 11 | 20 (of 10), 21 (of 10), 20 (of 11)
    assert tree.tokens.tolist() == [[10, 11, 20, 20, 21]]
    assert tree.parents.tolist() == [[-1, -1, 0, 1, 0]]
    assert tree.node_depth.tolist() == [[1, 1, 2, 2, 2]] and tree.num_nodes.tolist() == [5]


class _Prefers:
    """A rescorer adding +5 to one token everywhere."""

    weight = 1.0

    def __init__(self, token):
        self.token = token

    def score(self, paths, parent_beams, candidates):
        return (candidates == self.token).float() * 5.0


def test_a_rescorer_changes_the_best_path():
    tokens = torch.tensor([[[10, 11], [20, 21]]])
    logp = torch.tensor([[[-0.1, -0.6], [-0.2, -1.1]]])
    s = search_lattice(tokens, logp, width=1, rescorer=_Prefers(21))
    assert [t.tolist() for t in s.tokens] == [[[10]], [[21]]]


@pytest.mark.parametrize("seed", range(5))
def test_search_without_rescorer_is_the_brute_force_p_best(seed):
    g = torch.Generator().manual_seed(seed)
    batch, depth, k, p = 2, 3, 3, 5
    logp = torch.randn((batch, depth, k), generator=g)
    tokens = torch.arange(depth * k).reshape(1, depth, k).expand(batch, -1, -1)
    s = search_lattice(tokens, logp, width=p)
    for b in range(batch):
        scores = sorted((sum(float(logp[b, i, j]) for i, j in enumerate(path)) for path in
                         itertools.product(range(k), repeat=depth)), reverse=True)[:p]
        assert torch.allclose(s.scores[b].double(), torch.tensor(scores, dtype=torch.float64), atol=1e-5)


def test_ngram_model_witten_bell_exact_values():
    m = NGramModel.from_sequences([[1, 2, 1, 3]], order=2, vocab_size=4)
    # unigram: counts 1:2, 2:1, 3:1 (N=4, T=3): p(1) = (2 + 3/4) / 7
    assert m.prob([], 1) == pytest.approx((2 + 3 / 4) / 7)
    assert m.prob([], 0) == pytest.approx((3 / 4) / 7)
    # after 1: continuations 2 and 3 (c=2, T=2): p(2 | 1) = (1 + 2 p(2)) / 4
    p2 = (1 + 3 / 4) / 7
    assert m.prob([1], 2) == pytest.approx((1 + 2 * p2) / 4)
    # unseen context backs off to the unigram
    assert m.prob([0], 2) == pytest.approx(p2)
    # probabilities sum to one in every context
    for ctx in ([], [1], [2], [0]):
        assert sum(m.prob(ctx, w) for w in range(4)) == pytest.approx(1.0)


def test_ngram_extend_matches_counting_the_whole_sequence():
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    a = NGramModel.from_sequences([seq], order=3, vocab_size=10)
    b = NGramModel(3, 10)
    b.add(seq[:4])
    b.extend(seq[:4], seq[4:7])
    b.extend(seq[:7], seq[7:])
    assert a.counts == b.counts and a.totals == b.totals


def test_ngram_from_a_corpus_table_splits_documents_at_the_separator():
    table = torch.tensor([1, 2, 3, -1, 4, 5, -1, 6], dtype=torch.int32)
    a = NGramModel.from_corpus(table, order=2, vocab_size=10)
    b = NGramModel.from_sequences([[1, 2, 3], [4, 5], [6]], order=2, vocab_size=10)
    assert a.counts == b.counts and a.totals == b.totals  # no bigram (3, 4) across the separator
    with pytest.raises(MethodParameterError, match="ids must lie"):
        NGramModel.from_corpus(torch.tensor([1, 12]), order=2, vocab_size=10)
    with pytest.raises(MethodParameterError, match="1-D"):
        NGramModel.from_corpus(torch.zeros((2, 2), dtype=torch.long), order=2, vocab_size=10)


# --------------------------------------------------------------------------------- train and load
def _examples(target, n=24, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, length), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():  # the target's own greedy continuation makes the text predictable
        ids = target.generate(input_ids=ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=length - 4,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    _, final = target_features(target, ids, torch.ones_like(ids), (1,))
    lmask = torch.arange(length) >= 4
    return [{"tokens": ids[b], "loss_mask": lmask, "final": final[b]} for b in range(n)]


def test_heads_train_save_and_load_for_another_family(tmp_path):
    target = build("gpt2", layers=2, dtype=torch.float32)
    examples = _examples(target)
    cfg = BlockwiseTraining(num_heads=2, draft_vocab_size=64, positions_per_step=128,
                            loop=replace(BlockwiseTraining.loop, steps=60, lr=3e-3, save_every=20))
    summary = train_blockwise_heads(target, examples, tmp_path, config=cfg, progress=False, holdout=4)
    assert summary["steps"] == 60 and len(summary["heldout_top1_per_head"]) == 2
    assert (tmp_path / "blockwise_config.json").is_file() and (tmp_path / "train_state.pt").is_file()
    untrained = BlockwiseHeads(BlockwiseConfig.from_target(target, num_heads=2, draft_vocab_size=V)).attach(target)
    ids = torch.stack([e["tokens"][:6] for e in examples[:4]])
    plain = engine.generate(target, ids, drafter=untrained, max_new_tokens=14, eos_token_id=[])
    drafter = load_drafter(tmp_path, target)
    assert isinstance(drafter, BlockwiseDrafter) and drafter.heads.d2t.numel() == 64
    out = engine.generate(target, ids, drafter=drafter, max_new_tokens=14, eos_token_id=[])
    assert torch.equal(out.sequences, plain.sequences)  # lossless either way
    assert out.stats.accepted_tokens > plain.stats.accepted_tokens  # and the trained heads accept more
    # the training answers are kept as a corpus table for n-gram rescoring
    corpus = load_corpus_ngram(tmp_path, vocab_size=V)
    assert sum(corpus.totals[0].values()) == sum(int(e["loss_mask"].sum()) for e in examples) - 4 * 16
    # re-running continues from the saved state
    again = train_blockwise_heads(target, examples, tmp_path, config=cfg, progress=False, holdout=4)
    assert again["steps"] == 60


def test_save_load_roundtrip_keeps_the_drafts(tmp_path):
    target = build("qwen2", layers=2)
    heads = make_heads(target)
    heads.save(tmp_path, dtype=torch.float64)
    again = BlockwiseHeads.load(tmp_path, target, dtype=torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    assert torch.equal(heads(x), again(x))


# ------------------------------------------------------------------------------------ named errors
def test_bad_lattices_and_rescorers_raise_named_errors():
    with pytest.raises(InvalidDraftLengthError, match="top_k"):
        Lattice(top_k=0)
    with pytest.raises(InvalidDraftLengthError, match="num_candidates"):
        Lattice(num_candidates=1.5)
    target = build("llama")
    with pytest.raises(InvalidDraftLengthError, match="depth 5 > the 3 heads"):
        BlockwiseDrafter(make_heads(target), Lattice(depth=5))
    with pytest.raises(MethodParameterError, match="weight"):
        NGramRescorer(weight=float("nan"))
    with pytest.raises(MethodParameterError, match="global model, the context"):
        NGramRescorer(context=False)
    with pytest.raises(MethodParameterError, match="order"):
        NGramModel(0, 10)
    with pytest.raises(TypeError, match="rescorer"):
        BlockwiseDrafter(make_heads(target), rescorer=object())


def test_vocabulary_mismatch_is_named():
    target = build("llama")
    other = build("llama", vocab=80)
    with pytest.raises(VocabularyMismatchError, match="vocabulary of 96"):
        engine.generate(other, torch.tensor([[3, 4, 5]]), drafter=make_heads(target), max_new_tokens=4)
    with pytest.raises(VocabularyMismatchError):
        make_heads(target).attach(other)
