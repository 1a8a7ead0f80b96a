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
