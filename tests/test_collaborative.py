"""Collaborative decoding via speculation (CoS): combinations, the combined session, fixed and alternate
proposals. Greedy output equals standard collaborative decoding (argmax r, recomputed cache-free here);
sampled output follows r by chi-square on 100 000 draws, and verifying against p_1 instead of r fails it."""

import dataclasses
import math

import pytest
import torch

from mmspec import collaborative as co
from mmspec.collaborative import (AlternateProposals, ContrastiveDecoding, FixedProposer, WeightedEnsemble)
from mmspec.errors import (EmptyPromptError, InvalidDraftLengthError, InvalidWeightsError, MethodParameterError,
                           NonFiniteError, VocabularyMismatchError)
from stat_helpers import chisquare_pvalue
from tiny_models import build, left_padded_prompts, truncated_drafter

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(models, combine, ids, mask, steps, temperature=0.0):
    """Standard collaborative decoding, cache-free: argmax of the combined logits at every step."""
    seq, m = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(steps):
            pos = (m.cumsum(1) - 1).clamp_min(0)
            logits = [model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1:] for model in models]
            tok = combine.combine(logits)[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, tok], 1), torch.cat([m, torch.ones_like(tok)], 1)
    return seq


COMBINES = {"ensemble": WeightedEnsemble((0.6, 0.4)), "contrastive": ContrastiveDecoding(alpha=0.3, plausibility=0.1)}
PROPOSALS = {"standard": None, "fixed": FixedProposer(0, 3), "fixed-other": FixedProposer(1, 2),
             "alternate": AlternateProposals((3, 1)), "alternate-even": AlternateProposals((2, 2))}


# ------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("combine", list(COMBINES))
@pytest.mark.parametrize("proposal", list(PROPOSALS))
def test_greedy_equals_standard_collaborative_decoding(arch, combine, proposal):
    big = build(arch, seed=0)
    models = [truncated_drafter(big, 1), big] if proposal != "fixed-other" else [big, build(arch, seed=1)]
    ids, mask = left_padded_prompts(3, 6, 96, seed=3)
    out = co.generate(models, ids, attention_mask=mask, combine=COMBINES[combine], proposal=PROPOSALS[proposal],
                      max_new_tokens=14, eos_token_id=[])
    assert torch.equal(out.sequences, reference(models, COMBINES[combine], ids, mask, 14))


@pytest.mark.parametrize("proposal", [None, FixedProposer(0, 3), AlternateProposals((2, 1, 1)), AlternateProposals((1, 0, 2))])
def test_greedy_three_models(proposal):
    big = build("llama", seed=0)
    models = [truncated_drafter(big, 1), big, build("llama", seed=2)]
    combine = WeightedEnsemble((0.3, 0.4, 0.3))
    ids, mask = left_padded_prompts(2, 5, 96, seed=4)
    out = co.generate(models, ids, attention_mask=mask, combine=combine, proposal=proposal, max_new_tokens=12,
                      eos_token_id=[])
    assert torch.equal(out.sequences, reference(models, combine, ids, mask, 12))


def test_greedy_stops_at_eos_and_budget_and_one_token_prompt():
    big = build("llama", seed=0)
    models = [truncated_drafter(big, 1), big]
    combine = WeightedEnsemble((0.5, 0.5))
    ids = torch.tensor([[7]])
    ref = reference(models, combine, ids, torch.ones_like(ids), 9)
    eos = int(ref[0, 4])  # the 4th generated token
    for proposal in (FixedProposer(0, 4), AlternateProposals((4, 1))):
        out = co.generate(models, ids, combine=combine, proposal=proposal, max_new_tokens=9, eos_token_id=[])
        assert torch.equal(out.sequences, ref)
        out = co.generate(models, ids, combine=combine, proposal=proposal, max_new_tokens=9, eos_token_id=eos)
        first = ref[0, 1:].tolist().index(eos) + 1
        assert out.num_generated == [first] and out.sequences[0, 1:first + 1].tolist() == ref[0, 1:first + 1].tolist()


