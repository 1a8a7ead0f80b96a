"""Self-distillation data for VLM drafters: a VLM target's own answers to questions about scenes, with its
teacher-forced features, and random visual pruning of an example (what a pruned drafter will see).

Glossary:
    example     a dict like :mod:`mmspec.distill.data`'s (``tokens`` long [L], ``loss_mask`` bool [L] over the
                answer, ``features`` half [L, 3, d], ``final`` half [L, d]) plus ``image_mask`` bool [L] (the
                visual positions), ``visual_index`` long [L] (a visual row's index among the prompt's visual
                tokens, -1 for text), ``pixel_values`` half [I, 3, H, W] (the prompt's images: base + tiles)
                and ``positions`` long [L] (each row's position in the full prompt)
    pruned      ``prune_example(ex, keep_ratio, rng)``: the same example without a random
                ``1 - keep_ratio`` share of its visual rows; ``positions`` keeps the original positions, so
                a drafter trained on it sees what :class:`~mmspec.vision.PrunedFeatureDrafter` feeds it
                (``positions="original"``)
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from mmspec.heads.eagle3 import feature_layers

from .scene_questions import ask
from .scenes import render
from .smollm2_llava import TILE, vlm_inputs


@torch.no_grad()
def scene_examples(model: Any, processor: Any, scenes: Sequence[Any], kinds: Sequence[str], *, grid: int = 1,
                   seed: int = 0, batch_size: int = 8, max_new_tokens: int = 64, progress: bool = True) -> list[dict]:
    """The target's greedy answers to one question of each kind in ``kinds`` about each scene (tiled
    ``grid x grid``), and its hidden states along prompt + answer."""

    rng = random.Random(seed)
    items = [(s, ask(s, k, rng)) for s in scenes for k in kinds]
    layers = feature_layers(model.config.get_text_config().num_hidden_layers)
    eos = model.generation_config.eos_token_id
    image_token = model.config.image_token_id
    examples = []
    for i in tqdm(range(0, len(items), batch_size), desc=f"self-distillation (grid {grid})", disable=not progress):
        chunk = items[i: i + batch_size]
        enc = vlm_inputs(processor, [render(s, TILE * grid) for s, _ in chunk], [q.question for _, q in chunk],
                         grid=grid)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)
        width = enc["input_ids"].shape[1]
        per_row = enc["pixel_values"].shape[0] // len(chunk)
        for b in range(len(chunk)):
            prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()]
            answer = gen[b, width:].tolist()
            answer = answer[: answer.index(eos) + 1] if eos in answer else answer
            tokens = torch.cat([prompt, torch.tensor(answer, dtype=torch.long)])
            pixels = enc["pixel_values"][b * per_row: (b + 1) * per_row]
            out = model(input_ids=tokens[None], pixel_values=pixels, output_hidden_states=True, logits_to_keep=1)
            hs = out.hidden_states
            loss_mask = torch.zeros(tokens.shape[0], dtype=torch.bool)
            loss_mask[prompt.shape[0]:] = True
            image_mask = tokens == image_token
            examples.append({
                "tokens": tokens, "loss_mask": loss_mask, "image_mask": image_mask,
                "visual_index": torch.where(image_mask, image_mask.cumsum(0) - 1, -1),
                "features": torch.stack([hs[j][0] for j in layers], dim=1).half(), "final": hs[-1][0].half(),
                "pixel_values": pixels.half(), "positions": torch.arange(tokens.shape[0]),
            })
    return examples


def prune_example(example: dict, keep_ratio: float, rng: random.Random) -> dict:
    """``example`` without a random share of its visual rows (``ceil(keep_ratio * N)`` of N kept); the
    per-row fields are cut alike, ``pixel_values`` stays."""
    visual = example["image_mask"].nonzero().flatten().tolist()
    n_keep = min(len(visual), math.ceil(keep_ratio * len(visual) - 1e-9))
    dropped = set(visual) - set(rng.sample(visual, n_keep))
    keep = torch.tensor([i not in dropped for i in range(example["tokens"].shape[0])])
    return {k: (v[keep] if k not in ("pixel_values",) else v) for k, v in example.items()}
