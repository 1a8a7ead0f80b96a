"""The Spec-Bench-style benchmark's prompts: at least 8 per category, deterministic, and held out (the chat,
multi-turn and rewrite prompts come from ShareGPT's dev split only, never from its training or reserved
positions, and quote no training conversation)."""

from __future__ import annotations

from benchmarks._specbench import CATEGORIES, category_prompts
from mmspec.distill import conversations as cv


def test_every_category_has_8_deterministic_held_out_prompts():
    prompts = category_prompts(8, seed=0)
    assert tuple(prompts) == CATEGORIES
    assert all(len(p) == 8 and all(m["content"].strip() for msgs in p for m in msgs) for p in prompts.values())
    assert category_prompts(8, seed=0) == prompts and category_prompts(8, seed=1) != prompts
    dev = {t.text for _, turns in cv.iter_sharegpt("dev") for t in turns}
    others = {t.text for split in ("train", "reserved") for _, turns in cv.iter_sharegpt(split, drop_train_duplicates=False)
              for t in turns if len(t.text) >= cv.DUPLICATE_MIN_CHARS}
    for category in ("chat", "multi-turn"):
        for msgs in prompts[category]:
            assert all(m["content"] in dev for m in msgs) and not any(m["content"] in others for m in msgs)
    for msgs in prompts["rewrite"]:
        quoted = msgs[0]["content"].split("\n\n", 1)[1]
        assert quoted in dev and quoted not in others
    assert all(msgs[-1]["role"] == "user" for p in prompts.values() for msgs in p)
