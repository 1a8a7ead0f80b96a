"""HF checkpoints through from_pretrained + the family's processor, real images (PIL), and the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmspec.vision as mv
from mmspec.cli import main
from tiny_vlms import build_vlm, tiny_llava_processor, truncated_vlm_drafter


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target = build_vlm("llava", dtype=torch.float32)
    drafter = truncated_vlm_drafter(target)
    target.save_pretrained(root / "target")
    drafter.save_pretrained(root / "drafter")
    tiny_llava_processor().save_pretrained(root / "target")
    return root


def images():
    g = np.random.default_rng(0)
    rgb = Image.fromarray((g.random((37, 53, 3)) * 255).astype("uint8"))
    return {"rgb_odd_size": rgb, "grayscale": rgb.convert("L"), "rgba": rgb.convert("RGBA")}


@pytest.mark.parametrize("kind", ["rgb_odd_size", "grayscale", "rgba"])
def test_from_pretrained_processor_pipeline_is_lossless(checkpoints, kind):
    processor = AutoProcessor.from_pretrained(checkpoints / "target")
    target = AutoModelForImageTextToText.from_pretrained(checkpoints / "target").eval()
    drafter = AutoModelForImageTextToText.from_pretrained(checkpoints / "drafter").eval()
    image = images()[kind].convert("RGB")
    inputs = processor(images=image, text="w5 w6 <image> w7 w8 w9", return_tensors="pt")
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=8)
    out = mv.generate(target, drafter, inputs, pruning="verifier", keep_ratio=0.25, max_new_tokens=8)
    assert torch.equal(out.sequences, expected)
    assert out.stats.extra["drafter_visual_tokens"] == [16]


def test_cli_vlm(checkpoints, tmp_path, capsys):
    path = tmp_path / "img.png"
    images()["rgba"].save(path)
    rc = main(["vlm", "--target", str(checkpoints / "target"), "--drafter", str(checkpoints / "drafter"),
               "--image", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "6", "--check"])
    assert rc == 0
    assert "identical to target.generate: True" in capsys.readouterr().out


def test_cli_vlm_unreadable_image(checkpoints, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["vlm", "--target", str(checkpoints / "target"), "--image", str(bad), "--prompt", "w5"])
    with pytest.raises(SystemExit, match="image file not found"):
        main(["vlm", "--target", str(checkpoints / "target"), "--image", str(tmp_path / "nope.png"), "--prompt", "w5"])
