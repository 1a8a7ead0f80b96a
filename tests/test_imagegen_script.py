"""The image-generation script end to end on tiny models, and its one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmspec.cli import main
from mmspec.image_gen import tiny_vq_tokenizer
from tiny_image_models import tiny_ar, truncated_ar


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgmodels")
    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)  # 8x8 grid
    target = tiny_ar(codebook=16, grid=tok.grid_size[0], dtype=torch.float32)
    text = tiny_ar(codebook=16, grid=tok.grid_size[0], dtype=torch.float32, text=True)
    tok.save_pretrained(root / "tok")
    target.save_pretrained(root / "c2i")
    truncated_ar(target).save_pretrained(root / "c2i_draft")
    from mmspec.image_gen import image_head

    torch.manual_seed(0)
    image_head(target, (0, 1, 2)).save(root / "c2i_head", dtype=torch.float32)  # an (untrained) EAGLE head folder
    text.save_pretrained(root / "t2i")
    return root


@pytest.mark.parametrize("method", ["ar", "exact", "exact-head", "sjd"])
def test_script_writes_images_stats_heatmap(paths, tmp_path, method):
    out = tmp_path / method
    drafter = {"exact": ["--drafter", str(paths / "c2i_draft")], "exact-head": ["--drafter", str(paths / "c2i_head")]}
    drafter = drafter.get(method, [])
    method = method.split("-")[0]
    rc = main(["imagegen", "--model", str(paths / "c2i"), "--tokenizer", str(paths / "tok"), *drafter,
               "--class", "3", "--class", "5", "--num-images", "2",
               "--method", method, "--seed", "1", "--out", str(out)])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("image_*.png"))
    assert pngs == [f"image_{i:03d}.png" for i in range(4)]
    assert Image.open(out / "image_000.png").size == (32, 32)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["method"] == method and stats["conditions"] == [3, 3, 5, 5]
    assert len(stats["accepted_map"]) == 8 and stats["target_forwards"] >= 1
    assert Image.open(out / "acceptance_heatmap.png").size == (8 * 24, 8 * 24)


def test_console_script_text_prompt(paths, tmp_path):
    exe = [sys.executable, "-c", "import sys; from mmspec.cli import imagegen_main; sys.exit(imagegen_main())"]
    r = subprocess.run(exe + ["--model", str(paths / "t2i"), "--tokenizer", str(paths / "tok"),
                              "--prompt", "a red circle", "--out", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t" / "image_000.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--class", "42"], "unknown class id 42"),
    (["--class", "1", "--cfg-scale", "-2"], "cfg_scale must be a number >= 0"),
    ([], "give a condition"),
])
def test_script_bad_input_class_model(paths, tmp_path, capsys, args, message):
    rc = main(["imagegen", "--model", str(paths / "c2i"), "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and message in err and len(err.splitlines()) == 1


def test_script_bad_input_text_model_and_missing_path(paths, tmp_path, capsys):
    assert main(["imagegen", "--model", str(paths / "t2i"), "--prompt", "", "--out", str(tmp_path)]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["imagegen", "--model", str(tmp_path / "missing"), "--class", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no AR image model" in err and len(err.splitlines()) == 1
