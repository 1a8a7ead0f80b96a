"""Bad input gets a named error with a message that names the problem."""

import functools

import pytest
import torch

import mmspec
from mmspec import (DeviceMismatchError, EmptyPromptError, InvalidDraftLengthError, InvalidLengthError,
                    InvalidSamplingError, ShapeError, VocabularyMismatchError)
from tiny_models import build


@functools.lru_cache(maxsize=None)
def target():
    return build("llama", vocab=50, dtype=torch.float32)


IDS = torch.tensor([[5, 6, 7, 8]])


def run(**overrides):
    kwargs = dict(drafter="prompt_lookup", max_new_tokens=4)
    kwargs.update(overrides)
    ids = kwargs.pop("input_ids", IDS)
    return mmspec.generate(kwargs.pop("target", target()), ids, **kwargs)


def test_drafter_with_other_vocabulary():
    other = build("llama", vocab=60, dtype=torch.float32)
    with pytest.raises(VocabularyMismatchError, match="vocabulary size 60 != target vocabulary size 50"):
        run(drafter=other)


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_k_below_one(k):
    with pytest.raises(InvalidDraftLengthError, match="num_draft_tokens"):
        run(num_draft_tokens=k)
    with pytest.raises(InvalidDraftLengthError):
        mmspec.FixedDraftLength(k)


@pytest.mark.parametrize("ids,mask", [
    (torch.zeros((1, 0), dtype=torch.long), None),
    (torch.tensor([[0, 0, 5], [0, 0, 0]]), torch.tensor([[0, 0, 1], [0, 0, 0]])),
])
def test_empty_prompt(ids, mask):
    with pytest.raises(EmptyPromptError, match="empty prompt"):
        run(input_ids=ids, attention_mask=mask)


def test_mismatched_devices():
    with torch.device("meta"):
        meta_model = build("llama", vocab=50, dtype=torch.float32)
    with pytest.raises(DeviceMismatchError, match="input_ids is on cpu but the target model is on meta"):
        run(target=meta_model)
    with pytest.raises(DeviceMismatchError, match="drafter is on meta but target is on cpu"):
        run(drafter=meta_model)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_max_new_tokens(n):
    with pytest.raises(InvalidLengthError, match="max_new_tokens"):
        run(max_new_tokens=n)


def test_negative_temperature():
    with pytest.raises(InvalidSamplingError, match="temperature must be a number >= 0"):
        run(temperature=-0.5)


def test_right_padding_and_dtype():
    with pytest.raises(ShapeError, match="left padded"):
        run(input_ids=torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ShapeError, match="long tensor"):
        run(input_ids=IDS.float())
    with pytest.raises(ShapeError, match="attention_mask shape"):
        run(attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_unknown_drafter():
    with pytest.raises(ValueError, match="unknown drafter 'medusa'"):
        run(drafter="medusa")
    with pytest.raises(TypeError, match="drafter must be a Drafter"):
        run(drafter=42)


def test_errors_raise_before_iteration():
    """generate_stream validates eagerly, not at the first next()."""
    with pytest.raises(InvalidLengthError):
        mmspec.generate_stream(target(), IDS, drafter="prompt_lookup", max_new_tokens=0)


def _tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="a")))


def test_drafter_of_another_tokenizer():
    mmspec.check_same_tokenizer(_tokenizer(["a", "b", "c"]), _tokenizer(["a", "b", "c"]))
    with pytest.raises(VocabularyMismatchError, match="another tokenizer.*different ids: \\['b', 'c'\\]"):
        mmspec.check_same_tokenizer(_tokenizer(["a", "b", "c"]), _tokenizer(["a", "c", "b"]))


def test_generation_config_settings_mmspec_does_not_apply_are_announced():
    model = build("llama", vocab=50, dtype=torch.float32)
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 2
    with pytest.warns(UserWarning, match="repetition_penalty=1.3, no_repeat_ngram_size=2.*does not apply"):
        mmspec.generate(model, IDS, drafter="prompt_lookup", max_new_tokens=2)


def test_default_generation_config_gives_no_warning(recwarn):
    run()
    assert not [w for w in recwarn if "does not apply" in str(w.message)]


# ---- non-finite numbers and out-of-vocabulary drafts (issue 12) ----------------------------------

