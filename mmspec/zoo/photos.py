"""Real photographs for the scene VLM's robustness: what it is taught to say about pictures that are not
rendered scenes, and how that is graded.

Glossary:
    photo        one real photograph shipped inside a package mmspec already installs (gradio's media
                 assets, scikit-image's and scikit-learn's sample data, matplotlib's sample data), with a
                 short hand-written label ("a cheetah")
    split        ``train`` photos are seen in training (as random crops); ``heldout`` photos never are
    crop         a random square crop of 45-100 % of the short side, mirrored half the time: training
                 and grading draw different crops (different seeds)
    answers      "Describe the image." (and the detailed variant) -> "A photo of <label>."; any question
                 about shapes (count, colour, shape at a cell, where) -> :data:`NOT_SHAPES`, so the model
                 does not invent shapes in a photograph
    grading      train-photo crops: exact match; held-out photos: the caption starts with "A photo of"
                 and shape questions get :data:`NOT_SHAPES` exactly

No photo is downloaded: a photo whose package is missing raises :class:`PhotoUnavailable`.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from .scene_questions import KINDS, SceneQuestion

NOT_SHAPES = "This is a photo, not a picture of shapes."
CAPTION_QUESTIONS = {"caption": "Describe the image.", "detail": "Describe the image in detail."}


class PhotoUnavailable(RuntimeError):
    """The package that ships a photo is not installed."""


@dataclass(frozen=True)
class Photo:
    name: str
    package: str  # the installed package whose folder holds the file
    path: str  # inside that package's folder
    label: str
    split: str  # "train" | "heldout"


PHOTOS: tuple[Photo, ...] = (
    Photo("cheetah", "gradio", "media_assets/images/cheetah1.jpg", "a cheetah", "train"),
    Photo("lion", "gradio", "media_assets/images/lion.jpg", "a lion", "train"),
    Photo("eiffel_tower", "gradio", "media_assets/images/tower.jpg", "the Eiffel Tower", "train"),
    Photo("tree_face", "gradio", "media_assets/images/groot.jpeg", "a face carved in wood", "train"),
    Photo("flower", "sklearn", "datasets/images/flower.jpg", "an orange flower", "train"),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "a woman in uniform", "train"),
    Photo("astronaut", "skimage", "data/astronaut.png", "an astronaut", "train"),
    Photo("cat", "skimage", "data/chelsea.png", "a cat", "train"),
    Photo("coffee", "skimage", "data/coffee.png", "a cup of coffee", "train"),
    Photo("galaxies", "skimage", "data/hubble_deep_field.jpg", "stars and galaxies", "train"),
    Photo("retina", "skimage", "data/retina.jpg", "the back of an eye", "train"),
    Photo("cells", "skimage", "data/ihc.png", "cells under a microscope", "train"),
    Photo("running_cheetah", "gradio", "media_assets/images/cheetah.jpg", "a running cheetah", "heldout"),
    Photo("pagoda", "sklearn", "datasets/images/china.jpg", "a pagoda", "heldout"),
    Photo("rocket", "skimage", "data/rocket.jpg", "a rocket at night", "heldout"),
)


def photos(split: str) -> tuple[Photo, ...]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return tuple(p for p in PHOTOS if p.split == split)


def photo_file(photo: Photo) -> Path:
    spec = importlib.util.find_spec(photo.package)
    if spec is None or not spec.submodule_search_locations:
        raise PhotoUnavailable(f"photo {photo.name!r} ships with the package {photo.package!r}, which is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / photo.path
    if not path.is_file():
        raise PhotoUnavailable(f"photo {photo.name!r}: {path} is missing from the installed {photo.package!r}")
    return path


def load_photo(photo: Photo) -> Image.Image:
    with Image.open(photo_file(photo)) as im:
        return im.convert("RGB")


def random_crop(image: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """A square crop of 45-100 % of the short side at a random place, mirrored half the time, resized to
    ``size``."""
    w, h = image.size
    side = int(min(w, h) * rng.uniform(0.45, 1.0))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def photo_answer(photo: Photo, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"question kind must be one of {KINDS}, got {kind!r}")
    return f"A photo of {photo.label}." if kind in CAPTION_QUESTIONS else NOT_SHAPES


def ask_photo(photo: Photo, kind: str, question: str | None = None) -> SceneQuestion:
    """The question of ``kind`` (a caption question, or ``question``: any question about shapes, e.g. one
    drawn for a scene by :func:`mmspec.zoo.scene_questions.ask`) and its exact answer about ``photo``."""
    text = CAPTION_QUESTIONS.get(kind, question)
    if text is None:
        raise ValueError(f"a {kind!r} question about a photo needs its text (ask() draws one for a scene)")
    return SceneQuestion(kind, text, photo_answer(photo, kind))