def test_speculation_saves_forwards_of_the_large_model():
    big = build("llama", seed=0, layers=3)
    models = [truncated_drafter(big, 1), big]
    ids, mask = left_padded_prompts(1, 6, 96, seed=5)
    calls = {}
    for name, proposal in (("standard", None), ("fixed", FixedProposer(0, 4)), ("alternate", AlternateProposals((4, 1)))):
        out = co.generate(models, ids, attention_mask=mask, combine=WeightedEnsemble((0.5, 0.5)), proposal=proposal,
                          max_new_tokens=24, eos_token_id=[])
        calls[name] = out.stats.extra["calls_per_model"]
        s = out.stats  # tokens per step counts no bonus after an open-end step accepted whole
        assert s.mean_accepted_length == pytest.approx(s.emitted_tokens / s.row_steps)
    assert calls["standard"] == [25, 25]  # prefill + one forward per token
    assert calls["fixed"][1] < 15 and calls["alternate"][1] < 15
    # alternate proposals reuse the large model's bonus distribution: the small model runs fewer forwards
    assert sum(calls["alternate"]) < sum(calls["fixed"])


# ------------------------------------------------------------------------------------------ sampling
V = 24
PROMPT = torch.tensor([[5, 17, 3]])


class FirstModelOnly(co.Combination):
    """A wrong verification: against p_1 instead of r."""

    num_models = 2

    def combine(self, logits):
        return logits[0].float()


def _pair_models():
    # two different small models over a small vocabulary (float32, one layer: 100 000 rows stay quick)
    a = build("llama", vocab=V, hidden=32, layers=1, seed=10, init=0.15, dtype=torch.float32)
    b = build("llama", vocab=V, hidden=32, layers=1, seed=11, init=0.15, dtype=torch.float32)
    return [a, b]


