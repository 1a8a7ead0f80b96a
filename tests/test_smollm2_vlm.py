"""The shipped scene VLM on the real SmolLM2 (LLaVA: a CLIP tower trained on scenes + SmolLM2 with a merged
LoRA) and its two drafters: processor facts, held-out quality, and greedy output token-identical to HF
``generate`` for both drafter kinds, every pruning strategy, batch 1 and 2, one image and the tiled
1088-visual-token context."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import mmspec.vision as mv
from mmspec import zoo
from mmspec.errors import MMSpecError
from mmspec.zoo.scene_questions import KINDS
from mmspec.zoo.scenes import render
from mmspec.zoo.data import heldout_scenes
from mmspec.zoo.smollm2_llava import (IMAGE_TOKEN_ID, TILE, evaluate, evaluate_photos, load_smollm2_vlm,
                                      shipped_dir, tile_image, vlm_inputs)


@pytest.fixture(scope="module")
def vlm(real_model_threads):
    return load_smollm2_vlm()


def test_processor_places_the_image_token_inside_smollm2s_vocabulary(vlm):
    tok = vlm.processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID and len(tok) == 49152
    assert vlm.target.config.get_text_config().vocab_size == 49152
    img = render(heldout_scenes()[0], TILE * 4)
    short = vlm_inputs(vlm.processor, [img], "Describe the image.")
    long = vlm_inputs(vlm.processor, [img], "Describe the image.", grid=4)
    assert int((short["input_ids"] == IMAGE_TOKEN_ID).sum()) == 64
    assert int((long["input_ids"] == IMAGE_TOKEN_ID).sum()) == 64 * 17 and long["pixel_values"].shape[0] == 17
    text = vlm.processor.tokenizer.decode(short["input_ids"][0][short["input_ids"][0] != IMAGE_TOKEN_ID])
    assert text == "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"


def test_tiles_and_bad_grid():
    tiles = tile_image(Image.new("RGB", (100, 80), "red"), 2)
    assert len(tiles) == 5 and all(t.size == (TILE, TILE) for t in tiles)
    with pytest.raises(MMSpecError, match="grid must be an integer >= 1"):
        tile_image(Image.new("RGB", (8, 8)), 0)


@pytest.mark.extended  # 48 scenes of greedy captions
def test_heldout_quality_matches_the_recorded_numbers(vlm):
    recorded = json.loads((shipped_dir() / "quality.json").read_text())["exact_match"]
    got = evaluate(vlm.target, vlm.processor, heldout_scenes(8), KINDS)  # 8 scenes x 6 questions (CI's budget)
    for kind in KINDS:
        assert got[kind] >= recorded[kind] - 0.3, (kind, got[kind], recorded[kind])
    mean = sum(got.values()) / len(got)
    assert mean >= sum(recorded.values()) / len(recorded) - 0.15, (got, recorded)


STRATEGIES = ("verifier", "cls", "diversity", "uniform", "none")
RATIOS = (0.0, 0.1, 0.25, 0.5, 1.0)
PAIRED = tuple(zip(STRATEGIES, (0.5, 0.1, 0.25, 0.0, 1.0)))  # every strategy once, every keep ratio once
# the extended grid: every strategy x keep ratio on one image (batch 1 and 2), one case per strategy so that xdist
# workers share it; the tiled context (1,088 visual tokens, 4x the cost a generate) takes every strategy at the
# keep ratio that prunes the most while keeping some tokens, plus every ratio once across batch 2
CASES = [pytest.param(1, 1, PAIRED, id="short-b1"),
         pytest.param(4, 1, (*((s, 0.1) for s in STRATEGIES[:-1]), ("none", 1.0)), id="tiled-b1",
                      marks=pytest.mark.extended),
         *(pytest.param(grid, batch, tuple((s, r) for r in RATIOS), id=f"{name}-grid-{s}", marks=pytest.mark.extended)
           for grid, batch, name in ((1, 1, "short-b1"), (1, 2, "short-b2")) for s in STRATEGIES),
         pytest.param(4, 2, PAIRED[:3], id="tiled-b2-a", marks=pytest.mark.extended),
         pytest.param(4, 2, PAIRED[3:], id="tiled-b2-b", marks=pytest.mark.extended)]


@pytest.mark.parametrize("grid,batch,settings", CASES)
def test_greedy_is_token_identical_to_hf_generate_for_both_drafters(vlm, grid, batch, settings):
    scenes = heldout_scenes()[10: 10 + batch]
    inputs = vlm_inputs(vlm.processor, [render(s, TILE * grid) for s in scenes],
                        ["Describe the image in detail.", "How many shapes are there?"][:batch], grid=grid)
    new = 24 if grid == 1 else 12
    expected = vlm.target.generate(**inputs, do_sample=False, max_new_tokens=new)
    for drafter in (vlm.head, vlm.drafter):
        for strategy, ratio in settings:
            out = mv.generate(vlm.target, drafter, inputs, pruning=strategy, keep_ratio=ratio, max_new_tokens=new,
                              num_draft_tokens=4)
            assert torch.equal(out.sequences, expected), (type(drafter).__name__, strategy, ratio)


@pytest.mark.extended  # photo captions (default: tests/test_photos.py checks the photo set)
def test_real_photos_are_described_as_photos(vlm):
    """The robustness stage: a held-out photo is captioned as a photo and no shapes are invented in it;
    new crops of training photos get their exact answers (CI's budget: one new crop of each photo)."""
    recorded = json.loads((shipped_dir() / "quality.json").read_text())["photos"]
    got = evaluate_photos(vlm.target, vlm.processor, crops=1, seed=5)
    for group, value in recorded.items():
        assert got[group] >= value - 0.35, (group, got[group], value)
    assert got["heldout_not_shapes"] >= 0.6 and got["heldout_caption"] >= 0.6, got


def test_the_shipped_files_are_checked(vlm):
    zoo.verify_checksums("smollm2/vlm")
