"""A LLaVA VLM on the real SmolLM2-135M-Instruct language model: the scene VLM's processor, model,
long-context tiling, loader and grader.

Paper: Liu et al., "Visual Instruction Tuning" (LLaVA, 2023); the tiling follows LLaVA-NeXT ("AnyRes",
Liu et al. 2024: a downscaled base image plus crops of a higher-resolution copy).

Glossary:
    model        HF ``LlavaForConditionalGeneration``: a CLIP vision tower trained from scratch on the
                 scene world (64 px, patch 8 -> 64 visual tokens per image), a two-layer projector and
                 SmolLM2 as the language model, adapted by LoRA (merged when the model is assembled)
    image token  ``<image>`` takes over the id of SmolLM2's unused special token ``<empty_output>`` (16),
                 so the vocabulary, the embeddings and every SmolLM2 drafter stay as they are
    shipped      ``weights/smollm2/vlm``: ``llava_config.json``, the processor files, and a PEFT adapter
                 (LoRA of the language model + the vision tower and projector as saved modules, float16)
    assembled    SmolLM2's weights + the adapter, merged, saved once as a plain HF LLaVA folder under
                 ``$MMSPEC_CACHE/models/``; from then on ``from_pretrained`` of that folder, the path a
                 user's ``llava-hf/...`` checkpoint takes
    tiles        ``tile_image(image, grid)``: the base image at 64 px followed by ``grid x grid`` 64 px crops
                 of the image at ``64 * grid`` px, each its own ``<image>``: 64 * (1 + grid^2) visual tokens
                 (grid 4: 1088), the long visual context pruning is for
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from mmspec import zoo
from mmspec.errors import MMSpecError
from mmspec.heads.eagle3 import Eagle3Head
from mmspec.pretrained import cache_root, load_causal_lm

from .photos import PHOTOS, ask_photo, load_photo, random_crop
from .scene_questions import ask
from .scenes import render, sample_scene

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 16  # SmolLM2's "<empty_output>", never produced by its chat template
TILE = 64
PATCH = 8
VISUAL_TOKENS_PER_IMAGE = (TILE // PATCH) ** 2
SHIPPED = "smollm2/vlm"  # target/, head/, drafter/
NAME = "smollm2-llava-scenes"

# content items of the user turn: {"type": "image"} renders as one <image> placeholder (the processor
# expands it to the visual tokens), {"type": "text", "text": ...} as its text; no default system turn
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TowerShape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4


def build_processor(smollm2_folder: str | os.PathLike):
    """A ``LlavaProcessor``: SmolLM2's tokenizer with ``<image>`` at id 16 and the image chat template,
    and a CLIP image processor at 64 px."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    base = AutoTokenizer.from_pretrained(smollm2_folder)
    spec = json.loads(base.backend_tokenizer.to_str())
    old = base.convert_ids_to_tokens(IMAGE_TOKEN_ID)
    for added in spec["added_tokens"]:
        if added["id"] == IMAGE_TOKEN_ID:
            added["content"] = IMAGE_TOKEN
    vocab = spec["model"]["vocab"]
    vocab[IMAGE_TOKEN] = vocab.pop(old)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  bos_token=base.bos_token, eos_token=base.eos_token, pad_token=base.pad_token,
                                  unk_token=base.unk_token, extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.chat_template = CHAT_TEMPLATE
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID or len(tok) != len(base):
        raise MMSpecError("could not place <image> at SmolLM2's id 16")
    ip = CLIPImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, chat_template=CHAT_TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def vision_config(tower: TowerShape = TowerShape()):
    """The CLIP tower's config: 64 px images, 8 px patches."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=tower.hidden, intermediate_size=4 * tower.hidden,
                            num_hidden_layers=tower.layers, num_attention_heads=tower.heads,
                            image_size=TILE, patch_size=PATCH, projection_dim=tower.hidden)


def llava_config(text_config: Any, tower: TowerShape = TowerShape()):
    from transformers import LlavaConfig

    vc = vision_config(tower)
    text = text_config.to_dict() if hasattr(text_config, "to_dict") else dict(text_config)
    return LlavaConfig(vision_config=vc, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", tie_word_embeddings=True,
                       image_seq_length=VISUAL_TOKENS_PER_IMAGE)


def build_model(language_model: Any, config: Any):
    """A LLaVA whose language model holds ``language_model``'s (a SmolLM2 ``LlamaForCausalLM``) weights;
    the vision tower and projector are freshly initialised."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # SmolLM2 ties its head
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = 1, 2, 2
    return model.eval()


