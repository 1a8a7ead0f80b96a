"""The two drafters of the scene VLM on SmolLM2, distilled from it on its own answers with pruned visual
contexts: the EAGLE-3 head (fine-tuned from the shipped SmolLM2 head) and a small LLaVA of the same family.

Papers: Li et al., EAGLE-3 (arXiv 2503.01840); SpecVLM (Ji et al., EMNLP 2025) for pruning-aware drafting;
Kim et al., "Sequence-Level Knowledge Distillation" (2016) and Hinton et al. (2015) for the small VLM
(soft cross-entropy against the target's distribution on its own answers).

Glossary:
    data        :func:`mmspec.zoo.vlm_data.scene_examples` over training scenes (one question of every
                kind, 64 visual tokens) plus a few tiled prompts (grid 4: 1088 visual tokens), cached
                in the run dir
    pruned      every example is also used with a random share of its visual rows removed
                (:func:`~mmspec.zoo.vlm_data.prune_example`), original positions kept: what the
                drafters see at inference
    small VLM   ``LlavaForConditionalGeneration``: the target's vision tower (shared, frozen), a projector
                (initialised from the target's), the 2-layer SmolLM2 drafter LM (initialised from the
                shipped one), and the target's token embedding and LM head (shared, frozen); only the
                projector and the decoder layers are stored
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from mmspec import zoo
from mmspec.distill.loop import LoopConfig, step_seed
from mmspec.distill.train_head import HeadTraining, train_head
from mmspec.heads.eagle3 import Eagle3Head
from mmspec.zoo.scene_questions import KINDS
from mmspec.zoo.vlm_data import prune_example, scene_examples

from .data import train_scenes
from .smollm2_llava import _shared, share_embeddings, share_tower
from .training import run_stage, zoo_stage

# ------------------------------------------------------------------------------------------------ data
def build_data(target, processor, run_dir: Path, *, scenes: int, tiled_scenes: int, seed: int,
               progress: bool) -> list[dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, grid, n, kinds in (("single", 1, scenes, KINDS), ("tiled", 4, tiled_scenes, ("caption", "detail"))):
        path = run_dir / f"vlm_data_{name}_{n}.pt"
        if not path.is_file():
            ex = scene_examples(target, processor, train_scenes(seed + grid, 0, n), kinds, grid=grid, seed=seed,
                                progress=progress)
            torch.save(ex, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        out.extend(torch.load(path, weights_only=False))
    return out


def pruned_variants(examples: list[dict], seed: int, copies: int = 2, max_len: int = 400) -> list[dict]:
    """Each example as is (if it fits ``max_len``) and ``copies`` times pruned at a random keep ratio
    (uniform in [0.05, 0.6], lowered until the example fits ``max_len``)."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        if ex["tokens"].shape[0] <= max_len:
            out.append(ex)
        n_vis = int(ex["image_mask"].sum())
        n_text = ex["tokens"].shape[0] - n_vis
        for _ in range(copies):
            ratio = min(rng.uniform(0.05, 0.6), max(max_len - n_text, 1) / max(n_vis, 1))
            out.append(prune_example(ex, ratio, rng))
    return out


# ------------------------------------------------------------------------------------------------ head
def train_vlm_head(target, examples: list[dict], run_dir: Path, out: Path, *, steps: int, seed: int, minutes: float,
                   progress: bool) -> dict:
    """Fine-tune the shipped SmolLM2 head on the VLM's features (pruned contexts, original positions)."""
    init = Eagle3Head.load(Path(zoo.WEIGHTS_DIR) / "smollm2" / "head", target)
    cover_answers(init, examples, target)
    cfg = HeadTraining(batch_size=8, max_len=400, seed=seed,
                       loop=LoopConfig(steps=steps, lr=3e-4, warmup=20, schedule="cosine", betas=(0.9, 0.95),
                                       weight_decay=0.0, clip_norm=1.0, save_every=25))
    # held out by source example (its pruned variants stay out of training too), pruned like the rest
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = [examples[i] for i in order[:16]]
    train = [examples[i] for i in order[16:]]
    summary = train_head(target, pruned_variants(train, seed), run_dir, config=cfg, minutes=minutes,
                         progress=progress, init=init, heldout_examples=pruned_variants(held, seed + 7, copies=1))
    if summary["finished"]:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("head.safetensors", "head_config.json"):
            (out / name).write_bytes((run_dir / name).read_bytes())
    return summary


