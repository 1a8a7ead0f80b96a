"""The real pretrained SmolLM2-135M-Instruct (installed from its wheel) with every drafter: greedy output
token-identical to HF generate at batch 1 and 4 (left-padded chat prompts), and sampled output (T = 1,
top-p 0.9) equal in distribution to HF's by a two-sample test on the target's log-probabilities."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from mmspec import engine
from mmspec.drafters import CostAwareDraftLength
from mmspec.drafters.hybrid import HybridDrafter
from mmspec.drafters.model import ModelDrafter
from mmspec.drafters.prompt_lookup import PromptLookupDrafter
from mmspec.drafters.blockwise import Lattice
from mmspec.drafters.lattice_rescoring import NeuralRescorer, NGramRescorer
from mmspec.drafters.test_time_speculation import TTSConfig, TTSDrafter
from mmspec.drafters.tree import DynamicTree
from mmspec.pretrained import ModelNotFoundError, chat_inputs, load_causal_lm, resolve_model_dir
from mmspec.zoo.smollm2 import load_smollm2_drafter
from test_draft_length import SMOLLM2 as SMOLLM2_COST  # SmolLM2's measured verify(w)

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Give two tips for learning to cook.", "Explain what a prime number is."]


@pytest.fixture(scope="module")
def smollm2(real_model_threads):
    target, tok = load_causal_lm()
    return target, tok


def test_loader_errors_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model at"):
        resolve_model_dir(tmp_path / "missing")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model_dir(f)


def test_the_conversion_is_cached_and_the_chat_template_kept(smollm2):
    target, tok = smollm2
    folder = resolve_model_dir("smollm2")
    assert (folder / "model.safetensors").is_file() and tok.chat_template
    assert target.config.num_hidden_layers == 30 and target.get_output_embeddings().weight.shape[0] == 49152
    enc = chat_inputs(tok, PROMPTS)
    assert enc["attention_mask"][:, -1].all() and (enc["attention_mask"][:, 0] == 0).any()  # left padded


def _drafters(target):
    return {
        "head chain": lambda: load_smollm2_drafter("head", target, draft_length=4),
        "head tree": lambda: load_smollm2_drafter("head", target, tree=DynamicTree(depth=4, top_k=4, num_nodes=12)),
        "head chain + TTS": lambda: TTSDrafter(load_smollm2_drafter("head", target, draft_length=4),
                                               TTSConfig(update_every=1, window=32)),
        "standalone drafter": lambda: ModelDrafter(load_smollm2_drafter("model", target)),
        "blockwise heads": lambda: load_smollm2_drafter("heads", target, lattice=Lattice(top_k=4, num_candidates=4)),
        "blockwise heads + n-gram": lambda: load_smollm2_drafter("heads", target, rescorer=NGramRescorer(order=3)),
        "blockwise heads + neural": lambda: load_smollm2_drafter(
            "heads", target, rescorer=NeuralRescorer(load_smollm2_drafter("model", target))),
        "prompt lookup": lambda: "prompt_lookup",
        "hybrid (head tree + prompt lookup)": lambda: HybridDrafter(
            load_smollm2_drafter("head", target, tree=DynamicTree(depth=4, top_k=4, num_nodes=8)),
            PromptLookupDrafter(max_ngram_size=3, draft_length=6, min_ngram_size=2)),
        "prompt lookup, cost-aware k": lambda: PromptLookupDrafter(
            2, draft_length=CostAwareDraftLength(SMOLLM2_COST, max_k=8, prior=0.5, min_k=0)),
    }


@pytest.mark.parametrize("batch", [1, pytest.param(4, marks=pytest.mark.extended)])
def test_greedy_is_token_identical_to_hf_generate_with_every_drafter(smollm2, batch):
    target, tok = smollm2
    enc = chat_inputs(tok, PROMPTS[:batch])
    with torch.no_grad():
        ref = target.generate(**enc, max_new_tokens=40, do_sample=False)
    for name, make in _drafters(target).items():
        out = engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=make(),
                              num_draft_tokens=4, max_new_tokens=40)
        assert torch.equal(out.sequences[:, : ref.shape[1]], ref), name


def _target_logprob(target, enc, seqs, plen):
    """Sum over generated tokens (up to EOS) of the target's log-probability after top-p 0.9."""
    from mmspec.config import SamplingParams
    from mmspec.sampling import logits_to_probs

    mask = torch.cat([enc["attention_mask"], torch.ones_like(seqs[:, plen:])], dim=1)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = target(input_ids=seqs, attention_mask=mask, position_ids=pos).logits[:, plen - 1:-1]
    probs = logits_to_probs(logits.float(), SamplingParams(temperature=1.0, top_p=0.9))
    lp = probs.gather(-1, seqs[:, plen:].unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log()
    eos = target.generation_config.eos_token_id
    alive = torch.ones_like(lp, dtype=torch.bool)
    ended = (seqs[:, plen:] == eos).long().cumsum(1)
    alive = (ended - (seqs[:, plen:] == eos).long()) == 0
    return (lp * alive).sum(1)


@pytest.mark.extended  # 3 min: the engine's sampling on SmolLM2 (default: tests/test_engine_sampling.py on tiny models)
def test_sampling_with_the_head_matches_hf_sampling_in_distribution(smollm2):
    target, tok = smollm2
    n, new = 96, 12
    enc = chat_inputs(tok, [PROMPTS[3]] * n)
    plen = enc["input_ids"].shape[1]
    torch.manual_seed(0)
    with torch.no_grad():
        hf = target.generate(**enc, max_new_tokens=new, do_sample=True, temperature=1.0, top_p=0.9, top_k=0)
    hf = torch.cat([hf, torch.full((n, plen + new - hf.shape[1]), 2, dtype=torch.long)], dim=1)
    ours = engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"],
                           drafter=load_smollm2_drafter("head", target, draft_length=3), max_new_tokens=new,
                           temperature=1.0, top_p=0.9, seed=list(range(n))).sequences
    wrong = engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=None,
                            max_new_tokens=new, temperature=1.6, top_p=0.9, seed=list(range(n))).sequences
    a, b, w = (_target_logprob(target, enc, s, plen) for s in (hf, ours, wrong))
    assert stats.ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3
    assert stats.ks_2samp(a.numpy(), w.numpy()).pvalue < 1e-3  # negative control: a hotter sampler is caught


@pytest.mark.extended  # the LoRA code model on SmolLM2 (default: tests/test_collaborative.py)
def test_collaborative_decoding_with_the_code_model_equals_plain_collaborative_decoding(smollm2):
    """SmolLM2 + its shipped code LoRA model, batch 2 (left padded): CoS (fixed and alternate) gives plain
    collaborative decoding's greedy tokens, for the ensemble and contrastive decoding."""
    from mmspec import collaborative as co
    from mmspec.zoo.smollm2 import load_smollm2_domain

    target, tok = smollm2
    code = load_smollm2_domain("code")
    enc = chat_inputs(tok, PROMPTS[:2])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for combine in (co.WeightedEnsemble((0.5, 0.5)), co.ContrastiveDecoding(alpha=0.1, plausibility=0.1)):
        kw = dict(attention_mask=enc["attention_mask"], combine=combine, max_new_tokens=32, eos_token_id=eos)
        plain = co.generate([target, code], enc["input_ids"], proposal=None, **kw).sequences
        for proposal in (co.FixedProposer(0, 3), co.AlternateProposals((2, 2))):
            assert torch.equal(co.generate([target, code], enc["input_ids"], proposal=proposal, **kw).sequences, plain)
