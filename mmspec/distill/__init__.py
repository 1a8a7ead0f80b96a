"""Training drafters for a target the user already has: self-distillation data, an EAGLE-3 head, a
standalone drafter LM, blockwise parallel heads (``mmspec train-drafter``).

Glossary:
    run dir   ``out/``: ``data/`` (self-distillation shards), ``train_state.pt`` while training, and
              the finished drafter (``head.safetensors`` + ``head_config.json``,
              ``drafter.safetensors`` + ``config.json``, or ``blockwise.safetensors`` +
              ``blockwise_config.json``); re-running the same command continues
    budget    ``minutes`` for the whole job: the data takes up to ``data_share`` of it (the target's own
              answers first, teacher-forced documentation in what is left), training the rest
    loop      every trainer here (and the zoo's) trains through :func:`mmspec.distill.loop.train_loop`,
              with its settings written out in a :class:`~mmspec.distill.loop.LoopConfig`
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..drafters.blockwise import BlockwiseDrafter
from ..drafters.feature import FeatureDrafter
from ..heads.blockwise import BlockwiseHeads
from ..heads.eagle3 import Eagle3Head
from . import train_head, train_model  # the modules (their functions of the same names would shadow them)
from .data import build_dataset, build_forced_dataset, load_examples
from .train_blockwise import BlockwiseTraining, train_blockwise_heads

KINDS = ("head", "model", "heads")


def train_drafter(model: Any, tokenizer: Any, *, kind: str = "head", out: str | Path, minutes: float = 30.0,
                  data_dir: str | Path | None = None, num_prompts: int = 1024, max_new_tokens: int = 160,
                  batch_size: int = 16, data_share: float = 0.4, draft_vocab_size: int = 4096,
                  num_layers: int = 2, num_heads: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """Build self-distillation data from ``model``'s answers, then train a drafter of ``kind``
    (``"head"``: EAGLE-3 head, ``"model"``: a distilled ``num_layers`` drafter LM, ``"heads"``: ``num_heads``
    blockwise parallel heads) into ``out``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir is not None else out / "data"
    t0 = time.time()
    build_dataset(model, tokenizer, data, num_prompts=num_prompts, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, seed=seed, minutes=minutes * data_share * 0.6, progress=progress)
    left = minutes * data_share - (time.time() - t0) / 60
    if left > 0:  # teacher-forced documentation fills the rest of the data budget
        build_forced_dataset(model, tokenizer, data, num_texts=num_prompts, batch_size=batch_size, seed=seed,
                             minutes=left, progress=progress)
    examples = load_examples(data)
    left = max(minutes - (time.time() - t0) / 60, 0.05)
    if kind == "head":
        config = train_head.HeadTraining(draft_vocab_size=draft_vocab_size, seed=seed)
        summary = train_head.train_head(model, examples, out, config=config, minutes=left, tokenizer=tokenizer,
                                        progress=progress)
    elif kind == "heads":
        summary = train_blockwise_heads(model, examples, out, config=BlockwiseTraining(
            num_heads=num_heads, draft_vocab_size=draft_vocab_size, seed=seed), minutes=left, tokenizer=tokenizer,
            progress=progress)
    else:
        summary = train_model.train_model_drafter(model, examples, out, num_layers=num_layers, minutes=left,
                                                  seed=seed, progress=progress)
    summary = {"kind": kind, "data_examples": len(examples), "minutes": round((time.time() - t0) / 60, 2), **summary}
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
