"""Train the scene VLM on SmolLM2 (:mod:`mmspec.zoo.smollm2_llava`): a CLIP vision tower and projector from
scratch plus a LoRA of the frozen SmolLM2-135M-Instruct, on questions about rendered scenes.

Paper: Liu et al., "Visual Instruction Tuning" (LLaVA, 2023); Hu et al., "LoRA" (2021), through PEFT.

Glossary:
    example     one user turn ``<image>`` + a question of :mod:`mmspec.zoo.scene_questions` (captions weighted
                twice) and the assistant's exact answer; the loss covers the answer and ``<|im_end|>``
    photos      stage ``photos`` continues the target on scenes mixed with crops of real photos
                (:mod:`mmspec.zoo.photos`, 40 % of the rows) for robustness; ``quality.json`` then also
                holds the photo scores
    trainable   the vision tower and projector (PEFT ``modules_to_save``) and rank-8 LoRA on every
                attention and MLP projection of the language model; SmolLM2's own weights stay frozen
    export      the PEFT adapter in float16 + ``llava_config.json`` + the processor, under ``--out``;
                :func:`mmspec.zoo.smollm2_llava.load_smollm2_llava` merges it into SmolLM2 on first load
    grading     after the last stage that changes the target (``photos``; ``target`` when photos are off):
                exact-match accuracy of greedy answers on held-out scenes per question kind, and the photo
                scores, written to ``--out/target/quality.json``
    drafters    stages ``data``, ``head`` and ``drafter`` (:mod:`mmspec.zoo.smollm2_llava_drafters`) distil the
                EAGLE-3 head and the small LLaVA from the exported target into ``--out/head``, ``--out/drafter``
    loop        every stage trains through the one loop (:func:`mmspec.zoo.training.run_stage`) with the zoo's
                settings (:func:`~mmspec.zoo.training.zoo_stage`: AdamW betas (0.9, 0.98)), except ``head``,
                which fine-tunes through :func:`mmspec.distill.train_head.train_head` with its own loop settings
                (AdamW betas (0.9, 0.95))

Usage::

    python -m mmspec.zoo.train_smollm2_llava --out mmspec/zoo/weights/smollm2/vlm --stages tower,target,photos  # ~60 min
    python -m mmspec.zoo.train_smollm2_llava --out mmspec/zoo/weights/smollm2/vlm --stages data,head,drafter  # ~21 min
    python -m mmspec.zoo.train_smollm2_llava --out /tmp/v --preset smoke
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionModel

from mmspec import zoo
from mmspec.distill.loop import LoopConfig, LoopResult, step_seed
from mmspec.pretrained import load_causal_lm, resolve_model_dir
from mmspec.zoo.photos import ask_photo, load_photo, photos, random_crop
from mmspec.zoo.scene_questions import KINDS, draw_question
from mmspec.zoo.scenes import BACKGROUNDS, CELLS, COLOURS, SHAPES, render

from . import smollm2_llava_drafters as drafters
from .data import heldout_scenes, train_scenes
from .smollm2_llava import (PATCH, TILE, TowerShape, build_model, build_processor, evaluate, evaluate_photos,
                            llava_config, load_smollm2_llava, tile_image, user_turn, vision_config)
from .training import run_stage, training_cli, zoo_stage

STAGES = ("tower", "target", "photos", "data", "head", "drafter")
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
QUESTION_WEIGHTS = {"caption": 2.0, "detail": 1.0, "count": 1.0, "colour": 1.0, "shape": 1.0, "where": 1.0}


@dataclass(frozen=True)
class SmolVLMConfig:
    tower: TowerShape = TowerShape()
    lora_rank: int = 8
    lora_alpha: int = 16
    budget: LoopConfig = zoo_stage(steps=300, lr=6e-4, warmup=30, weight_decay=0.0, save_every=50)
    batch: int = 8
    # the vision tower is first taught to read scenes patch by patch (cheap: the tower alone)
    tower_budget: LoopConfig = zoo_stage(steps=500, lr=2e-3, warmup=30, weight_decay=0.01, save_every=100)
    tower_batch: int = 64
    seed: int = 7
    grade_scenes: int = 48
    # robustness: the target then continues on scenes mixed with crops of real photos (mmspec.zoo.photos)
    photo_budget: LoopConfig = zoo_stage(steps=150, lr=4e-4, warmup=10, weight_decay=0.0, save_every=25)
    photo_share: float = 0.4
    grade_photo_crops: int = 4
    # drafters: self-distillation data (one question of each kind per scene; tiled prompts: caption + detail)
    data_scenes: int = 64
    tiled_scenes: int = 8
    head_steps: int = 150
    drafter_steps: int = 250
    drafter_batch: int = 8


_SMOKE = zoo_stage(steps=2, lr=1e-3, warmup=1, weight_decay=0.0, save_every=1)
PRESETS = {
    "full": SmolVLMConfig(),
    "smoke": SmolVLMConfig(budget=_SMOKE, batch=2, grade_scenes=1, tower_budget=_SMOKE, tower_batch=4,
                           photo_budget=_SMOKE, grade_photo_crops=1,
                           data_scenes=3, tiled_scenes=1, head_steps=2, drafter_steps=2, drafter_batch=2),
}


class PatchReader(torch.nn.Module):
    """The tower's pretraining task: every patch token names the colour and shape of the object in its grid
    cell (or "none"), the background and its cell: linear heads on the tower's last hidden states (what
    LLaVA feeds its projector). The heads also initialise the projector (:func:`projector_from_reader`)."""

    HEADS = ("colour", "shape", "background", "cell")

    def __init__(self, tower, hidden: int):
        super().__init__()
        self.tower = tower
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))
        self.cell = torch.nn.Linear(hidden, len(CELLS))

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]  # [B, P, h]

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 64, 64]; labels long [B, P, 4] (colour, shape, background, cell per patch)."""
        patches = self.patches(pixels)
        ce = torch.nn.functional.cross_entropy
        return sum(ce(getattr(self, h)(patches).flatten(0, 1), labels[..., i].flatten())
                   for i, h in enumerate(self.HEADS))


