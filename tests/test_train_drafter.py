"""`mmspec train-drafter` on tiny random targets of other families: the trained head, the distilled
drafter and the blockwise heads load and decode token-identically to HF generate."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec import engine
from mmspec.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_OUTPUT, main
from mmspec import distill
from mmspec.distill import load_drafter, self_distillation_prompts
from mmspec.distill.conversations import iter_sharegpt
from mmspec.distill.data import prompt_bank
from mmspec.drafters.blockwise import BlockwiseDrafter
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.lattice_rescoring import NGramRescorer
from mmspec.drafters.tree import DynamicTree
from mmspec.pretrained import chat_inputs, load_causal_lm
from tiny_tokenizer import save_tiny_chat_model


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    save_tiny_chat_model(folder, layers=4)
    return folder


def _check_decodes_like_hf(target, tokenizer, drafter):
    enc = chat_inputs(tokenizer, ["Serialize obj to a JSON formatted str.", "Decode a JSON document."])
    ref = target.generate(**enc, max_new_tokens=24, do_sample=False)
    out = engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=drafter,
                          num_draft_tokens=3, max_new_tokens=24)
    width = ref.shape[1]
    got = out.sequences[:, :width]
    # HF pads finished rows with pad; mmspec too: compare the generated tokens up to HF's length
    assert torch.equal(got, ref[:, : got.shape[1]])


@pytest.mark.parametrize("kind", ["head", "model", "heads"])
def test_train_drafter_cli_gives_a_drafter_that_decodes_like_hf(tiny_target_dir, tmp_path, kind, monkeypatch):
    # the target's own answers to short stdlib-docstring prompts: ShareGPT's (the default) are too long for the
    # tiny tokenizer to answer 48 of them in the test's 15 s (they have a test of their own below)
    monkeypatch.setattr(distill, "self_distillation_prompts", prompt_bank)
    out = tmp_path / kind
    code = main(["train-drafter", "--target", str(tiny_target_dir), "--kind", kind, "--minutes", "0.25", "--data",
                 "self", "--out", str(out), "--num-prompts", "48", "--max-new-tokens", "24", "--draft-vocab", "200"])
    assert code == EXIT_OK
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["kind"] == kind and summary["steps"] > 0
    target, tokenizer = load_causal_lm(tiny_target_dir)
    drafter = load_drafter(out, target)
    _check_decodes_like_hf(target, tokenizer, drafter)
    if kind == "head":
        assert isinstance(drafter, FeatureDrafter) and drafter.head.d2t.numel() == 200
        _check_decodes_like_hf(target, tokenizer, load_drafter(out, target, tree=DynamicTree(depth=3, top_k=3,
                                                                                               num_nodes=8)))
    elif kind == "heads":
        assert isinstance(drafter, BlockwiseDrafter) and drafter.heads.num_heads == 4
        assert summary["num_heads"] == 4 and len(summary["heldout_top1_per_head"]) == 4
        _check_decodes_like_hf(target, tokenizer, load_drafter(out, target, rescorer=NGramRescorer(order=2)))
    else:
        assert target.get_input_embeddings() is drafter.get_input_embeddings()  # borrowed, not copied
        # the rotary buffers (not in the state dict) equal the target's, never left uninitialised
        own = dict(target.named_buffers())
        rotary = {n: b for n, b in drafter.named_buffers() if "inv_freq" in n}
        assert rotary and all(torch.equal(b, own[n]) for n, b in rotary.items())
        hf = target.generate(**chat_inputs(tokenizer, ["Decode a JSON document."]), assistant_model=drafter,
                             max_new_tokens=16, do_sample=False)
        ref = target.generate(**chat_inputs(tokenizer, ["Decode a JSON document."]), max_new_tokens=16, do_sample=False)
        assert torch.equal(hf, ref)


def test_self_distillation_prompts_are_sharegpt_training_prompts():
    prompts = self_distillation_prompts(64, seed=3)
    assert len(prompts) == 64 == len(set(prompts)) and prompts == self_distillation_prompts(64, seed=3)
    train_first_turns = {turns[0].text[:2000] for _, turns in iter_sharegpt("train") if turns[0].role == "user"}
    assert set(prompts) <= train_first_turns


@pytest.mark.parametrize("kind", ["head", "model", "heads"])
def test_train_drafter_on_your_own_conversations_for_a_base_model_without_a_chat_template(tiny_target_dir, tmp_path,
                                                                                           kind):
    """A base model (no chat template) trains on a JSONL of conversations rendered as plain text; the features are
    bfloat16 shards; the drafter decodes like HF."""
    base = tmp_path / "base"
    target, tokenizer = load_causal_lm(tiny_target_dir)
    target.save_pretrained(base)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(base)
    data = tmp_path / "mine.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Serialize object {i} to a JSON formatted str."},
                {"role": "assistant", "content": f"Use json.dumps on object {i}; it returns a str. " * (1 + i % 3)},
                {"role": "user", "content": "And decode it?"},
                {"role": "assistant", "content": "Use json.loads to decode a JSON document."}]}) + "\n")
    out = tmp_path / kind
    bf16 = ["--bf16"] if kind == "head" else []  # the head also under bf16 autocast (features and steps)
    code = main(["train-drafter", "--target", str(base), "--kind", kind, "--minutes", "0.25", "--data", str(data),
                 "--out", str(out), "--draft-vocab", "200", "--max-len", "128", *bf16])
    assert code == EXIT_OK
    summary = json.loads((out / "training_summary.json").read_text())
    index = json.loads((out / "data" / "train" / "index.json").read_text())
    assert summary["autocast"] == index["settings"].get("autocast") == ("bfloat16" if bf16 else None)
    assert summary["data"] == str(data) and summary["data_examples"] == 40 and summary["steps"] > 0
    assert summary["data_stopped"] == "the source ended"
    target, tokenizer = load_causal_lm(base)
    assert not getattr(tokenizer, "chat_template", None)
    _check_decodes_like_hf(target, tokenizer, load_drafter(out, target))


def test_train_drafter_names_a_bad_data_file_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    assert main(["train-drafter", "--target", "/nonexistent/model", "--data", str(bad),
                 "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    assert main(["train-drafter", "--data", "wikipedia", "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "(--data) must be sharegpt, self or an existing .jsonl file" in capsys.readouterr().err


@pytest.mark.parametrize("args, code, match", [
    (["--minutes", "0"], EXIT_BAD_INPUT, "minutes"),
    (["--max-tokens", "0"], EXIT_BAD_INPUT, "max_tokens"),
    (["--cache-gb", "nan"], EXIT_BAD_INPUT, "cache_gb"),
    (["--minutes", "nan"], EXIT_BAD_INPUT, "minutes"),
    (["--target", "/nonexistent/model"], EXIT_BAD_INPUT, "cannot load the target"),
])
def test_train_drafter_rejects_bad_input_before_work(tmp_path, capsys, args, code, match):
    assert main(["train-drafter", "--out", str(tmp_path / "o"), *args]) == code
    assert match in capsys.readouterr().err


def test_train_drafter_rejects_an_unwritable_out(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train-drafter", "--out", str(f / "sub")]) == EXIT_OUTPUT


def test_train_drafter_rejects_an_unknown_kind(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-drafter", "--kind", "lora", "--out", str(tmp_path / "o")])
    assert exc.value.code == EXIT_BAD_INPUT and "--kind" in capsys.readouterr().err