def tile_image(image: Image.Image, grid: int) -> list[Image.Image]:
    """``[base, crop_1, ..., crop_{grid^2}]``: the image at 64 px, then the ``grid x grid`` 64 px crops of
    the image resized to ``64 * grid`` px in raster order (grid 1: only the base)."""
    if not isinstance(grid, int) or grid < 1:
        raise MMSpecError(f"grid must be an integer >= 1, got {grid!r}")
    image = image.convert("RGB")
    tiles = [image.resize((TILE, TILE), Image.BICUBIC)]
    if grid > 1:
        big = image.resize((TILE * grid, TILE * grid), Image.BICUBIC)
        tiles += [big.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE))
                  for r in range(grid) for c in range(grid)]
    return tiles


def user_turn(num_images: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]


def vlm_inputs(processor, images: Sequence[Image.Image], questions: Sequence[str] | str, *, grid: int = 1) -> dict:
    """Left-padded processor inputs asking ``questions[b]`` about ``images[b]`` (each tiled ``grid x grid``
    plus its base image), the assistant turn opened."""
    if isinstance(questions, str):
        questions = [questions] * len(images)
    if len(questions) != len(images):
        raise MMSpecError(f"{len(images)} images but {len(questions)} questions")
    tiles = [tile_image(im, grid) for im in images]
    texts = [processor.apply_chat_template(user_turn(len(t), q), add_generation_prompt=True)
             for t, q in zip(tiles, questions)]
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        return dict(processor(text=texts, images=tiles, padding=True, return_tensors="pt"))
    finally:
        tok.padding_side = side


# -------------------------------------------------------------------------------------------- loading
def shipped_dir(part: str = "target") -> Path:
    return Path(zoo.WEIGHTS_DIR) / SHIPPED / part


def _assembled_dir(adapter: Path) -> Path:
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", "llava_config.json", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja"):
        if (adapter / name).is_file():
            h.update((adapter / name).read_bytes())
    return cache_root() / "models" / f"{NAME}-{h.hexdigest()[:10]}"


