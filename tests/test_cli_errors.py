"""The CLIs (``mmspec``, ``mmspec-imagegen``) on bad input: every argument is checked before any work
starts; a failure prints one line on stderr and ends with the exit code of its kind (issue 12)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mmspec import cli
from mmspec.cli import (EXIT_BAD_INPUT, EXIT_NOT_IDENTICAL, EXIT_OK, EXIT_OUTPUT, EXIT_ZOO, build_parser,
                        imagegen_main, main)

ROOT = Path(__file__).resolve().parents[1]


def _forbid(monkeypatch, target: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{target} ran before the arguments were checked")

    monkeypatch.setattr(target, fail)


@pytest.fixture
def no_work(monkeypatch):
    """Every loader and generator the CLI could start fails the test if it is called."""
    # main_job first: importing it while mmspec.zoo's loaders are patched would bind the patched ones for good
    for target in ("mmspec.zoo.main_job.run_captioning", "mmspec.zoo.main_job.run_image_generation",
                   "mmspec.zoo.main_job.load_default_image_models", "mmspec.cli.text.example_models",
                   "transformers.AutoModelForCausalLM.from_pretrained", "transformers.AutoTokenizer.from_pretrained",
                   "transformers.AutoModelForImageTextToText.from_pretrained",
                   "transformers.AutoProcessor.from_pretrained", "mmspec.image_gen.ARImageModel.from_pretrained",
                   "mmspec.image_gen.VQTokenizer.from_pretrained", "mmspec.image_gen.generate", "mmspec.generate",
                   "mmspec.zoo.load_default_vlm", "mmspec.zoo.load_default_image_models"):
        _forbid(monkeypatch, target)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_exit_codes_are_distinct_and_listed_in_every_help(capsys):
    codes = [EXIT_OK, EXIT_NOT_IDENTICAL, EXIT_BAD_INPUT, EXIT_OUTPUT, EXIT_ZOO]
    assert len(set(codes)) == len(codes) and EXIT_OK == 0
    assert "exit codes" in build_parser().format_help()
    for sub in (["run"], ["text"], ["vlm"], ["imagegen"]):
        with pytest.raises(SystemExit) as exc:
            main([*sub, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert all(f"\n  {c}  " in out for c in codes), out


def test_usage_errors_are_one_line(capsys, no_work):
    with pytest.raises(SystemExit) as exc:
        imagegen_main(["--model", "m", "--class", "1", "--cfg-scale", "abc"])
    assert exc.value.code == EXIT_BAD_INPUT
    assert "invalid float value: 'abc'" in one_line_error(capsys)


# ---------------------------------------------------------------- mmspec text


@pytest.mark.parametrize("args,message", [
    (["--drafter", "/some/drafter"], "--drafter: no checkpoint at /some/drafter"),  # a drafter for SmolLM2
    (["--example", "--drafter", "d"], "--drafter cannot be combined with --example"),
    (["--example", "--target", "t"], "--target cannot be combined with --example"),
    (["--tokenizer", "/some/tokenizer"], "--tokenizer needs --target"),
    (["--prompt-lookup", "--drafter", "d", "--target", "t"], "give --drafter or --prompt-lookup, not both"),
    (["--target", "/nonexistent"], "--target: no checkpoint at /nonexistent (no such directory)"),
    (["--target", "./no/such/dir"], "no checkpoint at ./no/such/dir"),
    (["--temperature", "nan"], "temperature must be a number >= 0, got nan"),
    (["--temperature", "-1"], "temperature must be a number >= 0, got -1.0"),
    (["--top-p", "0"], "top_p must be a number > 0 and <= 1, got 0.0"),
    (["--top-p", "inf"], "top_p must be a number > 0 and <= 1, got inf"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["-k", "0"], "k must be an integer >= 1, got 0 (-k/--num-draft-tokens)"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_text_rejects_bad_arguments_before_any_work(args, message, capsys, no_work):
    assert main(["text", *args]) == EXIT_BAD_INPUT
    assert message in one_line_error(capsys)


def test_text_target_that_is_a_file(tmp_path, capsys, no_work):
    f = tmp_path / "model.bin"
    f.write_bytes(b"")
    assert main(["text", "--target", str(f)]) == EXIT_BAD_INPUT
    err = one_line_error(capsys)
    assert "--target: no checkpoint at" in err and "(not a directory)" in err


@pytest.mark.parametrize("target", ["dir", "no-such-hub-model-for-mmspec"])
def test_text_target_that_cannot_be_loaded(tmp_path, capsys, target):
    """An empty directory or an unknown hub name (offline): one line, not a transformers traceback."""
    path = str(tmp_path) if target == "dir" else target
    assert main(["text", "--target", path]) == EXIT_BAD_INPUT
    assert f"cannot load the target model from {path!r}" in one_line_error(capsys)


# ---------------------------------------------------------------- mmspec vlm


def test_vlm_checks_numbers_before_loading_anything(tmp_path, capsys, no_work):
    assert main(["vlm", "--target", str(tmp_path), "--image", "x.png", "--prompt", "hi", "--keep-ratio", "2"]) \
        == EXIT_BAD_INPUT
    assert "keep_ratio must be a number >= 0 and <= 1, got 2.0" in one_line_error(capsys)
    assert main(["vlm", "--target", str(tmp_path / "nope"), "--image", "x.png", "--prompt", "hi"]) == EXIT_BAD_INPUT
    assert "--target: no checkpoint at" in one_line_error(capsys)


def test_vlm_unreadable_image_exits_with_bad_input_code(tmp_path, capsys, no_work):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit, match="cannot read image") as exc:
        main(["vlm", "--target", str(tmp_path), "--image", str(bad), "--prompt", "hi"])
    assert exc.value.code == EXIT_BAD_INPUT  # not 1, the "not identical" code
    one_line_error(capsys)


# ---------------------------------------------------------------- mmspec run


def test_run_out_is_an_existing_file(tmp_path, capsys, no_work):
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    assert main(["run", "--out", str(f)]) == EXIT_OUTPUT
    assert "--out" in one_line_error(capsys) and f.read_text() == "keep me"
    assert main(["run", "--out", str(f / "sub")]) == EXIT_OUTPUT
    assert "is not a directory" in one_line_error(capsys)


def test_run_out_that_cannot_be_created(capsys, no_work):
    assert main(["run", "--out", "/proc/mmspec_cannot_be_here/out"]) == EXIT_OUTPUT
    assert "cannot create directory /proc/mmspec_cannot_be_here" in one_line_error(capsys)


@pytest.mark.parametrize("args,message", [
    (["--num-images", "0"], "num_images must be an integer >= 1, got 0"),
    (["--keep-ratio", "nan"], "keep_ratio must be a number >= 0 and <= 1, got nan"),
    (["--prompt", " "], "--prompt is empty"),
])
def test_run_checks_arguments_before_the_vlm_part(tmp_path, args, message, capsys, no_work):
    out = tmp_path / "new" / "out"
    assert main(["run", "--out", str(out), *args]) == EXIT_BAD_INPUT
    assert message in one_line_error(capsys)
    assert not (tmp_path / "new").exists()  # the --out probe leaves nothing behind


def test_run_without_zoo_weights_has_its_own_code(tmp_path, monkeypatch, capsys):
    from mmspec import zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "empty")
    assert main(["run", "--out", str(tmp_path / "out")]) == EXIT_ZOO
    assert "no checksum file" in one_line_error(capsys)


def test_main_job_checks_its_config_before_loading(monkeypatch, tmp_path):
    from mmspec.errors import InvalidLengthError, MethodParameterError
    from mmspec.zoo.main_job import MainJobConfig, run_main_job

    _forbid(monkeypatch, "mmspec.zoo.load_default_image_models")
    _forbid(monkeypatch, "mmspec.zoo.load_default_vlm")
    _forbid(monkeypatch, "mmspec.zoo.smollm2_llava.load_smollm2_vlm")
    with pytest.raises(MethodParameterError, match="vlm_drafter must be 'head' or 'model'"):
        run_main_job(tmp_path, MainJobConfig(vlm_drafter="big"))
    with pytest.raises(MethodParameterError, match="vlm_grid must be an integer in"):
        run_main_job(tmp_path, MainJobConfig(vlm_grid=0))
    with pytest.raises(InvalidLengthError, match="num_images must be an integer >= 1, got 0"):
        run_main_job(tmp_path, MainJobConfig(num_images=0))
    with pytest.raises(MethodParameterError, match="unknown image method 'medusa'"):
        run_main_job(tmp_path, MainJobConfig(image_method="medusa"))
    with pytest.raises(MethodParameterError, match="scene_index must be an integer in"):
        run_main_job(tmp_path, MainJobConfig(scene_index=-1))


# ---------------------------------------------------------------- mmspec-imagegen


@pytest.mark.parametrize("args,message", [
    (["--cfg-scale", "nan"], "cfg_scale must be a number >= 0, got nan (--cfg-scale)"),
    (["--cfg-scale", "inf"], "cfg_scale must be a number >= 0, got inf"),
    (["--cfg-scale=-inf"], "cfg_scale must be a number >= 0, got -inf"),
    (["--lantern-lambda", "nan"], "lantern_lambda must be a number >= 1, got nan (--lantern-lambda)"),
    (["--lantern-lambda", "0.5"], "lantern_lambda must be a number >= 1, got 0.5"),
    (["--lantern-delta", "1.5"], "lantern_delta must be a number >= 0 and <= 1, got 1.5"),
    (["--lantern-delta", "nan"], "lantern_delta must be a number >= 0 and <= 1, got nan"),
    (["--lantern-k", "0"], "lantern_k must be an integer >= 1, got 0"),
    (["--mulo-tau", "nan"], "mulo_tau must be a number >= 0, got nan"),
    (["--mulo-l", "-1"], "mulo_l must be an integer >= 0, got -1"),
    (["--mulo-scale", "0"], "mulo_scale must be an integer >= 1, got 0"),
    (["--temperature", "nan"], "temperature must be a number >= 0, got nan"),
    (["--top-p", "2"], "top_p must be a number > 0 and <= 1, got 2.0"),
    (["--num-images", "0"], "num_images must be an integer >= 1, got 0"),
    (["-k", "-3"], "k must be an integer >= 1, got -3"),
    (["--prompt", "a red circle"], "give --class or --prompt, not both"),
])
def test_imagegen_rejects_bad_arguments_before_loading(tmp_path, args, message, capsys, no_work):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    assert imagegen_main(["--model", str(tmp_path / "model"), "--class", "1", "--out", str(out), *args]) \
        == EXIT_BAD_INPUT
    assert message in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--method", "ar", "--drafter", "D"], "method 'ar' does not use drafter"),
    (["--method", "ar", "-k", "8"], "method 'ar' does not use num_draft_tokens"),
    (["--method", "sjd", "--lantern-delta", "0.2"], "method 'sjd' does not use lantern_delta"),
    (["--method", "exact"], "method 'exact' needs a drafter model"),
])
def test_imagegen_checks_method_parameters_against_the_registry_before_loading(tmp_path, args, message, capsys,
                                                                               no_work):
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    args = [str(tmp_path / "model") if a == "D" else a for a in args]
    assert imagegen_main(["--model", str(tmp_path / "model"), "--class", "1", "--out", str(out), *args]) \
        == EXIT_BAD_INPUT
    assert message in one_line_error(capsys)


def test_imagegen_without_condition_or_model(tmp_path, capsys, no_work):
    assert imagegen_main(["--model", str(tmp_path), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "give a condition" in one_line_error(capsys)
    assert imagegen_main(["--model", str(tmp_path / "missing"), "--class", "1"]) == EXIT_BAD_INPUT
    assert "--model: no AR image model at" in one_line_error(capsys)


def test_imagegen_checks_out_before_generating(tmp_path, capsys, no_work):
    (tmp_path / "model").mkdir()
    f = tmp_path / "taken"
    f.write_text("x")
    for out, message in ((f, "exists and is not a directory"), (f / "sub", "is not a directory")):
        assert imagegen_main(["--model", str(tmp_path / "model"), "--class", "1", "--out", str(out)]) == EXIT_OUTPUT
        assert message in one_line_error(capsys)


def test_imagegen_leaves_no_out_directory_when_loading_fails(tmp_path, monkeypatch, capsys):
    from mmspec.errors import MMSpecError

    def broken(*args, **kwargs):
        raise MMSpecError("broken model")

    monkeypatch.setattr("mmspec.image_gen.ARImageModel.from_pretrained", broken)
    (tmp_path / "model").mkdir()
    out = tmp_path / "a" / "b"
    assert imagegen_main(["--model", str(tmp_path / "model"), "--class", "1", "--out", str(out)]) == EXIT_BAD_INPUT
    assert "broken model" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()


def test_console_script_exit_code_and_one_line(tmp_path):
    """The installed entry point as a process: exit code and a single stderr line, no traceback."""
    code = "import sys; from mmspec.cli import imagegen_main; sys.exit(imagegen_main())"
    r = subprocess.run([sys.executable, "-c", code, "--model", str(tmp_path), "--class", "1", "--cfg-scale", "nan"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr.strip() == "error: cfg_scale must be a number >= 0, got nan (--cfg-scale)"
    f = tmp_path / "file"
    f.write_text("")
    code = "import sys; from mmspec.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, "run", "--out", str(f)], capture_output=True, text=True, timeout=300)
    assert r.returncode == EXIT_OUTPUT and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- the heat-map module


def test_heatmap_lives_in_its_own_module():
    import torch

    from mmspec.image_gen.heatmap import ACCEPTED_RGB, TARGET_RGB, heatmap_image

    img = heatmap_image(torch.tensor([[0.0, 1.0, 0.5], [2.0, -1.0, 1.0]]), cell=4)
    assert img.size == (12, 8) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == tuple(int(c) for c in TARGET_RGB)
    assert img.getpixel((4, 0)) == img.getpixel((0, 4)) == tuple(int(c) for c in ACCEPTED_RGB)  # 2.0 is clipped
    assert img.getpixel((4, 4)) == tuple(int(c) for c in TARGET_RGB)  # -1.0 is clipped
    assert cli.heatmap_image is heatmap_image


@pytest.mark.parametrize("path", ["mmspec/zoo/main_job.py", "demos/image_gen.py", "demos/vlm_chat.py"])
def test_no_module_imports_the_cli_for_the_heatmap(path):
    """main_job and the demos import mmspec.image_gen.heatmap, not the CLI (no cli <-> main_job cycle)."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("cli", "mmspec.cli"), (path, node.lineno)
        if isinstance(node, ast.Import):
            assert all(a.name != "mmspec.cli" for a in node.names), (path, node.lineno)


@pytest.mark.parametrize("argv,match", [
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-rows", "0"], "--max-rows"),
    (["serve", "--keep-ratio", "1.5"], "--keep-ratio"),
    (["serve", "--target", "some/folder", "--drafter", "head"], "--drafter head is packaged for --target smollm2"),
    (["serve", "--target", "smollm2", "--drafter", "model"], "--drafter model is the small VLM"),
    (["serve", "--target", "smollm2-vlm", "--drafter", "none"], "--drafter none is for text models"),
])
def test_serve_arguments_are_checked_before_any_model_loads(capsys, no_work, monkeypatch, argv, match):
    _forbid(monkeypatch, "mmspec.pretrained.load_causal_lm")
    _forbid(monkeypatch, "mmspec.zoo.smollm2_llava.load_smollm2_vlm")
    assert main(argv) == EXIT_BAD_INPUT
    assert match in one_line_error(capsys)
