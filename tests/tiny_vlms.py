"""Tiny random HF VLMs (LLaVA, Qwen2-VL, Qwen2.5-VL) and processor-like inputs, built offline."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mmspec.truncate import truncated_copy

VLM_ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl")
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
IMAGE_TOKEN = 100
QWEN_SPECIAL = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)


def build_vlm(arch: str, *, layers: int = 2, seed: int = 0, init: float = 0.2,
              dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=init)
    if arch == "llava":
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=4, projection_dim=32, initializer_range=init)
        model = LlavaForConditionalGeneration(LlavaConfig(
            vision_config=vc, text_config=LlamaConfig(**text), image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2, vision_feature_select_strategy="default"))
    elif arch == "llava_next":
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32, initializer_range=init)
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=vc, text_config=LlamaConfig(**text), image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default"))
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=1, eos_token_id=2)
        if arch == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                          temporal_patch_size=2, in_channels=3)
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **QWEN_SPECIAL))
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                          fullatt_block_indexes=[1])
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                        **QWEN_SPECIAL))
    else:
        raise ValueError(arch)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    return model.to(dtype).eval()


def truncated_vlm_drafter(target: torch.nn.Module, keep_layers: int = 1) -> torch.nn.Module:
    """Same vision tower and embeddings, fewer decoder layers: a cheaper drafter with partial acceptance."""
    return truncated_copy(target, keep_layers)


def vlm_inputs(arch: str, batch: int = 1, *, seed: int = 0, grid: int = 8, dtype=torch.float64) -> dict:
    """Processor-like inputs: text, one image per row (different images), text after the image.

    Row b is left padded by 2*b tokens when batch > 1."""
    g = torch.Generator().manual_seed(seed)
    rows, extras = [], {}
    if arch == "llava_next":  # any-resolution: image tokens per image depend on its size
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        sizes = [[40, 60], [64, 30], [50, 50]][:batch]
        n_patches = [image_size_to_num_patches(s, NEXT_PINPOINTS, 32) for s in sizes]
        pix = torch.randn(batch, max(n_patches), 3, 32, 32, generator=g, dtype=dtype)
        counts = next_image_token_counts(sizes, n_patches)
        for b in range(batch):
            pre = torch.randint(3, 90, (3,), generator=g).tolist()
            post = torch.randint(3, 90, (5 + b,), generator=g).tolist()
            rows.append([1] + pre + [IMAGE_TOKEN] * counts[b] + post)
        extras["pixel_values"] = pix
        extras["image_sizes"] = torch.tensor(sizes)
    elif arch == "llava":
        n_img = 64
        for b in range(batch):
            pre = torch.randint(3, 90, (3,), generator=g).tolist()
            post = torch.randint(3, 90, (5 + b,), generator=g).tolist()
            rows.append([1] + pre + [IMAGE_TOKEN] * n_img + post)
        extras["pixel_values"] = torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype)
    else:
        merge, patch, tp = 2, 4, 2
        n_img = (grid // merge) ** 2
        for b in range(batch):
            pre = torch.randint(3, 90, (3,), generator=g).tolist()
            post = torch.randint(3, 90, (5 + b,), generator=g).tolist()
            rows.append([1] + pre + [102] + [IMAGE_TOKEN] * n_img + [103] + post)
        extras["pixel_values"] = torch.randn(batch * grid * grid, 3 * tp * patch * patch, generator=g, dtype=dtype)
        extras["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
    width = max(len(r) for r in rows)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    out = dict(input_ids=ids, attention_mask=mask, **extras)
    if arch.startswith("qwen"):
        out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    return out


def tiled_llava_inputs(batch: int, images: int = 3, seed: int = 0) -> dict:
    """LLaVA prompts holding ``images`` images each (a tiled context: base + crops), rows left padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        pre = torch.randint(3, 90, (2 + b,), generator=g).tolist()
        post = torch.randint(3, 90, (4,), generator=g).tolist()
        body = []
        for _ in range(images):
            body += [IMAGE_TOKEN] * 64 + torch.randint(3, 90, (1,), generator=g).tolist()
        rows.append([1] + pre + body + post)
    width = max(len(r) for r in rows)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    pixels = torch.randn(batch * images, 3, 32, 32, generator=g, dtype=torch.float64)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def next_image_token_counts(sizes, n_patches, grid=4):
    """Image tokens LLaVA-NeXT produces per image: base grid + unpadded crop grid + one newline per row."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    counts = []
    for size, _ in zip(sizes, n_patches):
        gh, gw = get_anyres_image_grid_shape(size, NEXT_PINPOINTS, 32)
        t = torch.zeros(1, gh * grid, gw * grid)
        h, w = unpad_image(t, size).shape[1:]
        counts.append(grid * grid + h * (w + 1))
    return counts


def tiny_llava_processor(image_size: int = 32, patch: int = 4):
    """A real LlavaProcessor (word-level tokenizer with <image> at id 100, PIL CLIP image processor)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {f"w{i}": i for i in range(120) if i != IMAGE_TOKEN}
    vocab["<image>"] = IMAGE_TOKEN
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0", bos_token="w1",
                                  eos_token="w2", extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
