"""Tiny AR image models for tests, and a cache-free reference sampler (the oracle)."""

from __future__ import annotations

import functools

import torch

from mmspec.image_gen import ARImageConfig, ARImageModel

WORDS = ("a", "red", "blue", "circle", "square", "left", "right")


def tiny_ar(*, layers=2, hidden=32, seed=0, codebook=16, grid=4, text=False, init=0.3, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = ARImageConfig(codebook_size=codebook, grid_size=grid, num_classes=0 if text else 10,
                        words=WORDS if text else (), hidden_size=hidden, num_layers=layers,
                        intermediate_size=2 * hidden, init_range=init)
    return ARImageModel(cfg).to(dtype).eval()


def truncated_ar(model: ARImageModel) -> ARImageModel:
    """The target's first layer with its embeddings and head: a cheaper drafter with partial acceptance."""
    import dataclasses
    d = ARImageModel(dataclasses.replace(model.config, num_layers=1))
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k or ".layers.0." in k}
    d.load_state_dict(state)
    return d.to(next(model.parameters()).dtype).eval()


@torch.no_grad()
def reference_logits(model: ARImageModel, condition, tokens: list[int], cfg_scale: float, schedule="constant"):
    """Guided next-token logits by a full forward without any cache (independent of the engine)."""
    from mmspec.image_gen import guidance_scale
    cond = model(torch.tensor([model.prefix_ids(condition) + tokens])).logits[0, -1].float()
    if cfg_scale == 1.0:
        return cond
    unc = model(torch.tensor([model.prefix_ids(condition, unconditional=True) + tokens])).logits[0, -1].float()
    s = float(guidance_scale(cfg_scale, schedule, torch.tensor(len(tokens)), model.config.num_image_tokens))
    return unc + (cond - unc) * s


@functools.lru_cache(maxsize=None)
def reference_greedy(model, condition, cfg_scale, schedule="constant"):
    toks: list[int] = []
    for _ in range(model.config.num_image_tokens):
        toks.append(int(reference_logits(model, condition, toks, cfg_scale, schedule).argmax()))
    return toks