from mmspec import SamplingParams  # noqa: E402
from mmspec.errors import NonFiniteError, TokenIdError  # noqa: E402
from mmspec.verify import verify_chain  # noqa: E402

SAMPLINGS = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3, top_p=0.9)]


def _chain_case(B=2, k=3, V=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, k + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, k, V, generator=g), -1)
    x = torch.randint(0, V, (B, k), generator=g)
    return x, q, logits


@pytest.mark.parametrize("backend", ["torch", "triton", "generic"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "t1", "topk_topp"])
@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_verify_chain_rejects_nan_and_posinf_target_logits(backend, sampling, value, what):
    x, q, logits = _chain_case()
    logits[1, 2, 5] = value
    with pytest.raises(NonFiniteError, match=rf"target_logits hold {what} at row 1, position 2"):
        verify_chain(x, q, logits, sampling=sampling, generator=torch.Generator().manual_seed(0), backend=backend)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "t1", "topk_topp"])
def test_verify_chain_allows_neg_inf_masking_but_not_an_all_masked_row(sampling):
    x, q, logits = _chain_case()
    logits[:, :, 1::2] = float("-inf")  # masking half the vocabulary is legal
    res = verify_chain(x, q, logits, sampling=sampling, generator=torch.Generator().manual_seed(0))
    emitted = res.tokens.gather(1, res.num_accepted.unsqueeze(1))
    assert (emitted % 2 == 0).all()  # never a masked token
    logits[0, 3] = float("-inf")
    with pytest.raises(NonFiniteError, match="only -inf .every token masked. at row 0, position 3"):
        verify_chain(x, q, logits, sampling=sampling, generator=torch.Generator().manual_seed(0))


def test_verify_chain_ignores_non_finite_values_beyond_num_draft():
    """Positions a row cannot use (target columns > num_draft, draft columns >= num_draft) never matter."""
    x, q, logits = _chain_case()
    nd = torch.tensor([1, 3])
    clean = verify_chain(x, q, logits, sampling=SAMPLINGS[1], generator=torch.Generator().manual_seed(0), num_draft=nd)
    logits[0, 2:] = float("nan")
    q[0, 1:] = float("nan")
    x[0, 1:] = -1
    got = verify_chain(x, q, logits, sampling=SAMPLINGS[1], generator=torch.Generator().manual_seed(0), num_draft=nd)
    assert torch.equal(got.tokens, clean.tokens) and torch.equal(got.num_accepted, clean.num_accepted)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_verify_chain_rejects_non_finite_draft_probs(value):
    x, q, logits = _chain_case()
    q[0, 1, 2] = value
    with pytest.raises(NonFiniteError, match="draft_probs hold NaN or inf at row 0, position 1"):
        verify_chain(x, q, logits, sampling=SAMPLINGS[1], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["torch", "triton", "generic"])
def test_verify_chain_rejects_out_of_vocabulary_drafts(backend):
    x, q, logits = _chain_case()
    x[0, 0] = 8
    with pytest.raises(TokenIdError, match=r"drafted token id 8 \(row 0, column 0"):
        verify_chain(x, q, logits, sampling=SAMPLINGS[1], generator=torch.Generator().manual_seed(0), backend=backend)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_a_nan_target_raises(temperature):
    """A target whose logits are NaN used to emit token 0 silently when sampling; now a named error."""
    model = build("llama", vocab=50, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="target_logits hold NaN"):
        mmspec.generate(model, IDS, drafter="prompt_lookup", max_new_tokens=4, temperature=temperature,
                        generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("stream", [False, True])
def test_vlm_non_finite_pixel_values_raise_before_any_forward(value, stream, monkeypatch):
    import mmspec.vision as mv
    from tiny_vlms import build_vlm, truncated_vlm_drafter, vlm_inputs

    target = build_vlm("llava")
    drafter = truncated_vlm_drafter(target)
    inputs = vlm_inputs("llava")
    inputs["pixel_values"] = torch.full_like(inputs["pixel_values"], value)

    def no_forward(*args, **kwargs):
        raise AssertionError("a model forward ran before the input check")

    monkeypatch.setattr(target, "forward", no_forward)
    monkeypatch.setattr(drafter, "forward", no_forward)
    run = mv.generate_stream if stream else mv.generate
    with pytest.raises(NonFiniteError, match=r"inputs\['pixel_values'\] holds \d+ non-finite value"):
        run(target, drafter, inputs, max_new_tokens=4)