def cover_answers(head, examples: list[dict], target) -> int:
    """Put every answer token of ``examples`` into the head's FR-Spec draft vocabulary (the chat-trained
    vocabulary misses scene words such as colours), in place of its highest target ids that no answer uses
    (``d2t`` is sorted by target id, not by frequency; in SmolLM2's BPE the late merges are the rarer tokens);
    returns how many were added. The added ids go at the end, so ``d2t`` is no longer sorted: nothing reads
    it as sorted (lookups index it). The head's output rows follow ``d2t`` (borrowed from the target), so
    nothing else changes."""
    d2t = head.d2t.tolist()
    have = set(d2t)
    counts: dict[int, int] = {}
    for ex in examples:
        for t in ex["tokens"][ex["loss_mask"]].tolist():
            counts[t] = counts.get(t, 0) + 1
    missing = sorted((t for t in counts if t not in have), key=lambda t: -counts[t])[: len(d2t) // 4]
    if missing:  # drop the highest ids that no answer uses
        drop = set([t for t in reversed(d2t) if t not in counts][: len(missing)])
        keep = [t for t in d2t if t not in drop]
        head.d2t.copy_(torch.tensor(keep + missing, dtype=torch.long))
        head.attach(target)
    return len(missing)


# ------------------------------------------------------------------------------------------- small VLM
def build_small_vlm(target, text_drafter_folder: Path):
    """The small LLaVA: the target's vision tower and embedding / LM head (shared), a copy of its projector,
    the 2-layer SmolLM2 drafter LM."""
    text = AutoConfig.from_pretrained(text_drafter_folder)
    cfg = LlavaConfig.from_dict({**target.config.to_dict(), "text_config": text.to_dict()})
    model = LlavaForConditionalGeneration(cfg)
    share_embeddings(model, target)
    share_tower(model, target)
    model.model.multi_modal_projector.load_state_dict(target.model.multi_modal_projector.state_dict())
    sd = load_file(str(text_drafter_folder / "drafter.safetensors"))
    lm_sd = {k.removeprefix("model."): v.float() for k, v in sd.items() if k.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(lm_sd, strict=False)
    if unexpected or [m for m in missing if not m.startswith("embed_tokens")]:
        raise ValueError(f"the text drafter does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.generation_config = copy.deepcopy(target.generation_config)
    return model.eval()


def small_vlm_loss(model, examples: list[dict], temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy of the small VLM against the target's distribution on the answer tokens; the
    examples may be pruned (only their kept visual rows are fed, at their original positions)."""
    lm = model.model.language_model
    emb_rows, pos_rows, lengths = [], [], []
    for ex in examples:
        tokens = ex["tokens"]
        emb = lm.embed_tokens(tokens)  # [L, d]
        feats = model.model.get_image_features(pixel_values=ex["pixel_values"].float(), vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output
        feats = torch.cat(list(feats))  # [I * N, d]: per image (a list, or a tensor [I, N, d])
        vis = ex["image_mask"]
        emb = emb.masked_scatter(vis.unsqueeze(-1), feats[ex["visual_index"][vis]].to(emb.dtype))
        emb_rows.append(emb)
        pos_rows.append(ex["positions"])
        lengths.append(tokens.shape[0])
    width = max(lengths)
    d = emb_rows[0].shape[-1]
    embeds = torch.zeros((len(examples), width, d))
    pos = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, (e, p, n) in enumerate(zip(emb_rows, pos_rows, lengths)):
        embeds[b, :n], pos[b, :n], mask[b, :n] = e, p, 1
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    student, teacher = [], []
    for b, ex in enumerate(examples):
        score = ex["loss_mask"][1:]  # row t predicts token t + 1: score rows whose next token is an answer token
        student.append(hidden[b, : lengths[b] - 1][score])
        teacher.append(ex["final"][:-1][score].float())
    logits = model.lm_head(torch.cat(student)).float()
    with torch.no_grad():
        target_p = (model.lm_head(torch.cat(teacher)).float() / temperature).softmax(-1)
    return -(target_p * logits.log_softmax(-1)).sum(-1).mean()


class _Trainable(torch.nn.Module):
    """What the small VLM's training updates (and checkpoints): the LM layers + norm and the projector."""

    def __init__(self, model):
        super().__init__()
        self.layers = model.model.language_model.layers
        self.norm = model.model.language_model.norm
        self.projector = model.model.multi_modal_projector


def train_small_vlm(target, examples: list[dict], run_dir: Path, out: Path, *, steps: int, batch: int, seed: int,
                    minutes: float, progress: bool, text_drafter_folder: Path, processor: Any):
    model = build_small_vlm(target, text_drafter_folder)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = _Trainable(model)
    for p in trainable.parameters():
        p.requires_grad_(True)
    data = pruned_variants(examples, seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        g = random.Random(step_seed(seed, step))
        return small_vlm_loss(model, [data[g.randrange(len(data))] for _ in range(batch)])

    # the zoo's AdamW betas (0.9, 0.98)
    budget = zoo_stage(steps=steps, lr=5e-4, warmup=20, weight_decay=0.0, save_every=50)
    res = run_stage("smollm2_llava_drafter", trainable, loss_fn, budget, run_dir, minutes=minutes, progress=progress)
    if res.finished:
        save_small_vlm(model, out, processor)
    return res


def save_small_vlm(model, out: Path, processor: Any = None) -> None:
    """The small VLM's own weights (float16) and config; the shared tower and embeddings are not stored,
    the processor is the target's."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if not _shared(k)}
    save_file(state, out / "model.safetensors")
    (out / "llava_config.json").write_text(model.config.to_json_string())