def projector_from_reader(llava, reader: PatchReader, tokenizer, pixels: torch.Tensor) -> None:
    """Start the projector where its outputs are already words: the first layer's first units are the
    reader's heads (a patch's colour / shape / background / cell logits), the second layer maps each unit
    to SmolLM2's embedding of its word (" red", " circle", " grey", " top left"; "none" to nothing), scaled
    by the unit's typical winning logit; every other unit starts at zero. A patch token then reads like
    "red circle top left" to the frozen language model, which LoRA only has to learn to read out."""
    proj = llava.model.multi_modal_projector
    embed = llava.model.language_model.embed_tokens.weight
    words = {"colour": [None] + sorted(COLOURS), "shape": [None] + list(SHAPES),
             "background": sorted(BACKGROUNDS), "cell": list(CELLS)}
    with torch.no_grad():
        patches = reader.patches(pixels)
        w1, b1 = proj.linear_1.weight, proj.linear_1.bias
        w2, b2 = proj.linear_2.weight, proj.linear_2.bias
        w1.zero_(), b1.zero_(), w2.zero_(), b2.zero_()
        unit = 0
        for head_name in PatchReader.HEADS:
            head = getattr(reader, head_name)
            n = head.out_features
            w1[unit: unit + n] = head.weight
            b1[unit: unit + n] = head.bias
            scale = head(patches).amax(dim=-1).mean().clamp_min(1.0)  # a winning logit, typically
            for j, word in enumerate(words[head_name]):
                if word is None:
                    continue
                ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
                w2[:, unit + j] = embed[ids].mean(dim=0) / scale
            unit += n


def patch_labels(scene) -> torch.Tensor:
    """long [P, 4]: per patch (raster order), the colour / shape index of the object in the cell holding the
    patch centre (0 = none), the background index and that cell."""
    side = TILE // PATCH
    by_cell = {o.cell: o for o in scene.objects}
    colours, shapes, bgs = sorted(COLOURS), list(SHAPES), sorted(BACKGROUNDS)
    rows = []
    for r in range(side):
        for c in range(side):
            y, x = (r + 0.5) * PATCH, (c + 0.5) * PATCH
            cell = int(y * 3 // TILE) * 3 + int(x * 3 // TILE)
            o = by_cell.get(cell)
            rows.append([colours.index(o.colour) + 1 if o else 0, shapes.index(o.shape) + 1 if o else 0,
                         bgs.index(scene.background), cell])
    return torch.tensor(rows, dtype=torch.long)


def train_tower(cfg: SmolVLMConfig, run_dir: Path, progress: bool, minutes: float):
    """Pretrain the CLIP tower on patch reading; saves ``run_dir/tower.pt`` (tower + heads) when finished."""
    processor = build_processor(resolve_model_dir("smollm2"))
    torch.manual_seed(cfg.seed)
    reader = PatchReader(CLIPVisionModel(vision_config(cfg.tower)), cfg.tower.hidden)

    def loss_fn(step: int) -> torch.Tensor:
        scenes = train_scenes(cfg.seed + 500, step, cfg.tower_batch)
        pixels = processor.image_processor([render(s, TILE) for s in scenes], return_tensors="pt")["pixel_values"]
        return reader.loss(pixels, torch.stack([patch_labels(s) for s in scenes]))

    res = run_stage("smollm2_llava_tower", reader, loss_fn, cfg.tower_budget, run_dir, minutes=minutes,
                    progress=progress)
    if res.finished:
        torch.save(reader.state_dict(), run_dir / "tower.pt")
    return res


def build_trainable(cfg: SmolVLMConfig, reader_state: dict | None = None):
    """(PEFT model, processor): SmolLM2 inside a fresh LLaVA (its vision tower and projector from the
    pretrained :class:`PatchReader` state when given), LoRA on its language model."""
    from peft import LoraConfig, get_peft_model  # seconds to import: only the stages that train need it

    lm, _ = load_causal_lm("smollm2")
    processor = build_processor(resolve_model_dir("smollm2"))
    torch.manual_seed(cfg.seed)
    model = build_model(lm, llava_config(lm.config, cfg.tower))
    if reader_state is not None:
        reader = PatchReader(model.model.vision_tower, cfg.tower.hidden)
        reader.load_state_dict(reader_state)
        scenes = train_scenes(cfg.seed + 501, 0, 32)
        pixels = processor.image_processor([render(s, TILE) for s in scenes], return_tensors="pt")["pixel_values"]
        projector_from_reader(model, reader, processor.tokenizer, pixels)
    peft_cfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          modules_to_save=["vision_tower", "multi_modal_projector"])
    return get_peft_model(model, peft_cfg), processor


