"""The Gradio demos on loopback: driven through gradio_client (API) and through headless Chromium (page).

Browser tests need Debian's chromium and the playwright package; they skip without them unless
MMSPEC_REQUIRE_BROWSER=1 (set by .ci/run, which installs both). MMSPEC_WRITE_SCREENSHOTS=1 writes
the screenshots shown in the README to docs/screenshots/.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

from mmspec import zoo
from net_helpers import free_port

gradio = pytest.importorskip("gradio")
HAVE_ZOO = (zoo.WEIGHTS_DIR / zoo.CHECKSUM_FILE).is_file()

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "demos" / "examples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _serve(demo):
    from demos.common import launch

    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    return f"http://127.0.0.1:{port}/"


def _demo_url(module_name: str):
    if not HAVE_ZOO:
        pytest.skip("zoo weights missing")
    import importlib

    mod = importlib.import_module(module_name)
    demo = mod.build_demo(mod.load_session())
    yield _serve(demo)
    demo.close()


@pytest.fixture(scope="module")
def vlm_url():
    yield from _demo_url("demos.vlm_chat")


@pytest.fixture(scope="module")
def image_url():
    yield from _demo_url("demos.image_gen")


DESCRIBE = "Describe the image."


@functools.lru_cache(maxsize=None)
def _answer_of(scene_png: Path, question: str = DESCRIBE) -> str:
    """The scene VLM's own greedy answer about an example (what the demo must show)."""
    import torch
    from PIL import Image

    from mmspec.zoo.smollm2_llava import load_smollm2_llava, vlm_inputs

    target, processor = load_smollm2_llava()
    inputs = vlm_inputs(processor, [Image.open(scene_png).convert("RGB")], question)
    with torch.no_grad():
        ids = target.generate(**inputs, do_sample=False, max_new_tokens=64)
    return processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _true_answer(scene_png: Path, kind: str):
    """A question of ``kind`` about the scene read off the picture by the scene parser, with its right answer."""
    import random

    from PIL import Image

    from mmspec.zoo.scene_questions import ask
    from mmspec.zoo.scenes import parse_image

    return ask(parse_image(Image.open(scene_png).convert("RGB")), kind, random.Random(0))


# ---------------------------------------------------------------- API (gradio_client)


def test_vlm_demo_streams_the_targets_answer(vlm_url):
    from gradio_client import Client, handle_file

    client = Client(vlm_url, verbose=False)
    scene = EXAMPLES / "scene_0.png"
    pieces, md, overlay = client.predict(handle_file(str(scene)), DESCRIBE, "verifier", 0.25, 4, 0.0,
                                         api_name="/answer")
    text = "".join(p["token"] for p in pieces)
    assert text.strip() == _answer_of(scene).strip()
    labels = {p["class_or_confidence"] for p in pieces}
    assert labels <= {"drafted", "target"} and "target" in labels
    assert "identical to plain AR | yes" in md and "speedup over plain AR" in md
    assert "16 of 64" in md  # keep 0.25 of the 64 visual tokens
    assert overlay and Path(overlay).is_file()


def test_vlm_demo_queues_concurrent_requests_without_mixing(vlm_url):
    from gradio_client import Client, handle_file

    client = Client(vlm_url, verbose=False)
    scenes = [EXAMPLES / "scene_1.png", EXAMPLES / "scene_2.png"]
    jobs = [client.submit(handle_file(str(s)), DESCRIBE, "uniform", 0.5, 3, 0.0, api_name="/answer") for s in scenes]
    for job, scene in zip(jobs, scenes):
        pieces, _, _ = job.result(timeout=240)
        assert "".join(p["token"] for p in pieces).strip() == _answer_of(scene).strip()


@pytest.mark.parametrize("kind", ["not_an_image", "long_question", "empty_question"])
def test_vlm_demo_bad_input_gets_a_message(vlm_url, tmp_path, kind):
    from gradio_client import Client, handle_file

    client = Client(vlm_url, verbose=False)
    image, question, expect = EXAMPLES / "scene_0.png", DESCRIBE, ""
    if kind == "not_an_image":
        image = tmp_path / "notes.png"
        image.write_text("this is text, not pixels")
        expect = "not an image"
    elif kind == "long_question":
        question, expect = "Describe " * 50, "limit is 300"
    else:
        question, expect = "   ", "question is empty"
    with pytest.raises(Exception, match=expect):
        client.predict(handle_file(str(image)), question, "verifier", 0.25, 4, 0.0, api_name="/answer")


def test_image_demo_generates_method_and_ar_side_by_side(image_url):
    from gradio_client import Client

    client = Client(image_url, verbose=False)
    images, ar_images, heat, md = client.predict(
        "a red circle at the top left", "lantern", 0, 2, 3.0, 1.0, 16, 8, 0.2, 2.0, 0.3, "EAGLE head",
        api_name="/generate")
    assert len(images) == 2 and len(ar_images) == 2 and Path(heat).is_file()
    assert "target forwards per image" in md and "| 257.0 |" in md  # plain AR: prompt prefill + one per token


@pytest.mark.parametrize("prompt,expect", [("", "prompt is empty"), ("x" * 400, "limit is 300"),
                                           ("a zebra at the top", "unknown word")])