def _r_tables(models, combine, temperature):
    """r of the first token (float [V]) and of the first two ([V, V], row = first token), cache-free."""
    with torch.no_grad():
        first = combine.combine([m(input_ids=PROMPT).logits[:, -1:] for m in models])[0, -1].double()
        r1 = (first / temperature).softmax(-1)
        both = torch.cat([PROMPT.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        second = combine.combine([m(input_ids=both).logits[:, -1:] for m in models])[:, -1].double()
        r2 = (second / temperature).softmax(-1)
    return r1, r1[:, None] * r2


DRAWS = 100_000


# the default tier samples each combination once, under a different scheme each; -m extended the other two cases
@pytest.mark.parametrize("combine,proposal", [
    ("ensemble", "fixed"), ("contrastive", "alternate"),
    pytest.param("contrastive", "fixed", marks=pytest.mark.extended),
    pytest.param("ensemble", "alternate", marks=pytest.mark.extended)])
def test_sampling_follows_r_first_and_first_two_tokens(combine, proposal):
    models = _pair_models()
    comb = {"ensemble": WeightedEnsemble((0.5, 0.5)), "contrastive": ContrastiveDecoding(alpha=0.5)}[combine]
    # alternate with gamma (1, 1): the second token is the second model's bonus proposal whenever the first is accepted
    scheme = {"fixed": FixedProposer(0, 2), "alternate": AlternateProposals((1, 1))}[proposal]
    out = co.generate(models, PROMPT.expand(DRAWS, -1).contiguous(), combine=comb, proposal=scheme,
                      max_new_tokens=2, temperature=0.9, seed=2024, eos_token_id=[])
    new = out.sequences[:, PROMPT.shape[1]:]
    stats = out.stats
    assert 0.05 < stats.accepted_tokens / stats.drafted_tokens < 0.95  # both acceptance and rejection happen
    if proposal == "alternate":
        assert stats.extra["bonus_proposals"] > 0
    r1, r12 = _r_tables(models, comb, 0.9)
    assert chisquare_pvalue(new[:, 0], r1) > 1e-3
    assert chisquare_pvalue(new[:, 0] * V + new[:, 1], r12.flatten()) > 1e-3


@pytest.mark.extended  # negative control
@pytest.mark.parametrize("proposal", ["fixed", "alternate"])
def test_the_sampling_test_catches_verification_against_p1(proposal):
    models = _pair_models()
    comb = WeightedEnsemble((0.5, 0.5))
    scheme = {"fixed": FixedProposer(0, 2), "alternate": AlternateProposals((1, 1))}[proposal]
    out = co.generate(models, PROMPT.expand(DRAWS, -1).contiguous(), combine=FirstModelOnly(), proposal=scheme,
                      max_new_tokens=2, temperature=0.9, seed=2024, eos_token_id=[])
    new = out.sequences[:, PROMPT.shape[1]:]
    r1, r12 = _r_tables(models, comb, 0.9)
    assert chisquare_pvalue(new[:, 0], r1) < 1e-6 or chisquare_pvalue(new[:, 0] * V + new[:, 1], r12.flatten()) < 1e-6


def test_seeded_runs_repeat():
    models = _pair_models()
    ids = PROMPT.expand(4, -1).contiguous()
    kw = dict(combine=WeightedEnsemble((0.5, 0.5)), proposal=AlternateProposals((2, 1)), max_new_tokens=10,
              temperature=1.0, eos_token_id=[])
    a = co.generate(models, ids, seed=[1, 2, 3, 4], **kw).sequences
    b = co.generate(models, ids, seed=[1, 2, 3, 4], **kw).sequences
    c = co.generate(models, ids, seed=[5, 6, 7, 8], **kw).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fixed_proposer_rows_do_not_depend_on_the_batch():
    models = _pair_models()
    kw = dict(combine=WeightedEnsemble((0.5, 0.5)), proposal=FixedProposer(0, 3), max_new_tokens=10,
              temperature=1.0, eos_token_id=[])
    alone = co.generate(models, PROMPT, seed=[7], **kw).sequences
    batch = co.generate(models, PROMPT.expand(3, -1).contiguous(), seed=[3, 7, 9], **kw).sequences
    assert torch.equal(batch[1:2], alone)


# ------------------------------------------------------------------------------------------ combinations
def test_weighted_ensemble_exact_table():
    la = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    lb = torch.log(torch.tensor([[[0.1, 0.1, 0.8]]])) + 3.0  # logits: any per-row shift
    r = WeightedEnsemble((0.75, 0.25)).combine([la, lb]).softmax(-1)
    assert torch.allclose(r, torch.tensor([[[0.4, 0.2125, 0.3875]]]))
    assert torch.allclose(WeightedEnsemble((1.0, 0.0)).combine([la, lb]).softmax(-1), la.exp())


def test_contrastive_exact_table_and_plausibility_cut():
    pe = torch.tensor([[[0.6, 0.3, 0.1]]])
    pa = torch.tensor([[[0.5, 0.1, 0.4]]])
    s = ContrastiveDecoding(alpha=1.0).combine([pe.log(), pa.log() + 1.0])
    ratio = pe / pa
    assert torch.allclose(s.softmax(-1), ratio / ratio.sum())
    cut = ContrastiveDecoding(alpha=1.0, plausibility=0.4).combine([pe.log(), pa.log()])  # keeps p_e >= 0.24
    assert torch.isinf(cut[0, 0, 2]) and torch.allclose(cut.softmax(-1)[0, 0, :2], (ratio[0, 0, :2] / ratio[0, 0, :2].sum()))
    assert torch.allclose(ContrastiveDecoding(alpha=0.0).combine([pe.log(), pa.log()]).softmax(-1), pe)


def test_random_ensembles_are_distributions():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn((3, 4, 50), generator=g) * 4 for _ in range(3)]
    r = WeightedEnsemble((0.2, 0.3, 0.5)).combine(logits).exp()
    assert torch.allclose(r.sum(-1), torch.ones(3, 4), atol=1e-5)
    lo = torch.stack([l.softmax(-1) for l in logits]).amin(0)
    assert (r >= lo - 1e-6).all()  # a mixture is never below every component


# ------------------------------------------------------------------------------------------ lookahead
def test_lookahead_reuses_logits_and_drops_a_mismatch():
    model = build("llama", seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    look = co.Lookahead(model, 1, torch.device("cpu"))
    look.prefill(ids, torch.ones_like(ids))
    full = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits
    a, _ = look.feed(torch.tensor([[8, 9]]), 2)
    assert look.session.calls == 2 and torch.allclose(a, full[:, 3:5], atol=1e-6)
    b, _ = look.feed(torch.tensor([[8, 9, 10]]), 3)  # two cached, one fed
    assert look.session.calls == 3 and torch.allclose(b, full[:, 3:6], atol=1e-6)
    c, _ = look.feed(torch.tensor([[8, 9]]), 2)  # a prefix of the lookahead: no forward, lookahead kept
    assert look.session.calls == 3 and torch.allclose(c, full[:, 3:5], atol=1e-6) and look.tokens.tolist() == [[8, 9, 10]]
    other = model(input_ids=torch.tensor([[5, 6, 7, 8, 20, 21]])).logits
    d, _ = look.feed(torch.tensor([[8, 20, 21]]), 3)  # mismatch at 1: 9 and 10 leave the cache
    assert torch.allclose(d, other[:, 3:6], atol=1e-6) and look.session.num_slots == 3 + 3


# ------------------------------------------------------------------------------------------ errors
def test_named_errors():
    big = build("llama", seed=0)
    small = truncated_drafter(big, 1)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(InvalidWeightsError, match="sum to 1"):
        WeightedEnsemble((0.5, 0.6))
    with pytest.raises(InvalidWeightsError, match=">= 0"):
        WeightedEnsemble((1.5, -0.5))
    with pytest.raises(NonFiniteError, match="finite"):
        WeightedEnsemble((math.nan, 1.0))
    with pytest.raises(NonFiniteError, match="finite"):
        ContrastiveDecoding(alpha=math.inf)
    with pytest.raises(MethodParameterError, match="plausibility"):
        ContrastiveDecoding(plausibility=0.0)
    with pytest.raises(InvalidDraftLengthError, match="num_draft_tokens"):
        FixedProposer(0, 0)
    with pytest.raises(InvalidDraftLengthError, match="at least one model"):
        AlternateProposals((0, 0))
    with pytest.raises(VocabularyMismatchError, match="vocabularies differ"):
        co.generate([big, build("llama", vocab=64)], ids, combine=WeightedEnsemble((0.5, 0.5)), max_new_tokens=2)
    with pytest.raises(InvalidWeightsError, match="combines 3 models but 2"):
        co.generate([big, small], ids, combine=WeightedEnsemble((0.2, 0.3, 0.5)), max_new_tokens=2)
    with pytest.raises(InvalidWeightsError, match="at least 2 models"):
        co.generate([big], ids, combine=WeightedEnsemble((0.5, 0.5)), max_new_tokens=2)
    with pytest.raises(MethodParameterError, match="proposal lengths for 2 models"):
        co.generate([big, small], ids, combine=WeightedEnsemble((0.5, 0.5)), proposal=AlternateProposals((1, 1, 1)),
                    max_new_tokens=2)
    with pytest.raises(MethodParameterError, match="not one of the 2 models"):
        co.generate([big, small], ids, combine=WeightedEnsemble((0.5, 0.5)), proposal=FixedProposer(2), max_new_tokens=2)
    with pytest.raises(EmptyPromptError):
        co.generate([big, small], torch.zeros((1, 0), dtype=torch.long), combine=WeightedEnsemble((0.5, 0.5)),
                    max_new_tokens=2)


# ------------------------------------------------------------------------------------------ domain models
def test_domain_lora_trains_resumes_and_merges(tmp_path):
    from mmspec.distill.train_domain import DomainTraining, heldout_loss, load_domain_model, token_stream, domain_texts, train_domain_lora
    from tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = DomainTraining(rank=4, alpha=8, seq_len=32, batch_size=4, max_chars=20_000,
                         loop=dataclasses.replace(DomainTraining.loop, steps=6, save_every=2, lr=3e-3))
    model = build("llama", vocab=len(tok), seed=0, dtype=torch.float32)
    first = train_domain_lora(model, tok, "code", tmp_path, config=cfg, progress=False, minutes=0.0)
    assert first["steps"] == 0 and not first["finished"]  # out of time before the first step
    train_domain_lora(build("llama", vocab=len(tok), seed=0, dtype=torch.float32), tok, "code", tmp_path,
                      config=dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, steps=3)), progress=False)
    summary = train_domain_lora(build("llama", vocab=len(tok), seed=0, dtype=torch.float32), tok, "code", tmp_path,
                                config=cfg, progress=False)
    assert summary["steps"] == 6 and summary["finished"]  # the rerun continued
    assert summary["heldout_loss"] < summary["heldout_loss_base"]
    merged = load_domain_model(tmp_path, build("llama", vocab=len(tok), seed=0, dtype=torch.float32))
    assert type(merged).__name__ == "LlamaForCausalLM"
    held = token_stream(tok, domain_texts("code", held_out=True))
    assert heldout_loss(merged, held, 32) == pytest.approx(summary["heldout_loss"], abs=1e-3)
    with pytest.raises(ValueError, match="domain must be one of"):
        domain_texts("klingon")
    with pytest.raises(FileNotFoundError, match="no domain adapter"):
        load_domain_model(tmp_path / "nothing", merged)


def test_cli_collaborate_rejects_bad_input_before_loading(capsys):
    from mmspec.cli import EXIT_BAD_INPUT, main

    cases = [(["--weights", "0.5", "0.6"], "sum to 1"), (["--models", "smollm2"], "at least 2 models"),
             (["--gamma", "1", "1", "1"], "3 proposal lengths for 2 models"), (["--temperature", "-1"], "temperature"),
             (["--prompt", " "], "--prompt is empty"), (["--combine", "contrastive", "--alpha", "nan"], "alpha"),
             (["--proposal", "fixed", "--proposer", "5"], "not one of the 2 models")]
    for args, match in cases:
        assert main(["collaborate", *args]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