@lru_cache(maxsize=1)
def _train_photos() -> tuple:
    return tuple((p, load_photo(p)) for p in photos("train"))


def example_batch(processor, seed: int, step: int, batch: int, photo_share: float = 0.0) -> dict:
    """input ids / attention mask / labels / pixel values of one step (right padded), a pure function of
    (seed, step).  With ``photo_share`` > 0 that share of the rows asks about a crop of a real photo instead."""
    tok = processor.tokenizer
    rng = random.Random(step_seed(seed, step))
    rows, starts, pixels = [], [], []
    for scene in train_scenes(seed, step, batch):
        q = draw_question(scene, rng, QUESTION_WEIGHTS)
        if photo_share > 0 and rng.random() < photo_share:
            photo, full = rng.choice(_train_photos())
            q = ask_photo(photo, q.kind, q.question)
            big = random_crop(full, rng, 4 * TILE)
        else:
            big = None
        prompt = processor.apply_chat_template(user_turn(1, q.question), add_generation_prompt=True)
        # half the images are rendered large and downscaled the way tile_image makes a base image (as the
        # tiled prompts and uploaded pictures are), half rendered at 64 px directly
        if rng.random() < 0.5:
            image = tile_image(render(scene, 4 * TILE) if big is None else big, 1)[0]
        else:
            image = render(scene, TILE) if big is None else big.resize((TILE, TILE), Image.BICUBIC)
        enc = processor(text=prompt, images=[image], return_tensors="pt")
        answer = tok(q.answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = enc["input_ids"][0].tolist()
        rows.append(ids + answer)
        starts.append(len(ids))
        pixels.append(enc["pixel_values"])
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (r, s) in enumerate(zip(rows, starts)):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        labels[b, s: len(r)] = torch.tensor(r[s:])
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=torch.cat(pixels))


def answer_loss(llava, batch: dict) -> torch.Tensor:
    """Cross-entropy of the answer tokens, the LM head applied to those positions only."""
    hidden = llava.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], use_cache=False).last_hidden_state
    target = batch["labels"][:, 1:]
    scored = target != -100
    logits = llava.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits.float(), target[scored])


def export(peft_model, processor, out: Path) -> None:
    from peft import get_peft_model_state_dict  # seconds to import: only the stages that train need it

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, out / "adapter_model.safetensors")
    peft_model.peft_config["default"].save_pretrained(out)
    llava = peft_model.base_model.model
    (out / "llava_config.json").write_text(llava.config.to_json_string())
    processor.save_pretrained(out)


