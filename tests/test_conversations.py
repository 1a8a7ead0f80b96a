"""Real conversations for drafter training: EAGLE's ShareGPT file read up to its cut, split by position (the
reserved conversations never reach training), cleaned as EAGLE cleans, rendered with the assistant tokens
marked; a user's JSONL; the feature shards built from them (bfloat16, resumable, within budget)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from mmspec.distill import conversations as cv
from mmspec.distill.feature_shards import FeatureCacheError, ShardedExamples, build_conversation_features
from mmspec.pretrained import load_causal_lm
from tiny_tokenizer import save_tiny_chat_model, tiny_tokenizer


# ------------------------------------------------------------------------------------------ reading
def _array(n: int) -> str:
    return json.dumps([{"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"},
                                                          {"from": "gpt", "value": f"a{i}"}]} for i in range(n)],
                      indent=2)


@pytest.mark.parametrize("cut, ids", [
    (None, ["c0", "c1", "c2", "c3"]),      # the whole array
    (-2, ["c0", "c1", "c2", "c3"]),        # cut after the last object: the closing bracket is missing
    (-5, ["c0", "c1", "c2"]),              # cut inside the last object
    (0.5, ["c0", "c1"]),                   # cut in the middle
    (3, []),                               # cut inside the first object
])
def test_a_truncated_array_gives_its_complete_objects(cut, ids):
    text = _array(4)
    if cut is not None:
        text = text[:int(len(text) * cut) if isinstance(cut, float) else cut]
    assert [o["id"] for o in cv.iter_json_array(io.StringIO(text))] == ids


def test_objects_longer_than_a_read_chunk_are_read_whole(monkeypatch):
    monkeypatch.setattr(cv, "_CHUNK", 7)
    assert [o["id"] for o in cv.iter_json_array(io.StringIO(_array(5)))] == [f"c{i}" for i in range(5)]


def test_a_file_that_is_not_an_array_is_a_named_error():
    with pytest.raises(cv.ConversationDataError, match="expected a JSON array"):
        list(cv.iter_json_array(io.StringIO('{"a": 1}')))


def T(role, text):
    return cv.Turn(role, text)


@pytest.mark.parametrize("raw, turns", [
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], (T("user", "q"), T("assistant", "a"))),
    # a leading assistant turn (a continued ShareGPT conversation) is dropped, as EAGLE does
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"}],
     (T("user", "q"), T("assistant", "a"))),
    # empty turns go; two user turns in a row merge
    ([{"from": "human", "value": "q1"}, {"from": "gpt", "value": " "}, {"from": "human", "value": "q2"},
      {"from": "bard", "value": "a"}], (T("user", "q1\n\nq2"), T("assistant", "a"))),
    # OpenAI names and a system turn
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     (T("system", "s"), T("user", "q"), T("assistant", "a"))),
    ([{"from": "human", "value": "q"}], None),                                     # no answer
    ([{"from": "gpt", "value": "a"}], None),                                       # no question
    ([{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}], None),      # unknown role: dropped turn
])
def test_cleaning_table(raw, turns):
    assert cv.clean_turns(raw) == turns


# ------------------------------------------------------------------------------------- the real file
def test_sharegpt_parses_to_the_cut_and_splits_by_position_without_reserved_in_training():
    with open(cv.sharegpt_path(), encoding="utf-8") as f:
        assert sum(1 for _ in cv.iter_json_array(f)) == 17_671  # complete conversations before the cut
    seen, counts = {}, {}
    for split in ("train", "dev", "reserved"):
        counts[split] = c = cv.CleaningCounts()
        seen[split] = list(cv.iter_sharegpt(split, counts=c))
        lo, hi = cv.SPLITS[split]
        assert all(lo <= p < (hi or 17_671) for p, _ in seen[split])
        assert c.read == (hi or 17_671) - lo and c.kept == len(seen[split])
    assert [len(seen[s]) for s in ("train", "dev", "reserved")] == [14_772, 839, 1_457]
    assert [counts[s].train_duplicates for s in ("train", "dev", "reserved")] == [0, 150, 172]
    assert max(p for p, _ in seen["train"]) < 15_000 <= min(p for p, _ in seen["dev"])
    # held out means unseen: no long turn of a dev or reserved conversation is in the training split verbatim
    train_turns = {t.text for _, turns in seen["train"] for t in turns if len(t.text) >= cv.DUPLICATE_MIN_CHARS}
    for split in ("dev", "reserved"):
        assert not any(t.text in train_turns for _, turns in seen[split] for t in turns)
    # the training data builder reads the train split only: a reserved position never reaches it
    train_positions = {p for p, _ in cv.conversations("sharegpt", "train")}
    assert train_positions == {p for p, _ in seen["train"]} and max(train_positions) < cv.SPLITS["reserved"][0]
    # deterministic: a second pass yields the same conversations
    assert list(cv.iter_sharegpt("dev")) == seen["dev"]


def test_an_unknown_split_is_a_named_error():
    with pytest.raises(ValueError, match="split must be one of"):
        next(cv.iter_sharegpt("test"))


# ------------------------------------------------------------------------------------------ rendering
CONV = (T("user", "hello there"), T("assistant", "hi, how can I help"), T("user", "add 2 and 2"),
        T("assistant", "4"))


@pytest.mark.parametrize("template", [True, False])
def test_render_marks_exactly_the_assistant_turns_and_their_end_token(template):
    tok = tiny_tokenizer()
    if not template:
        tok.chat_template = None
    r = cv.render(tok, CONV)
    text, spans = cv.render_text(tok, CONV)
    assert [text[a:b] for a, b in spans] == ["hi, how can I help", "4"]
    marked = tok.decode(r.tokens[r.loss_mask])
    assert "hi, how can I help" in marked.replace("  ", " ") or "hi , how can I help" in marked
    assert "hello" not in marked and "add" not in marked
    # every marked run ends one token after its turn's text: the token that ends the turn is learned too
    runs = torch.nonzero(r.loss_mask[1:].int() - r.loss_mask[:-1].int()).flatten().tolist()
    assert len(runs) == 4  # two runs (two answers), each with a start and an end


def test_render_cuts_at_max_len():
    tok = tiny_tokenizer()
    r = cv.render(tok, CONV, max_len=9)
    assert r.tokens.shape == r.loss_mask.shape == (9,)


def test_jsonl_accepts_openai_and_sharegpt_lines_and_names_a_bad_line(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                    + "\n\n" + json.dumps({"conversations": [{"from": "human", "value": "q2"},
                                                             {"from": "gpt", "value": "a2"}]}) + "\n")
    assert [p for p, _ in cv.read_jsonl(good)] == [0, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n{not json\n")
    with pytest.raises(cv.ConversationDataError, match=r"bad.jsonl:2: not JSON"):
        cv.read_jsonl(bad)
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(cv.ConversationDataError, match=r"bad.jsonl:1: expected an object with a 'messages' list"):
        cv.read_jsonl(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(cv.ConversationDataError, match="no conversation with a user turn followed by an assistant"):
        cv.read_jsonl(bad)
    with pytest.raises(cv.ConversationDataError, match="no conversation file"):
        cv.read_jsonl(tmp_path / "missing.jsonl")


# -------------------------------------------------------------------------------------- feature shards
@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_chat")
    save_tiny_chat_model(folder, layers=4)
    return load_causal_lm(folder)


def _jsonl(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question number {i} " * (1 + i % 3)},
                                             {"role": "assistant", "content": f"answer {i} is here " * (1 + i % 4)},
                                             {"role": "user", "content": "and then"},
                                             {"role": "assistant", "content": f"then {i}"}]}) + "\n")
    return path


def test_feature_shards_are_bfloat16_resumable_and_equal_one_forward(tiny_chat, tmp_path):
    model, tok = tiny_chat
    data = _jsonl(tmp_path / "c.jsonl", 11)
    index = build_conversation_features(model, tok, data, tmp_path / "f", window=4, batch_tokens=192, max_len=96,
                                        progress=False)
    assert [s["examples"] for s in index["shards"]] == [4, 4, 3] and index["stopped"] == "the source ended"
    ex = ShardedExamples(tmp_path / "f")
    assert len(ex) == 11 and ex.tokens == sum(s["tokens"] for s in index["shards"])
    e = ex[5]
    assert e["features"].dtype == e["final"].dtype == torch.bfloat16
    assert e["features"].shape == (e["tokens"].shape[0], 3, model.config.hidden_size)
    # the stored features are the target's own on that conversation alone (padding in the batch changed nothing)
    with torch.no_grad():
        hs = model(input_ids=e["tokens"][None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(e["final"].float(), hs[-1][0].to(torch.bfloat16).float())
    # resuming adds nothing; a prefix by tokens is the first shards
    again = build_conversation_features(model, tok, data, tmp_path / "f", window=4, batch_tokens=192, max_len=96,
                                        progress=False)
    assert again["shards"] == index["shards"]
    assert len(ShardedExamples(tmp_path / "f", max_tokens=1)) == 4
    with pytest.raises(FeatureCacheError, match="holds features made with"):
        build_conversation_features(model, tok, data, tmp_path / "f", window=4, max_len=32, progress=False)


def test_a_resumed_feature_build_equals_one_run_and_renders_only_new_conversations(tiny_chat, tmp_path,
                                                                                   monkeypatch):
    import mmspec.distill.feature_shards as fs

    model, tok = tiny_chat
    data = _jsonl(tmp_path / "c.jsonl", 10)
    whole = build_conversation_features(model, tok, data, tmp_path / "whole", window=4, max_len=96, progress=False)
    first = build_conversation_features(model, tok, data, tmp_path / "part", window=4, max_len=96, max_tokens=1,
                                        progress=False)
    assert len(first["shards"]) == 1
    rendered = []
    real = fs.render
    monkeypatch.setattr(fs, "render", lambda *a, **k: rendered.append(k["position"]) or real(*a, **k))
    resumed = build_conversation_features(model, tok, data, tmp_path / "part", window=4, max_len=96, progress=False)
    assert rendered == list(range(4, 10))  # the first shard's conversations are read, not rendered again
    assert resumed["shards"] == whole["shards"] and resumed["cleaning"] == whole["cleaning"]
    for a, b in zip(ShardedExamples(tmp_path / "part"), ShardedExamples(tmp_path / "whole")):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["final"], b["final"])


def test_feature_shards_stop_at_the_budgets(tiny_chat, tmp_path):
    model, tok = tiny_chat
    data = _jsonl(tmp_path / "c.jsonl", 12)
    index = build_conversation_features(model, tok, data, tmp_path / "a", window=4, max_len=96, max_tokens=1,
                                        progress=False)
    assert len(index["shards"]) == 1 and index["stopped"].startswith("max_tokens")
    one = index["shards"][0]["bytes"]
    index = build_conversation_features(model, tok, data, tmp_path / "b", window=4, max_len=96,
                                        cache_gb=1.5 * one / 1e9, progress=False)
    assert len(index["shards"]) == 1 and "disk budget" in index["stopped"]
    with pytest.raises(FeatureCacheError, match="cannot hold one shard"):
        build_conversation_features(model, tok, data, tmp_path / "c", window=4, max_len=96, cache_gb=one / 2e9,
                                    progress=False)


def test_features_of_a_residual_stream_beyond_float16_stay_finite(tiny_chat, tmp_path):
    """A real model of another family reached 65,088 in its residual stream: float16 shards held inf and training
    was NaN from step one. bfloat16 shards keep such values finite."""
    model, tok = tiny_chat
    data = _jsonl(tmp_path / "c.jsonl", 2)
    big = model.model.layers[0].mlp.down_proj
    saved = big.weight.detach().clone()
    try:
        with torch.no_grad():
            big.weight.mul_(1e5)
        build_conversation_features(model, tok, data, tmp_path / "f", window=4, max_len=96, progress=False)
    finally:
        with torch.no_grad():
            big.weight.copy_(saved)
    e = ShardedExamples(tmp_path / "f")[0]
    assert e["features"].float().abs().max() > 65_504  # beyond float16's range ...
    assert torch.isfinite(e["features"].float()).all() and torch.isfinite(e["final"].float()).all()  # ... still finite


def test_feature_shards_under_bf16_autocast_are_recorded_close_and_leave_the_model_as_loaded(tiny_chat, tmp_path):
    model, tok = tiny_chat
    data = _jsonl(tmp_path / "c.jsonl", 4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = build_conversation_features(model, tok, data, tmp_path / "fp32", window=4, max_len=96, progress=False)
    auto = build_conversation_features(model, tok, data, tmp_path / "bf16", window=4, max_len=96,
                                       autocast="bfloat16", progress=False)
    assert "autocast" not in plain["settings"] and auto["settings"]["autocast"] == "bfloat16"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert next(model.parameters()).dtype == torch.float32
    a, b = ShardedExamples(tmp_path / "fp32")[0], ShardedExamples(tmp_path / "bf16")[0]
    assert not torch.equal(a["final"], b["final"])  # the forwards did run in bf16 ...
    cos = torch.nn.functional.cosine_similarity(a["final"].float(), b["final"].float(), dim=-1)
    assert cos.min() > 0.95  # ... and stay close to float32's
    with pytest.raises(FeatureCacheError, match="holds features made with"):
        build_conversation_features(model, tok, data, tmp_path / "fp32", window=4, max_len=96, autocast="bfloat16",
                                    progress=False)
    with pytest.raises(ValueError, match="autocast must be None or 'bfloat16'"):
        build_conversation_features(model, tok, data, tmp_path / "x", autocast="float16", progress=False)