def test_image_demo_bad_prompt_gets_a_message(image_url, prompt, expect):
    from gradio_client import Client

    client = Client(image_url, verbose=False)
    with pytest.raises(Exception, match=expect):
        client.predict(prompt, "ar", 0, 1, 3.0, 1.0, 16, 8, 0.2, 2.0, 0.3, "AR drafter", api_name="/generate")


# ---------------------------------------------------------------- browser (headless Chromium)


def _browser():
    require = os.environ.get("MMSPEC_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if require:
            raise
        pytest.skip("playwright is not installed")
    if CHROMIUM is None:
        if require:
            raise RuntimeError("chromium is not installed (apt-get install -y --no-install-recommends chromium)")
        pytest.skip("chromium is not installed")
    return sync_playwright


def _shot(page, name: str, tmp_path: Path) -> None:
    out = ROOT / "docs" / "screenshots" if os.environ.get("MMSPEC_WRITE_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / name), full_page=True)


@pytest.fixture
def page():
    sync_playwright = _browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 860})
        pg.set_default_timeout(90_000)
        yield pg
        browser.close()


def _oversized_image(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    from demos.common import LIMITS

    side = int((LIMITS.max_upload_mb * 2**20 / 3) ** 0.5) + 64  # an uncompressed BMP just over the limit
    path = tmp_path / "big.bmp"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > LIMITS.max_upload_mb * 2**20
    return path


def test_vlm_demo_refuses_oversized_upload(vlm_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(vlm_url, verbose=False)
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        client.predict(handle_file(str(_oversized_image(tmp_path))), DESCRIBE, "verifier", 0.25, 4, 0.0,
                       api_name="/answer")


def test_browser_vlm_demo(vlm_url, page, tmp_path):
    """Ask the colour of the square in a scene: the page shows the target's answer, and it is right."""
    scene = EXAMPLES / "scene_0.png"
    truth = _true_answer(scene, "colour")
    question = truth.question
    page.goto(vlm_url)
    page.locator("#image input[type=file]").set_input_files(str(scene))
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    page.locator("#stats").get_by_text("speedup over plain AR").wait_for()
    answer = "".join(page.locator("#answer").inner_text().split())  # the page spaces its highlighted pieces
    assert "".join(_answer_of(scene, question).split()) in answer
    assert "".join(truth.answer.split()) in answer
    assert "yes" in page.locator("#stats").inner_text()
    page.locator("#overlay img").wait_for()
    _shot(page, "vlm_chat.png", tmp_path)
    # an oversized upload and a non-image file get visible messages, not a stack trace
    page.locator("#image input[type=file]").set_input_files(str(_oversized_image(tmp_path)))
    page.get_by_text("exceed the maximum allowed size").first.wait_for()
    bad = tmp_path / "notes.png"
    bad.write_text("not pixels")
    page.locator("#image input[type=file]").set_input_files(str(bad))
    page.locator("#ask").click()
    page.get_by_text("not an image").first.wait_for()
    assert "Traceback" not in page.content()


def test_browser_image_demo(image_url, page, tmp_path):
    page.goto(image_url)
    page.locator("#generate").click()
    page.locator("#stats").get_by_text("target forwards per image").wait_for()
    assert page.locator("#images img").count() >= 2 and page.locator("#ar_images img").count() >= 2
    page.locator("#heatmap img").wait_for()
    _shot(page, "image_gen.png", tmp_path)
    page.locator("#prompt textarea").fill("x" * 400)
    page.locator("#generate").click()
    page.get_by_text("limit is 300").first.wait_for()
    assert "Traceback" not in page.content()


# ---------------------------------------------------------------- helpers (no server)


def test_input_limits_name_the_problem(tmp_path):
    from PIL import Image

    from demos.common import InputLimits, check_prompt, kept_overlay, load_image

    small = InputLimits(max_upload_mb=0.01, max_pixels=100 * 100, max_prompt_chars=10)
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    with pytest.raises(gradio.Error, match=r"200x200 pixels; the limit is 10,000"):
        load_image(str(big), small)
    noisy = tmp_path / "noisy.bmp"
    Image.effect_noise((128, 128), 64).convert("RGB").save(noisy)  # ~48 KB uncompressed
    with pytest.raises(gradio.Error, match=r"MB; the limit is 0.01 MB"):
        load_image(str(noisy), small)
    with pytest.raises(gradio.Error, match="upload an image"):
        load_image(None)
    assert load_image(str(big)).mode == "RGB"
    with pytest.raises(gradio.Error, match="11 characters; the limit is 10"):
        check_prompt("x" * 11, small)
    img = Image.new("RGB", (8, 8), (200, 200, 200))
    out = kept_overlay(img, kept=[1], num_tokens=4, scale=2)  # 2x2 token grid over a 16x16 view
    px = out.load()  # px[x, y]; token 1 = row 0, column 1 = top right
    assert px[15, 0] == (200, 200, 200)  # kept
    assert px[0, 0] == px[0, 15] == px[15, 15] == (50, 50, 50)  # pruned: darkened to 25 %
