"""A tiny byte-level BPE tokenizer with a chat template, trained offline on stdlib docstrings (for
tests of the training tools on tiny random targets)."""

from __future__ import annotations

import functools

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 384):
    import inspect
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [inspect.getdoc(obj) or "" for obj in vars(json).values() if callable(obj)] + [inspect.getdoc(json) or ""]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_chat_model(folder, *, layers: int, hidden: int = 64):
    """A tiny random Qwen2 over :func:`tiny_tokenizer` (EOS ``<|im_end|>``, pad ``<pad>``) saved with its
    tokenizer into ``folder``, as ``from_pretrained`` reads it; returns (model, tokenizer)."""
    import torch

    from tiny_models import build

    tok = tiny_tokenizer()
    model = build("qwen2", vocab=len(tok), hidden=hidden, layers=layers, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok
