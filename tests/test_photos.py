"""The real photos the scene VLM is made robust with: every photo loads from an installed package, the
splits are disjoint, answers are exact, crops are seeded, and the training batches mix them in."""

from __future__ import annotations

import random

import pytest

from mmspec.zoo.photos import (NOT_SHAPES, PHOTOS, Photo, PhotoUnavailable, ask_photo, load_photo, photo_answer,
                           photos, random_crop)


def test_every_photo_loads_as_rgb_from_an_installed_package():
    names = [p.name for p in PHOTOS]
    assert len(set(names)) == len(names) and len({p.path for p in PHOTOS}) == len(PHOTOS)
    for p in PHOTOS:
        im = load_photo(p)
        assert im.mode == "RGB" and min(im.size) >= 256, p.name


def test_splits_are_disjoint_and_both_non_empty():
    train, held = photos("train"), photos("heldout")
    assert train and held and not {p.name for p in train} & {p.name for p in held}
    assert len(train) + len(held) == len(PHOTOS)
    with pytest.raises(ValueError, match="split must be"):
        photos("test")


def test_answers_table():
    cat = next(p for p in PHOTOS if p.name == "cat")
    q = ask_photo(cat, "caption")
    assert (q.kind, q.question, q.answer) == ("caption", "Describe the image.", "A photo of a cat.")
    assert ask_photo(cat, "detail").answer == "A photo of a cat."
    q = ask_photo(cat, "colour", "What colour is the square?")
    assert (q.question, q.answer) == ("What colour is the square?", NOT_SHAPES)
    for kind in ("count", "shape", "where"):
        assert photo_answer(cat, kind) == NOT_SHAPES
    with pytest.raises(ValueError, match="question kind"):
        photo_answer(cat, "smell")
    with pytest.raises(ValueError, match="needs its text"):
        ask_photo(cat, "count")


def test_crops_are_seeded_square_and_differ_between_seeds():
    im = load_photo(PHOTOS[0])
    a = random_crop(im, random.Random(3), 64)
    b = random_crop(im, random.Random(3), 64)
    c = random_crop(im, random.Random(4), 64)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_a_photo_from_a_missing_package_is_a_named_error():
    ghost = Photo("ghost", "no_such_package_xyz", "a.jpg", "a ghost", "train")
    with pytest.raises(PhotoUnavailable, match="no_such_package_xyz"):
        load_photo(ghost)
    missing = Photo("gone", "mmspec", "no/such/file.jpg", "nothing", "train")
    with pytest.raises(PhotoUnavailable, match="missing"):
        load_photo(missing)


def test_training_batches_mix_photos_in_only_when_asked():
    from mmspec.pretrained import resolve_model_dir
    from mmspec.zoo.smollm2_llava import build_processor
    from mmspec.zoo.train_smollm2_llava import example_batch

    processor = build_processor(resolve_model_dir("smollm2"))
    tok = processor.tokenizer

    def answers(batch):
        return [tok.decode(row[lab != -100]) for row, lab in zip(batch["input_ids"], batch["labels"])]

    plain = example_batch(processor, 7, 0, 16)
    again = example_batch(processor, 7, 0, 16)
    mixed = example_batch(processor, 7, 0, 16, photo_share=0.5)
    assert all(x == y for x, y in zip(answers(plain), answers(again)))
    assert not any("photo" in a for a in answers(plain))
    n_photo = sum(a.startswith("A photo of") or a.startswith(NOT_SHAPES) for a in answers(mixed))
    assert 3 <= n_photo <= 13
    assert mixed["pixel_values"].shape == plain["pixel_values"].shape