def train_one(stage: str, cfg: SmolVLMConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    if stage == "tower":
        return train_tower(cfg, run_dir, progress, minutes)
    if stage == "photos":
        return train_photos(cfg, out, run_dir, progress, minutes)
    if stage != "target":
        return train_drafter_stage(stage, cfg, out, run_dir, progress, minutes)
    tower = run_dir / "tower.pt"
    if not tower.is_file():
        raise FileNotFoundError(f"the target stage starts from the pretrained tower {tower}: run --stages tower")
    model, processor = build_trainable(cfg, torch.load(tower, weights_only=True))
    llava = model.base_model.model

    def loss_fn(step: int) -> torch.Tensor:
        return answer_loss(llava, example_batch(processor, cfg.seed, step, cfg.batch))

    res = run_stage("smollm2_llava", model, loss_fn, cfg.budget, run_dir, minutes=minutes, progress=progress)
    if res.finished:  # a stage cut by the time cap resumes later; nothing half-trained is exported
        if cfg.photo_budget.steps > 0:  # the photos stage continues this state and grades the final model
            export(model, processor, out / "target")
        else:
            export_and_grade(model, processor, cfg, out, progress, photos=False)
    return res


def export_and_grade(model, processor, cfg: SmolVLMConfig, out: Path, progress: bool, *, photos: bool) -> None:
    """Export the adapter to ``out/target`` and write ``quality.json``: held-out scene exact match per
    question kind, and (after the photos stage) the real-photo scores of
    :func:`~mmspec.zoo.smollm2_llava.evaluate_photos`."""
    export(model, processor, out / "target")
    llava = model.base_model.model
    model.eval()
    report = {"heldout_scenes": cfg.grade_scenes, "grid": 1,
              "exact_match": evaluate(llava, processor, heldout_scenes(cfg.grade_scenes), KINDS, progress=progress)}
    if photos:
        report["photo_crops"] = cfg.grade_photo_crops
        report["photos"] = evaluate_photos(llava, processor, crops=cfg.grade_photo_crops, progress=progress)
    (out / "target" / "quality.json").write_text(json.dumps(report, indent=2) + "\n")


def train_photos(cfg: SmolVLMConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    """Continue the target stage's final state on scenes mixed with crops of real training photos
    (``photo_share`` of the rows), so that a photograph is described as one and no shapes are invented in
    it; the scene questions keep their share, so scene accuracy is kept."""
    start = run_dir / "smollm2_llava.ckpt.pt"
    own = run_dir / "smollm2_llava_photos.ckpt.pt"
    if not own.is_file() and not start.is_file():
        raise FileNotFoundError(f"the photos stage continues the target stage's state {start}: run --stages target")
    model, processor = build_trainable(cfg)
    if not own.is_file():  # else run_stage resumes this stage's own checkpoint
        model.load_state_dict(torch.load(start, map_location="cpu", weights_only=False)["model"])
    llava = model.base_model.model

    def loss_fn(step: int) -> torch.Tensor:
        return answer_loss(llava, example_batch(processor, cfg.seed + 1, step, cfg.batch, cfg.photo_share))

    res = run_stage("smollm2_llava_photos", model, loss_fn, cfg.photo_budget, run_dir, minutes=minutes,
                    progress=progress)
    if res.finished:
        export_and_grade(model, processor, cfg, out, progress, photos=True)
    return res


def train_drafter_stage(stage: str, cfg: SmolVLMConfig, out: Path, run_dir: Path, progress: bool, minutes: float):
    """``data`` (the target's answers + features, cached in the run dir), ``head`` or ``drafter``."""
    if not (out / "target" / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"stage {stage!r} needs the trained target at {out / 'target'}: run --stages target")
    t0 = time.perf_counter()
    target, processor = load_smollm2_llava(adapter=out / "target", verify=False)
    for p in target.parameters():
        p.requires_grad_(False)
    # the drafters' data and checkpoints live under the target adapter's digest: a retrained target starts
    # them afresh instead of resuming another target's
    digest = hashlib.sha256((out / "target" / "adapter_model.safetensors").read_bytes()).hexdigest()[:10]
    run_dir = run_dir / f"from_target_{digest}"
    examples = drafters.build_data(target, processor, run_dir, scenes=cfg.data_scenes, tiled_scenes=cfg.tiled_scenes,
                                   seed=cfg.seed + 1000, progress=progress)
    if stage == "data":
        return LoopResult("smollm2_llava_data", len(examples), True, None, time.perf_counter() - t0)
    if stage == "head":
        summary = drafters.train_vlm_head(target, examples, run_dir / "head", out / "head", steps=cfg.head_steps,
                                          seed=cfg.seed, minutes=minutes, progress=progress)
        (out / "head" / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        return LoopResult("smollm2_llava_head", summary["steps"], summary["finished"], summary["train_loss_ema"],
                           time.perf_counter() - t0)
    return drafters.train_small_vlm(target, examples, run_dir, out / "drafter", steps=cfg.drafter_steps,
                                    batch=cfg.drafter_batch, seed=cfg.seed, minutes=minutes, progress=progress,
                                    text_drafter_folder=Path(zoo.WEIGHTS_DIR) / "smollm2" / "drafter",
                                    processor=processor)


def main(argv: list[str] | None = None) -> int:
    return training_cli(argv, description=__doc__.split("\n\n")[0], family="smollm2_vlm", stages=STAGES,
                        presets=PRESETS, out_help="export directory (adapter, llava_config.json, processor)",
                        train=train_one)


if __name__ == "__main__":
    raise SystemExit(main())
