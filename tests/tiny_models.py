"""Tiny random HF causal LMs built offline from configs, for every supported architecture."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mmspec.truncate import truncated_copy

ARCHS = ("llama", "qwen2", "gpt2")


def build(arch: str, *, vocab: int = 96, hidden: int = 64, layers: int = 2, seed: int = 0,
          init: float = 0.2, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A tiny random model; ``init`` (initializer_range) > 0.02 makes distributions peaked."""
    torch.manual_seed(seed)
    heads = 4
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                          initializer_range=init, max_position_embeddings=512)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                          initializer_range=init, max_position_embeddings=512)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                         initializer_range=init, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def truncated_drafter(target: torch.nn.Module, keep_layers: int = 1) -> torch.nn.Module:
    """A smaller drafter sharing the target's first layers, embeddings and head (partial acceptance)."""
    return truncated_copy(target, keep_layers)


def left_padded_prompts(batch: int, length: int, vocab: int, *, seed: int = 0, pad: int = 0):
    """Random prompts (tokens >= 3, avoiding specials) with increasing left padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        cut = min(length - 1, 3 * b)
        mask[b, :cut] = 0
        ids[b, :cut] = pad
    return ids, mask
