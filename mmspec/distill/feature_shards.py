"""The target's features along real conversations, computed once (teacher forcing: one forward per batch, no
generation) and kept on disk in shards that training reads back memory-mapped, within a stated disk budget.

Paper: Li et al., EAGLE-3 (arXiv 2503.01840): the head reads three of the target's hidden layers and is taught
the target's own next-token distribution; EAGLE (arXiv 2401.15077) does this on fixed ShareGPT answers.

Glossary:
    source      ``"sharegpt"`` (one split of EAGLE's file, :mod:`mmspec.distill.conversations`) or a JSONL file
    window      ``window`` consecutive kept conversations of the source: one shard. Shards are written in source
                order, so the first k shards are the same data whatever the budget (the data-scaling curve
                trains on prefixes)
    shard       ``conv_XXXXX.pt``, the window's conversations concatenated: ``tokens`` long [N], ``loss_mask``
                bool [N], ``features`` [N, 3, d] and ``final`` [N, d] in ``dtype`` (bfloat16 by default: a
                residual stream reaching 65,000 overflows float16 to inf), ``starts`` long [E + 1] (example e is
                ``starts[e]:starts[e + 1]``), ``positions`` long [E] (each conversation's position in the source)
    index       ``index.json``: what was extracted (source, split, model, max_len, dtype) and per shard its
                examples, tokens, answer tokens and bytes; a run with other settings on the same folder is an error
    budget      extraction stops at the first of ``max_tokens`` (tokens in shards), ``cache_gb`` (bytes of
                shards) and ``minutes``; re-running the same call continues after the last shard
    throughput  tokens/s of the target's forwards (padding excluded), recorded in the index
    autocast    ``"bfloat16"``: the target's forwards run under CPU bf16 autocast (its weights untouched; measured
                on a 2-core AVX-512 + AMX CPU: the forward alone 2,700 tokens/s against 670 in float32, 2,035
                tokens/s for a whole build with rendering and saving; emulated bf16 without AMX is
                slower than float32). The features then carry bf16 rounding; the index records the choice
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import MMSpecError
from ..heads.eagle3 import feature_layers
from .conversations import CleaningCounts, Rendered, conversations, render
from .data import cpu_autocast, target_features

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# madvise(2) advice values (Linux): the shards are read at random windows, so the kernel's default read-ahead on a
# page fault (read_ahead_kb, 8 MB on some disks) would read several times the window and evict what others need;
# instead the whole mapping is marked random and each window asked for, exactly, before it is touched
_MADV_RANDOM, _MADV_WILLNEED = 1, 3
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _advise(t: torch.Tensor, advice: int, whole: bool = False) -> None:
    """madvise the bytes of ``t`` (or, ``whole``, of its storage) where the OS has it; a no-op elsewhere."""
    if _LIBC is None:
        return
    if whole:
        start, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    else:
        start, size = t.data_ptr(), t.numel() * t.element_size()
    if size <= 0 or start == 0:
        return
    first = start - start % mmap.PAGESIZE
    _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(start + size - first), ctypes.c_int(advice))


class FeatureCacheError(MMSpecError):
    """A feature folder written with other settings, or a budget that cannot hold one shard."""


def _model_name(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def _windows(source: str | Path, split: str, tokenizer: Any, max_len: int, window: int,
             counts: CleaningCounts, skip_through: int = -1) -> Iterator[list[Rendered]]:
    """Windows of ``window`` rendered conversations; those at positions up to ``skip_through`` (already in
    shards) are read (their cleaning is counted) but not rendered."""
    batch: list[Rendered] = []
    for position, turns in conversations(source, split, counts=counts):
        if position <= skip_through:
            continue
        r = render(tokenizer, turns, max_len=max_len, position=position)
        if r.tokens.shape[0] < 4 or not bool(r.loss_mask[1:].any()):
            continue
        batch.append(r)
        if len(batch) == window:
            yield batch
            batch = []
    if batch:
        yield batch


def _forward_batches(rows: list[Rendered], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of ``rows`` grouped longest first into padded batches of at most ``batch_tokens`` tokens."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i].tokens.shape[0])
    group: list[int] = []
    for i in order:
        width = rows[group[0]].tokens.shape[0] if group else rows[i].tokens.shape[0]
        if group and width * (len(group) + 1) > batch_tokens:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


@torch.no_grad()
def _shard(model: Any, rows: list[Rendered], layers: tuple[int, ...], batch_tokens: int, dtype: torch.dtype,
           autocast: str | None = None) -> dict:
    feats: list[torch.Tensor | None] = [None] * len(rows)
    finals: list[torch.Tensor | None] = [None] * len(rows)
    for group in _forward_batches(rows, batch_tokens):
        width = max(rows[i].tokens.shape[0] for i in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(group):
            n = rows[i].tokens.shape[0]
            ids[b, :n], mask[b, :n] = rows[i].tokens, 1
        with cpu_autocast(autocast):
            f, fin = target_features(model, ids, mask, layers, dtype=dtype)
        for b, i in enumerate(group):
            n = rows[i].tokens.shape[0]
            feats[i], finals[i] = f[b, :n].clone(), fin[b, :n].clone()
    lengths = torch.tensor([r.tokens.shape[0] for r in rows])
    return {"tokens": torch.cat([r.tokens for r in rows]), "loss_mask": torch.cat([r.loss_mask for r in rows]),
            "features": torch.cat(feats), "final": torch.cat(finals),
            "starts": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "positions": torch.tensor([r.position for r in rows])}


def build_conversation_features(model: Any, tokenizer: Any, source: str | Path, out_dir: str | Path, *,
                                split: str = "train", max_len: int = 1024, window: int = 64, batch_tokens: int = 4096,
                                max_tokens: float = math.inf, cache_gb: float = 40.0, minutes: float = math.inf,
                                dtype: str = "bfloat16", autocast: str | None = None, progress: bool = True) -> dict:
    """Write shards of the target's features along ``source``'s conversations into ``out_dir`` (resumable) and
    return the index (see the module glossary for the budget, the shard layout and the throughput)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    cpu_autocast(autocast)  # a bad value is an error before any work
    if not max_len >= 8 or not window >= 1 or not batch_tokens >= max_len:
        raise ValueError(f"need max_len >= 8, window >= 1 and batch_tokens >= max_len, got {max_len}, {window}, "
                         f"{batch_tokens}")
    if not cache_gb > 0 or not max_tokens > 0:
        raise ValueError(f"cache_gb and max_tokens must be > 0, got {cache_gb}, {max_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(source), "split": split, "model": _model_name(model), "max_len": max_len,
                "window": window, "dtype": dtype, "chat_template": bool(getattr(tokenizer, "chat_template", None))}
    if autocast is not None:  # folders written before the option keep their settings
        settings["autocast"] = autocast
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"settings": settings, "shards": []}
    if index["settings"] != settings:
        raise FeatureCacheError(f"{out} holds features made with {index['settings']}, not {settings}: use another "
                                "folder")
    layers = feature_layers(model.config.num_hidden_layers)
    counts = CleaningCounts()
    t0, forward_s, forward_tokens = time.time(), 0.0, 0
    tokens = sum(s["tokens"] for s in index["shards"])
    used = sum(s["bytes"] for s in index["shards"])
    stopped = "the source ended"
    bar = tqdm(desc=f"target features ({source}, {split})", unit="tok", unit_scale=True, initial=tokens,
               total=None if math.isinf(max_tokens) else int(max_tokens), disable=not progress)
    if [s["file"] for s in index["shards"]] != [f"conv_{w:05d}.pt" for w in range(len(index["shards"]))]:
        raise FeatureCacheError(f"{index_path} does not list its shards in order: use another folder")
    skip = _last_position(out, index["shards"][-1]) if index["shards"] else -1
    for w, rows in enumerate(_windows(source, split, tokenizer, max_len, window, counts, skip), len(index["shards"])):
        name = f"conv_{w:05d}.pt"
        if tokens >= max_tokens:
            stopped = f"max_tokens ({max_tokens:,.0f}) reached"
            break
        if (time.time() - t0) / 60 > minutes:
            stopped = f"the {minutes:g}-minute budget ended"
            break
        t1 = time.time()
        shard = _shard(model, rows, layers, batch_tokens, _DTYPES[dtype], autocast)
        forward_s += time.time() - t1
        n = int(shard["tokens"].shape[0])
        forward_tokens += n
        tmp = out / (name + ".tmp")
        torch.save(shard, tmp)
        size = tmp.stat().st_size
        if used + size > cache_gb * 1e9:
            tmp.unlink()
            stopped = f"the disk budget ({cache_gb:g} GB) is full"
            if not index["shards"]:
                raise FeatureCacheError(f"cache_gb={cache_gb:g} cannot hold one shard ({size / 1e9:.2f} GB)")
            break
        tmp.rename(out / name)
        tokens, used = tokens + n, used + size
        index["shards"].append({"file": name, "examples": len(rows), "tokens": n,
                                "answer_tokens": int(shard["loss_mask"].sum()), "bytes": size,
                                "last_position": rows[-1].position})
        index["tokens_per_s"] = round(forward_tokens / max(forward_s, 1e-9), 1)
        index_path.write_text(json.dumps(index, indent=1) + "\n")
        bar.update(n)
    bar.close()
    index["stopped"] = stopped
    # the cleaning of every conversation read, from the first one (done shards' conversations are read, not
    # rendered), up to where this run stopped
    index["cleaning"] = {k: v for k, v in vars(counts).items()}
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    return index