def assemble(adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """SmolLM2 + the adapter at ``adapter`` (merged) saved as a plain HF LLaVA folder at ``out``."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaConfig

    adapter, out = Path(adapter), Path(out)
    lm, _ = load_causal_lm("smollm2")
    config = LlavaConfig.from_dict(json.loads((adapter / "llava_config.json").read_text()))
    model = build_model(lm, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    merged.save_pretrained(tmp)
    AutoProcessor.from_pretrained(adapter).save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process assembled it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2_llava(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       attn_implementation: str = "sdpa", verify: bool = True, adapter: str | os.PathLike | None = None):
    """(model, processor) of the shipped scene VLM on SmolLM2 (assembled and cached on first use, ~20 s);
    ``adapter``: another exported target folder (``train_smollm2_llava --stages target``)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if adapter is None and verify:
        zoo.verify_checksums(SHIPPED)
    adapter = shipped_dir() if adapter is None else Path(adapter)
    folder = _assembled_dir(adapter)
    if not (folder / "config.json").is_file():
        assemble(adapter, folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), AutoProcessor.from_pretrained(folder)


# the small VLM drafter shares these with its target (never stored with it)
SHARED = ("model.language_model.embed_tokens.weight", "lm_head.weight")
SHARED_PREFIX = "model.vision_tower."  # the target's tower, frozen while the small VLM trains: shared, never stored


def _shared(key: str) -> bool:
    return key in SHARED or key.startswith(SHARED_PREFIX)


def share_embeddings(model, target) -> None:
    model.model.language_model.embed_tokens = target.model.language_model.embed_tokens
    model.lm_head = target.lm_head


def share_tower(model, target) -> None:
    model.model.vision_tower = target.model.vision_tower


def load_small_vlm(folder: str | Path, target, *, dtype: torch.dtype | None = None):
    """The shipped small LLaVA drafter around ``target``'s vision tower, embedding and LM head."""
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    folder = Path(folder)
    cfg = LlavaConfig.from_dict(json.loads((folder / "llava_config.json").read_text()))
    dtype = dtype or next(target.parameters()).dtype
    if dtype != next(target.parameters()).dtype:
        raise ValueError(f"the small VLM shares the target's modules: load it in the target's dtype "
                         f"{next(target.parameters()).dtype}, not {dtype}")
    model = LlavaForConditionalGeneration(cfg).to(device=next(target.parameters()).device, dtype=dtype)
    share_embeddings(model, target)
    share_tower(model, target)
    sd = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not _shared(m)]
    if missing or unexpected:
        raise ValueError(f"small VLM weights do not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.generation_config = copy.deepcopy(target.generation_config)
    return model.eval()


@dataclass(frozen=True)
class SceneVLM:
    target: Any  # LlavaForConditionalGeneration on SmolLM2
    processor: Any  # LlavaProcessor
    head: Any  # Eagle3Head attached to the target (draft with mmspec.vision.generate(target, head, ...))
    drafter: Any  # the small LlavaForConditionalGeneration (2 decoder layers), sharing the target's embeddings


def load_smollm2_vlm(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     verify: bool = True, folder: str | os.PathLike | None = None) -> SceneVLM:
    """The shipped scene VLM on SmolLM2 with both of its drafters (``folder``: another training output with
    ``target/``, ``head/`` and ``drafter/``)."""

    root = Path(folder) if folder is not None else Path(zoo.WEIGHTS_DIR) / SHIPPED
    if folder is None and verify:
        zoo.verify_checksums(SHIPPED)
    target, processor = load_smollm2_llava(dtype=dtype, device=device, verify=False, adapter=root / "target")
    head = Eagle3Head.load(root / "head", target, dtype=dtype)
    return SceneVLM(target, processor, head, load_small_vlm(root / "drafter", target, dtype=dtype))


# -------------------------------------------------------------------------------------------- grading
@torch.no_grad()
def grade(model, processor, items: Sequence[tuple[Image.Image, str, str, Any]], *, grid: int = 1, batch: int = 8,
          max_new_tokens: int = 64, progress: bool = False, desc: str = "grading") -> dict[str, float]:
    """Share of ``(image, group, question, check)`` items whose greedy HF ``generate`` answer passes
    ``check`` (an exact answer string, or a predicate on the stripped answer), per group."""

    right: dict[str, list[int]] = {}
    for i in tqdm(range(0, len(items), batch), desc=desc, disable=not progress):
        chunk = items[i: i + batch]
        enc = vlm_inputs(processor, [im for im, _, _, _ in chunk], [q for _, _, q, _ in chunk], grid=grid)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (_, group, _, check), text in zip(chunk, texts):
            ok = check(text.strip()) if callable(check) else text.strip() == check
            tally = right.setdefault(group, [0, 0])
            tally[0] += int(ok)
            tally[1] += 1
    return {g: c / n for g, (c, n) in right.items()}


def evaluate(model, processor, scenes, kinds: Sequence[str], *, grid: int = 1, batch: int = 8, seed: int = 0,
             max_new_tokens: int = 64, progress: bool = False) -> dict[str, float]:
    """Exact-match accuracy per question kind of greedy HF ``generate`` on ``scenes`` (one question of each
    kind per scene, drawn with ``seed``)."""

    rng = random.Random(seed)
    items = []
    for s in scenes:
        for k in kinds:  # graded under the kind asked for
            q = ask(s, k, rng)
            items.append((render(s, TILE * grid), k, q.question, q.answer))
    return grade(model, processor, items, grid=grid, batch=batch, max_new_tokens=max_new_tokens, progress=progress)


def evaluate_photos(model, processor, *, crops: int = 4, seed: int = 1, batch: int = 8,
                    progress: bool = False) -> dict[str, float]:
    """Robustness on real photos (:mod:`mmspec.zoo.photos`), ``crops`` random crops of each: ``train_caption`` /
    ``train_not_shapes`` (exact answers on new crops of training photos), ``heldout_caption`` (a held-out
    photo is captioned "A photo of ...") and ``heldout_not_shapes`` (shape questions about it get
    :data:`~mmspec.zoo.photos.NOT_SHAPES`)."""

    rng = random.Random(seed)
    items = []
    for photo in PHOTOS:
        image = load_photo(photo)
        for _ in range(crops):
            crop = random_crop(image, rng, 4 * TILE)
            kind = rng.choice(("caption", "detail"))
            cap = ask_photo(photo, kind)
            shape_kind = rng.choice(("count", "colour", "shape", "where"))
            other = ask_photo(photo, shape_kind, ask(sample_scene(rng), shape_kind, rng).question)
            if photo.split == "train":
                items += [(crop, "train_caption", cap.question, cap.answer),
                          (crop, "train_not_shapes", other.question, other.answer)]
            else:
                items += [(crop, "heldout_caption", cap.question, lambda t: t.startswith("A photo of ")),
                          (crop, "heldout_not_shapes", other.question, other.answer)]
    return grade(model, processor, items, batch=batch, progress=progress, desc="grading photos")
