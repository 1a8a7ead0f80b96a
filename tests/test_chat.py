"""`mmspec chat` and :class:`mmspec.chat.Chat`: streamed multi-turn answers equal to HF generate on the
whole conversation (greedy), the conversation kept across turns, bad input named before any work."""

from __future__ import annotations

import io

import pytest
import torch

from mmspec.chat import Chat
from mmspec.cli import EXIT_BAD_INPUT, EXIT_OK, main, parse_tree
from mmspec.drafters.tree import DynamicTree
from tiny_tokenizer import save_tiny_chat_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_chat")
    model, tok = save_tiny_chat_model(folder, layers=2)
    return model, tok, folder


def _hf_answer(model, tok, messages, max_new_tokens):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _check_turns_equal_hf_generate(chat, model, tok, messages):
    """Each streamed answer equals HF greedy generate on the conversation so far; the chat keeps it."""
    history = []
    for message in messages:
        history.append({"role": "user", "content": message})
        streamed = "".join(chat.reply(message))
        assert streamed == _hf_answer(model, tok, history, chat.max_new_tokens)
        history.append({"role": "assistant", "content": streamed})
        assert chat.messages == history
        assert chat.last.new_tokens >= 1 and chat.last.mean_accepted_length >= 1


def test_streamed_turns_equal_hf_generate_on_the_conversation(tiny_chat_model):
    model, tok, _ = tiny_chat_model
    chat = Chat(model, tok, "prompt_lookup", max_new_tokens=20)
    _check_turns_equal_hf_generate(chat, model, tok, ("Serialize obj to a JSON formatted str.",
                                                      "Decode a JSON document."))
    chat.reset()
    assert chat.messages == []


def test_a_chat_without_drafter_equals_hf_generate(tiny_chat_model):
    """What `mmspec chat` runs where the calibration expects drafts not to pay: no drafter, plain decoding."""
    model, tok, _ = tiny_chat_model
    chat = Chat(model, tok, None, max_new_tokens=8)
    _check_turns_equal_hf_generate(chat, model, tok, ("Hello there", "Decode a JSON document."))


def test_a_system_message_goes_first(tiny_chat_model):
    model, tok, _ = tiny_chat_model
    chat = Chat(model, tok, "prompt_lookup", max_new_tokens=8, system="Answer briefly.")
    streamed = "".join(chat.reply("Hello"))
    assert streamed == _hf_answer(model, tok, [{"role": "system", "content": "Answer briefly."},
                                               {"role": "user", "content": "Hello"}], 8)


def test_bad_chat_input_is_named(tiny_chat_model):
    model, tok, _ = tiny_chat_model
    chat = Chat(model, tok, "prompt_lookup")
    with pytest.raises(ValueError, match="empty message"):
        list(chat.reply("   "))
    with pytest.raises(ValueError, match="max_new_tokens"):
        Chat(model, tok, "prompt_lookup", max_new_tokens=0)
    bare = tiny_tokenizer.__wrapped__(384)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Chat(model, bare, "prompt_lookup")
    with pytest.raises(ValueError, match="depth,top_k,nodes"):
        parse_tree("5,4")
    assert parse_tree("5,4,16") == DynamicTree(depth=5, top_k=4, num_nodes=16)
    # a setting the loop rejects leaves the conversation as it was
    bad = Chat(model, tok, "prompt_lookup", num_draft_tokens=0)
    with pytest.raises(Exception, match="num_draft_tokens|>= 1"):
        list(bad.reply("Hello"))
    assert bad.messages == []


def test_chat_cli_answers_each_stdin_line(tiny_chat_model, monkeypatch, capsys):
    _, _, folder = tiny_chat_model
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\n/reset\nDecode a JSON document.\n/exit\nignored\n"))
    rc = main(["chat", "--target", str(folder), "--drafter", "prompt-lookup", "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert rc == EXIT_OK
    assert out.out.count("assistant> ") == 2 and "(conversation cleared)" in out.out
    assert out.err.count("tokens/s") == 2


@pytest.mark.parametrize("args, match", [
    (["--drafter", "head"], "shipped for SmolLM2"),
    (["--drafter", "prompt-lookup", "--tree", "5,x,2"], "--tree"),
    (["--drafter", "prompt-lookup", "--temperature", "nan"], "temperature"),
    (["--drafter", "/no/such/drafter"], "no trained drafter folder"),
])
def test_chat_cli_rejects_bad_input_before_loading(tiny_chat_model, capsys, args, match):
    _, _, folder = tiny_chat_model
    rc = main(["chat", "--target", str(folder), *args])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and match in err and len(err.strip().splitlines()) == 1


def test_smollm2_chat_with_the_head_tree_equals_hf_generate():
    from mmspec.pretrained import load_causal_lm
    from mmspec.zoo.smollm2 import chat_drafter

    target, tok = load_causal_lm()
    chat = Chat(target, tok, chat_drafter("head", target, parse_tree("5,4,16")), max_new_tokens=24)
    _check_turns_equal_hf_generate(chat, target, tok, ("What is the capital of France?", "And of Italy?"))
