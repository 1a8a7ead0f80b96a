"""Held-out quality of the zoo models (the numbers recorded in ``mmspec.zoo.RECORDED_QUALITY``).

Glossary:
    caption exact match   greedy captions of held-out scenes equal to their true captions (HF generate)
    prompt faithfulness   AR samples (CFG, default sampling) whose parsed scene has the prompt's objects
    round trip            tokens of held-out scenes that survive decode -> encode unchanged: 1.0 by
                          construction with the shipped fixed-point encoding; the nearest-code rate
                          and the parser's reading of fixed-point reconstructions measure its cost
"""

from __future__ import annotations

import torch

from mmspec.image_gen import generate

from . import live_codes, load_default_image_models, load_default_vlm
from .data import IMAGE_SIZE, heldout_scenes, render_batch
from .quality import caption_exact_match, prompt_faithfulness
from .scenes import parse_image, render

# the image models' default sampling (the README's main job and the benchmarks use it too)
IMAGE_SAMPLING = dict(cfg_scale=1.5, temperature=1.0, top_k=16)
# the best relaxed image method on the zoo models (benchmarks/RESULTS.md, "MuLo-SD τ sweep"): MuLo-SD with the
# learned token resampler, pooling over 2 latent neighbours; the demo and ``mmspec run`` default to it
BEST_RELAXED = dict(method="mulo", mulo_tau=0.95, neighbours_k=2)


@torch.no_grad()
def caption_scenes(model, processor, scenes, batch: int = 50, max_new_tokens: int = 32) -> list[str]:
    from .train_vlm import caption_prompt

    out: list[str] = []
    for i in range(0, len(scenes), batch):
        images = [render(s, IMAGE_SIZE) for s in scenes[i: i + batch]]
        inputs = caption_prompt(processor, images)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def evaluate_vlm(num_scenes: int = 200, pair=None) -> dict:
    pair = pair or load_default_vlm()
    scenes = heldout_scenes(max(num_scenes, 1))[:num_scenes]
    return {"vlm_caption_exact_match": caption_exact_match(caption_scenes(pair.target, pair.processor, scenes), scenes),
            "vlm_drafter_caption_exact_match":
                caption_exact_match(caption_scenes(pair.drafter, pair.processor, scenes), scenes)}


def sample_images(models, prompts: list[str], *, method: str = "ar", seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    args = {**IMAGE_SAMPLING, **kw}
    return generate(models.target, models.tokenizer, condition=prompts, method=method, generator=g, **args)


def evaluate_image(num_prompts: int = 64, models=None, batch: int = 16) -> dict:
    models = models or load_default_image_models()
    prompts = [s.caption() for s in heldout_scenes(max(num_prompts, 1))[:num_prompts]]
    images = []
    for i in range(0, len(prompts), batch):
        images += sample_images(models, prompts[i: i + batch], seed=i).images
    by_count = {}
    for n_obj in (1, 2, 3):  # 1- and 2-object captions are mostly seen in training; 3-object ones mostly not
        sel = [i for i, p in enumerate(prompts) if p.count(" and ") == n_obj - 1]
        if sel:
            by_count[n_obj] = prompt_faithfulness([images[i] for i in sel], [prompts[i] for i in sel])
    return {"image_prompt_faithfulness": prompt_faithfulness(images, prompts),
            "image_prompt_faithfulness_by_objects": by_count, "image_sampling": IMAGE_SAMPLING,
            **evaluate_tokenizer(models.tokenizer)}


@torch.no_grad()
def evaluate_tokenizer(tokenizer, num_scenes: int = 64) -> dict:
    """Round-trip stability of the tokenizer's own encoding, of one nearest-code pass, and what the
    fixed-point projection costs: tokens it moves, passes, and scenes the parser still reads exactly."""

    scenes = list(heldout_scenes(max(num_scenes, 1))[:num_scenes])
    x = render_batch(scenes)
    nearest = tokenizer.resized(tokenizer.image_size)
    t_near = nearest.encode(x)
    fixed = tokenizer.encode_fixed_points(x)

    def parsed(tokens):
        return sum(parse_image(im).objects == s.objects for im, s in zip(tokenizer.decode(tokens), scenes)) / len(scenes)

    stable = tokenizer.encode(tokenizer.decode_tensor(fixed.tokens)) == fixed.tokens
    return {"tokenizer_live_codes": int(live_codes(tokenizer).sum()),  # codes used on 2048 training scenes
            "tokenizer_round_trip_stable": float(stable.float().mean()),
            "tokenizer_nearest_round_trip_stable": float((nearest.round_trip(t_near) == t_near).float().mean()),
            "tokenizer_fixed_point_moved_tokens": float((fixed.tokens != t_near).float().mean()),
            "tokenizer_fixed_point_mean_passes": float(fixed.passes.float().mean()),
            "tokenizer_parse_exact_nearest": parsed(t_near),
            "tokenizer_parse_exact_fixed_point": parsed(fixed.tokens)}