def _last_position(folder: Path, entry: dict) -> int:
    """The source position of a shard's last conversation (read from the shard when the index predates it)."""
    if "last_position" in entry:
        return int(entry["last_position"])
    return int(torch.load(folder / entry["file"], map_location="cpu", mmap=True, weights_only=True)["positions"][-1])


class ShardedExamples(Sequence):
    """The examples of a feature folder as a sequence of dicts (``tokens``, ``loss_mask``, ``features``,
    ``final``: views of memory-mapped shards, so tens of GB train in little RAM). ``max_tokens``: only the first
    shards, up to that many tokens (a prefix of the source: the data-scaling curve)."""

    def __init__(self, folder: str | Path, max_tokens: float = math.inf):
        folder = Path(folder)
        index_path = folder / "index.json"
        if not index_path.is_file():
            raise FeatureCacheError(f"no feature shards at {folder} (index.json missing)")
        self.index = json.loads(index_path.read_text())
        self._shards, self._rows = [], []
        tokens = 0
        for s in self.index["shards"]:
            if tokens >= max_tokens:
                break
            shard = torch.load(folder / s["file"], map_location="cpu", mmap=True, weights_only=True)
            for key in ("features", "final"):  # the large ones, read at random windows (see _MADV_RANDOM)
                _advise(shard[key], _MADV_RANDOM, whole=True)
            self._shards.append(shard)
            self._rows.extend((len(self._shards) - 1, e) for e in range(s["examples"]))
            tokens += s["tokens"]
        self.tokens = tokens
        self.answer_tokens = sum(s["answer_tokens"] for s in self.index["shards"][:len(self._shards)])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        s, e = self._rows[i]
        shard = self._shards[s]
        a, b = int(shard["starts"][e]), int(shard["starts"][e + 1])
        out = {k: shard[k][a:b] for k in ("tokens", "loss_mask", "features", "final")}
        for key in ("features", "final"):  # one read of exactly this example's rows, started now
            _advise(out[key], _MADV_WILLNEED)
        return out


__all__ = ["FeatureCacheError", "ShardedExamples", "build_conversation_features"]
