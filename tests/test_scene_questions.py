"""Questions about scenes: exact answers for a table of scenes, every kind answerable, fallbacks, bad kinds."""

import random

import pytest

from mmspec.zoo.scene_questions import KINDS, ask, caption_answer, detail_answer, draw_question
from mmspec.zoo.scenes import Scene, SceneObject, scenes

TWO = Scene((SceneObject(0, "circle", "red"), SceneObject(8, "square", "blue")), "grey")
SAME_SHAPE = Scene((SceneObject(1, "circle", "red"), SceneObject(4, "circle", "red")))


def test_caption_and_detail_table():
    assert caption_answer(TWO) == "A red circle at the top left and a blue square at the bottom right."
    assert detail_answer(TWO) == ("The picture shows two shapes on a grey background. There is a red circle at the "
                                  "top left. There is a blue square at the bottom right.")
    one = Scene((SceneObject(4, "triangle", "green"),))
    assert detail_answer(one).startswith("The picture shows one shape on a white background.")


def test_question_table():
    rng = random.Random(0)
    assert ask(TWO, "count", rng).answer == "There are two shapes."
    assert ask(Scene((SceneObject(3, "square", "yellow"),)), "count", rng).answer == "There is one shape."
    q = ask(TWO, "colour", random.Random(1))
    assert (q.question, q.answer) in {("What colour is the circle?", "The circle is red."),
                                      ("What colour is the square?", "The square is blue.")}
    q = ask(TWO, "where", random.Random(2))
    assert (q.question, q.answer) in {("Where is the red circle?", "At the top left."),
                                      ("Where is the blue square?", "At the bottom right.")}


def test_shape_at_a_cell_answers_nothing_for_an_empty_cell():
    answers = {ask(TWO, "shape", random.Random(s)).question: ask(TWO, "shape", random.Random(s)).answer
               for s in range(60)}
    assert answers["What is at the top left?"] == "A red circle."
    assert answers["What is at the bottom right?"] == "A blue square."
    assert answers["What is at the center?"] == "Nothing."


def test_colour_and_where_fall_back_to_count_without_a_unique_object():
    for kind in ("colour", "where"):
        q = ask(SAME_SHAPE, kind, random.Random(0))
        assert q.kind == "count" and q.answer == "There are two shapes."


def test_every_kind_is_drawn_and_answers_are_deterministic():
    seen = {draw_question(s, random.Random(i)).kind for i, s in enumerate(scenes(300, seed=1))}
    assert seen == set(KINDS)
    a = [ask(s, k, random.Random(3)) for s in scenes(20, seed=2) for k in KINDS]
    b = [ask(s, k, random.Random(3)) for s in scenes(20, seed=2) for k in KINDS]
    assert a == b


def test_unknown_kind_is_a_named_error():
    with pytest.raises(ValueError, match="question kind must be one of"):
        ask(TWO, "size", random.Random(0))
