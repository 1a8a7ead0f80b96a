"""Train the zoo's VLM pair on the scene world: a LLaVA target that captions scenes from 256 visual
tokens and a LLaVA drafter that is several times cheaper per token.

Paper: Liu et al., "Visual Instruction Tuning" (LLaVA, 2023): a CLIP vision tower, a two-layer MLP
projector and a Llama decoder, here all trained from scratch (no pretrained weights exist here).

Glossary:
    prompt      ``<s> <image>x256 describe`` then the caption words and ``</s>``; the loss covers the
                caption and ``</s>`` only
    processor   a real ``LlavaProcessor`` (word-level tokenizer over the world's words + CLIP image
                processor at 64 px, patch 4 -> 256 visual tokens), saved next to both models so
                ``from_pretrained`` serves them like any HF checkpoint
    stage       ``target`` or ``drafter``; each trains through the one loop (:func:`mmspec.zoo.training.run_stage`,
                ``VLMZooConfig.budget``), resumes from ``--run-dir`` and exports to ``--out/<stage>``

Usage::

    python -m mmspec.zoo.train_vlm --out mmspec/zoo/weights/vlm
    python -m mmspec.zoo.train_vlm --out /tmp/v --preset smoke
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmspec.distill.loop import LoopConfig, step_seed
from mmspec.zoo.scenes import render

from .data import IMAGE_SIZE, train_scenes
from .train_image import WORDS
from .training import run_stage, training_cli, zoo_stage

STAGES = ("target", "drafter")
PAD, BOS, EOS, UNK, IMAGE = 0, 1, 2, 3, 4
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PROMPT_WORDS = ("describe",)
PATCH = 4
PROMPT = "<image> describe"


@dataclass(frozen=True)
class TowerShape:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int


@dataclass(frozen=True)
class VLMZooConfig:
    target: TowerShape = TowerShape(64, 3, 4, 128, 3, 4, 2, 256)
    drafter: TowerShape = TowerShape(32, 2, 2, 64, 1, 2, 1, 128)
    budget: LoopConfig = zoo_stage(steps=2000, lr=1.5e-3, warmup=100, weight_decay=0.01, save_every=100)
    batch: int = 16
    # the drafter trains on pruned visual tokens this often (keep ratio uniform in [0.05, 1])
    drafter_pruned_fraction: float = 0.75
    seed: int = 1


PRESETS = {
    "full": VLMZooConfig(),
    "smoke": VLMZooConfig(budget=zoo_stage(steps=3, lr=1e-3, warmup=1, weight_decay=0.0, save_every=2), batch=2),
}


def build_processor():
    """The zoo's ``LlavaProcessor`` (offline: the vocabulary is the scene world's words)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + PROMPT_WORDS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(shape: TowerShape, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                          num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                          image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=shape.vision_hidden)
    tc = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
                     num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                     num_key_value_heads=shape.text_kv_heads, max_position_embeddings=512,
                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=IMAGE, vision_feature_layer=-1,
        vision_feature_select_strategy="default"))
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = BOS, EOS, PAD
    gc.max_new_tokens = 32
    return model


def caption_batch(processor, seed: int, step: int, batch: int):
    """input ids / attention mask / labels / pixel values of one training step (right padded)."""
    scenes = train_scenes(seed, step, batch)
    images = [render(s, IMAGE_SIZE) for s in scenes]
    prompt = processor(text=PROMPT, images=images[0], return_tensors="pt")["input_ids"][0].tolist()
    tok = processor.tokenizer
    rows = [prompt + tok.convert_tokens_to_ids(s.caption().split()) + [EOS] for s in scenes]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        labels[b, len(prompt): len(r)] = torch.tensor(r[len(prompt):])
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels)


def pruned_caption_loss(model, batch: dict, keep_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Caption loss of a LLaVA model that sees a random ``keep_ratio`` of the visual tokens, removed from
    its sequence with their original positions kept: how ``mmspec.vision`` prefills a pruned drafter
    (``positions="original"``), so the drafter learns to caption from what pruning leaves it."""
    m = model.model
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, L = ids.shape
    feats = m.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-1,
                                 vision_feature_select_strategy="default").pooler_output
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # [B, N, H]
    emb = m.get_input_embeddings()(ids)  # [B, L, H]
    is_img = ids == IMAGE
    emb = emb.masked_scatter(is_img.unsqueeze(-1).expand_as(emb), feats.to(emb.dtype))
    n_img = int(is_img[0].sum())
    n_keep = max(1, round(keep_ratio * n_img))
    keep = ~is_img
    for b in range(B):  # every row has its image at the same positions (same prompt)
        img_pos = is_img[b].nonzero().flatten()
        keep[b, img_pos[torch.randperm(n_img, generator=generator)[:n_keep]]] = True
    W = int(keep[0].sum())
    pos = torch.arange(L).expand(B, L)[keep].view(B, W)
    out = m.language_model(inputs_embeds=emb[keep].view(B, W, -1), attention_mask=mask[keep].view(B, W),
                           position_ids=pos, use_cache=False)
    logits = model.lm_head(out.last_hidden_state)[:, :-1]
    target = labels[keep].view(B, W)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=-100)


def caption_prompt(processor, images: list[Image.Image]) -> dict:
    """Processor inputs for captioning ``images`` (the prompt the zoo models were trained on)."""
    return processor(text=[PROMPT] * len(images), images=images, return_tensors="pt")


def train_one(stage: str, cfg: VLMZooConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    processor = build_processor()
    model = build_model(getattr(cfg, stage), len(processor.tokenizer), cfg.seed + STAGES.index(stage))
    data_seed = cfg.seed * 31 + STAGES.index(stage)

    def loss_fn(step: int) -> torch.Tensor:
        batch = caption_batch(processor, data_seed, step, cfg.batch)
        g = torch.Generator().manual_seed(step_seed(data_seed, step))
        if stage == "drafter" and float(torch.rand((), generator=g)) < cfg.drafter_pruned_fraction:
            return pruned_caption_loss(model, batch, 0.05 + 0.95 * float(torch.rand((), generator=g)), g)
        return model(**batch, use_cache=False).loss

    res = run_stage(f"vlm_{stage}", model, loss_fn, cfg.budget, run_dir, minutes=minutes, progress=progress)
    if res.finished:  # a stage cut by the time cap resumes later; nothing half-trained is exported
        model.save_pretrained(out / stage, safe_serialization=True)
        processor.save_pretrained(out / stage)
    return res


def main(argv: list[str] | None = None) -> int:
    return training_cli(argv, description=__doc__.split("\n\n")[0], family="vlm", stages=STAGES, presets=PRESETS,
                        out_help="export directory (target/, drafter/)", train=train_one)


if __name__ == "__main__":
    raise SystemExit(main())
