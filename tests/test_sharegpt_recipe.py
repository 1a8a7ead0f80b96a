"""The ShareGPT recipe's data-scaling stage: one head per size on one schedule, resumable, then one tau run and a
figure (the heads' training and decoding are stubbed: they have their own tests)."""

from __future__ import annotations

import json

import mmspec.zoo.train_smollm2_sharegpt as recipe


def _stub(monkeypatch, finish_after: int):
    trained = []

    def head(cache, out, tokens, steps, minutes, draft_vocab, batch_size=4, autocast=None):
        trained.append(tokens)
        finished = len(trained) <= finish_after
        out.mkdir(parents=True, exist_ok=True)
        summary = {"finished": finished, "steps": steps, "tokens_per_step": 2048, "data_tokens": int(tokens),
                   "data_answer_tokens": int(tokens) // 2, "heldout_top1_per_step": [0.3, 0.25], "minutes": 1.0}
        (out / "training_summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(recipe, "head", head)
    monkeypatch.setattr(recipe, "tau", lambda outs, prompts: {str(o): {"tau_chain": (1.3, 1.4, 1.5)[i], "tau_k": 4}
                                                              for i, o in enumerate(outs)})
    return trained


def test_scaling_trains_each_size_once_resumes_and_writes_the_curve(tmp_path, monkeypatch):
    trained = _stub(monkeypatch, finish_after=1)
    first = recipe.scaling(tmp_path, tmp_path / "s", [1e5, 2e5, 4e5], steps=10, minutes=60, draft_vocab=64)
    assert first["finished"] is False and first["stopped_at"].endswith("tokens_2e+05") and trained == [1e5, 2e5]
    trained.clear()
    _stub(monkeypatch, finish_after=9)
    done = recipe.scaling(tmp_path, tmp_path / "s", [1e5, 2e5, 4e5], steps=10, minutes=60, draft_vocab=64)
    assert [r["size"] for r in done["rows"]] == [1e5, 2e5, 4e5]
    assert [r["epochs"] for r in done["rows"]] == [0.2, 0.1, 0.05]  # 10 steps x 2,048 tokens over each size
    assert [r["tau_chain"] for r in done["rows"]] == [1.3, 1.4, 1.5]
    assert json.loads((tmp_path / "s" / "scaling.json").read_text()) == done
    assert (tmp_path / "s" / "scaling.png").stat().st_size > 1000


def test_scaling_by_epochs_gives_each_size_steps_in_proportion(tmp_path, monkeypatch):
    _stub(monkeypatch, finish_after=9)
    done = recipe.scaling(tmp_path, tmp_path / "e", [1e5, 4e5, 8e5], steps=999, minutes=60, draft_vocab=64, epochs=1)
    # 2,048 tokens a step: ceil(size / 2,048), at least warm-up + 1
    assert [r["steps"] for r in done["rows"]] == [49, 196, 391] and done["epochs"] == 1 and done["steps"] is None
