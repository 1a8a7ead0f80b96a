"""Questions and answers about scenes of :mod:`mmspec.zoo.scenes`: what the scene VLM is taught and graded on.

Glossary:
    kind        ``caption`` ("Describe the image." -> "A red circle at the top left."), ``detail``
                (a longer description: count, background, one sentence per object), ``count``, ``colour``
                (of a shape that occurs once), ``shape`` (what is at a cell, or "Nothing."), ``where``
                (the cell of a colour + shape that occurs once)
    answer      one exact string per (scene, question): the grader compares answers verbatim after
                trimming whitespace, so accuracy is exact match

Every answer is derived from the scene alone, so the held-out split of :mod:`mmspec.zoo.data` is a
held-out split of questions too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scenes import CELLS, Scene

KINDS = ("caption", "detail", "count", "colour", "shape", "where")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class SceneQuestion:
    kind: str
    question: str
    answer: str


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def caption_answer(scene: Scene) -> str:
    return _sentence(scene.caption()) if scene.objects else "An empty picture."


def detail_answer(scene: Scene) -> str:
    n = len(scene.objects)
    head = f"The picture shows {NUMBERS[n]} shape{'s' if n != 1 else ''} on a {scene.background} background."
    parts = [f"There is a {o.colour} {o.shape} at the {CELLS[o.cell]}." for o in scene.objects]
    return " ".join([head, *parts])


def _unique(scene: Scene, key) -> list:
    counts: dict = {}
    for o in scene.objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in scene.objects if counts[key(o)] == 1]


def ask(scene: Scene, kind: str, rng: random.Random) -> SceneQuestion:
    """One question of ``kind`` about ``scene`` (the choice inside a kind is drawn from ``rng``).
    ``colour`` and ``where`` fall back to ``count`` when no shape / colour-shape occurs once."""
    if kind not in KINDS:
        raise ValueError(f"question kind must be one of {KINDS}, got {kind!r}")
    if kind == "caption":
        return SceneQuestion(kind, "Describe the image.", caption_answer(scene))
    if kind == "detail":
        return SceneQuestion(kind, "Describe the image in detail.", detail_answer(scene))
    if kind == "shape":
        cell = rng.randrange(len(CELLS))
        found = [o for o in scene.objects if o.cell == cell]
        answer = f"A {found[0].colour} {found[0].shape}." if found else "Nothing."
        return SceneQuestion(kind, f"What is at the {CELLS[cell]}?", answer)
    if kind == "colour":
        options = _unique(scene, lambda o: o.shape)
        if options:
            o = rng.choice(options)
            return SceneQuestion(kind, f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}.")
    if kind == "where":
        options = _unique(scene, lambda o: (o.colour, o.shape))
        if options:
            o = rng.choice(options)
            return SceneQuestion(kind, f"Where is the {o.colour} {o.shape}?", f"At the {CELLS[o.cell]}.")
    n = len(scene.objects)
    return SceneQuestion("count", "How many shapes are there?",
                         f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'' if n == 1 else 's'}.")


def draw_question(scene: Scene, rng: random.Random, weights: dict[str, float] | None = None) -> SceneQuestion:
    """A question of a random kind (``weights`` per kind; default uniform over :data:`KINDS`)."""
    weights = weights or {k: 1.0 for k in KINDS}
    kinds = [k for k in KINDS if weights.get(k, 0) > 0]
    return ask(scene, rng.choices(kinds, [weights[k] for k in kinds])[0], rng)
