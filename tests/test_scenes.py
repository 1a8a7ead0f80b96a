"""The procedural scene world: determinism, captions and the image parser (exact on rendered scenes)."""

import random

import pytest
from PIL import Image

from mmspec.zoo.scenes import (BACKGROUNDS, CELLS, COLOURS, SHAPES, Scene, SceneObject, parse_caption, parse_image,
                           render, scenes)


def test_deterministic_given_seed():
    assert scenes(50, seed=3) == scenes(50, seed=3)
    assert scenes(50, seed=3) != scenes(50, seed=4)
    assert render(scenes(1, seed=3)[0]).tobytes() == render(scenes(1, seed=3)[0]).tobytes()


def test_caption_table():
    s = Scene((SceneObject(0, "circle", "red"), SceneObject(8, "square", "blue")))
    assert s.caption() == "a red circle at the top left and a blue square at the bottom right"
    assert parse_caption(s.caption()) == s


@pytest.mark.parametrize("size", [33, 48, 64])
def test_parser_reads_rendered_scenes_exactly(size):
    for s in scenes(200, seed=size):
        assert parse_image(render(s, size)) == s
        assert parse_caption(s.caption(), s.background) == s


def test_every_shape_colour_cell_and_background_round_trips():
    for shape in SHAPES:
        for colour in COLOURS:
            for cell in range(len(CELLS)):
                for bg in BACKGROUNDS:
                    s = Scene((SceneObject(cell, shape, colour),), bg)
                    assert parse_image(render(s, 48)) == s


def test_parser_tolerates_mild_noise():
    rng = random.Random(0)
    s = scenes(1, seed=9)[0]
    img = render(s, 48)
    px = img.load()
    for _ in range(150):  # salt noise on ~7 % of pixels
        x, y = rng.randrange(48), rng.randrange(48)
        px[x, y] = tuple(rng.randrange(256) for _ in range(3))
    assert parse_image(img) == s


@pytest.mark.parametrize("text", ["a pink circle at the top", "a red circle at the middle", "hello",
                                  "a red circle at the top and a blue square at the top"])
def test_bad_captions(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_empty_canvas_parses_to_no_objects():
    assert parse_image(Image.new("RGB", (48, 48), BACKGROUNDS["grey"])) == Scene((), "grey")
