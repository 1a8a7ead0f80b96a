"""Calibration: the draft shape (chain length k, or a dynamic tree's size) and the drafter's CPU setting that
maximise expected tokens per second, from what this model costs and accepts on this machine.

Paper: the speed model of Leviathan et al. (ICML 2023, section 3.4: expected tokens per step over the cost of
a step), with the verification cost measured per width as EAGLE-2 / Sequoia size their trees; calibrated once
per model, drafter and machine, as vLLM and SGLang profile before serving.

Glossary:
    shape           :class:`DraftShape`: a chain of ``k`` drafts, or a dynamic tree ``(depth, top_k, num_nodes)``
                    sized per step by the measured cost model
    verify cost     the target's cached forward for w = 1 ... 32 new tokens at a 256-token context, as loaded
                    (:func:`~mmspec.drafters.cost_model.measure_cost_model`); the target is never packed, cast or
                    otherwise changed here: its numerics are the user's
    calibration run greedy decoding of the calibration prompts (``max_new_tokens`` each) with a chain of
                    ``k_max`` drafts, then with each candidate tree; every run's statistics are kept
    A               the number of drafts a chain step accepts; ``P(A >= i)`` for i = 1 ... k_max comes from the
                    chain run (a chain of k < k_max drafts the same first k tokens, so it accepts min(A, k))
    level           one drafter forward (one chain position); its seconds come from the chain run's drafter time
                    (the drafter's prefill left out) over its drafted positions
    overhead        per step, everything but the target's forward and the drafter (verification, cache
                    bookkeeping, the loop): measured in the chain run
    expected rate   chain k:  (1 + sum_{i<=k} P(A >= i)) / (verify(k + 1) + k level + overhead);
                    tree:     its run's tokens per step over its run's seconds per step (measured, not modelled)
                    plain:    1 / (verify(1) + overhead), the rate of decoding without drafts through the same loop
    choice          the best shape, or None (decode without drafts) when plain is expected to be faster: callers
                    that default to the calibration do not run drafts the model expects to cost more than they save
    packing         the drafter (never the target) is timed unpacked, packed for oneDNN in float32 and, where the
                    CPU runs bf16 natively (AMX / AVX512-BF16), packed as a bfloat16 copy (:mod:`mmspec.cpu_packing`)
                    when the build can pack; the fastest is kept and said (``drafter_packed``, ``drafter_dtype``);
                    drafts change, outputs do not (verification decides every token)
    cache           ``<cache_dir>/<key>.json``, the key hashing the target's and the drafter's weights (a
                    fingerprint), the candidate shapes and the machine (CPU model, speed flags, torch threads
                    and version): a second call with the same inputs reads it instead of measuring
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cpu_packing import (bf16_native, is_packed, pack_linear_weights, packed_dtype, packing_available,
                          unpack_linear_weights)
from .drafters.cost_model import CostModel, measure_cost_model
from .drafters.feature import FeatureDrafter
from .drafters.tree import DynamicTree
from .engine import generate
from .errors import MMSpecError
from .stats import GenerationStats

#: the widths the verification cost is measured at (tokens per target forward)
VERIFY_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
#: part of the cache key: a change to what is measured or how invalidates older entries
CACHE_VERSION = 3
#: candidate dynamic trees (depth, top_k, num_nodes), small to large
DEFAULT_TREES = ((4, 4, 8), (6, 8, 24))


class CalibrationError(MMSpecError):
    """Calibration input that cannot be measured (no prompts, a bad shape)."""


@dataclass(frozen=True)
class DraftShape:
    """A chain of ``k`` drafts (``tree`` None) or a dynamic tree ``(depth, top_k, num_nodes)``."""

    k: int = 0
    tree: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.tree is None and not (isinstance(self.k, int) and self.k >= 1):
            raise CalibrationError(f"a chain needs k >= 1, got {self.k!r}")
        if self.tree is not None and (len(self.tree) != 3 or any(not (isinstance(v, int) and v >= 1)
                                                                 for v in self.tree)):
            raise CalibrationError(f"a tree is (depth, top_k, num_nodes) of ints >= 1, got {self.tree!r}")

    @property
    def label(self) -> str:
        return f"chain k={self.k}" if self.tree is None else "tree {}/{}/{}".format(*self.tree)


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured and chose (see the module glossary)."""

    best: DraftShape
    expected_tokens_per_s: dict  # shape label -> expected tokens per second
    plain_tokens_per_s: float
    cost: CostModel
    level_seconds: float
    overhead_seconds: float
    accept_at_least: tuple  # P(A >= i), i = 1 .. k_max
    runs: dict  # shape label -> {"tau", "step_seconds", "tokens_per_s", "steps"} of the measured runs
    drafter_packed: bool
    packing: dict  # {"unpacked", "packed"[, "packed bf16"]: level seconds} (empty when not measured)
    machine: str
    seconds: float  # how long the calibration took
    cached: bool = False
    notes: list = field(default_factory=list)
    drafter_dtype: str = "float32"  # of the packed copy: "float32" or "bfloat16" (with drafter_packed)

    @property
    def pays(self) -> bool:
        """Whether the best shape is expected to beat decoding without drafts."""
        return self.expected_tokens_per_s[self.best.label] > self.plain_tokens_per_s

    @property
    def choice(self) -> DraftShape | None:
        """What to decode with: the best shape, or None (no drafts) when decoding without them is expected to be
        faster on this machine."""
        return self.best if self.pays else None

    @property
    def level_cost(self) -> float:
        """c: one drafter forward in 1-token target forwards."""
        return self.level_seconds / self.cost.seconds[0]

    def ceiling(self, tau: float, drafts_per_step: float, levels: float) -> float:
        """The speedup ``tau`` allows with the measured costs and no loop overhead:
        tau / (verify(1 + d) + L c), d the mean drafts per row step, L the drafter forwards per step (chain: d,
        tree: its depth, prompt lookup: 0), c :attr:`level_cost`."""
        return tau / (self.cost.relative(max(1, round(1 + drafts_per_step))) + levels * self.level_cost)

    def summary(self) -> str:
        top = sorted(self.expected_tokens_per_s.items(), key=lambda kv: -kv[1])[:4]
        head = (f"calibrated draft shape: {self.best.label}" if self.pays else
                f"no drafts: decoding without them is expected to be faster here (best shape {self.best.label})")
        return (f"{head} (expected {self.expected_tokens_per_s[self.best.label]:.1f}"
                f" tok/s; without drafts {self.plain_tokens_per_s:.1f}; "
                + ", ".join(f"{k} {v:.1f}" for k, v in top) + f"); drafter {self.drafter_setting}"
                + (" (cached)" if self.cached else f" ({self.seconds:.0f} s)"))

    @property
    def drafter_setting(self) -> str:
        """``unpacked``, ``packed`` or ``packed bf16``: the drafter's CPU setting measured fastest."""
        if not self.drafter_packed:
            return "unpacked"
        return "packed bf16" if self.drafter_dtype == "bfloat16" else "packed"

    def to_json(self) -> dict:
        d = asdict(self)
        d["best"] = {"k": self.best.k, "tree": list(self.best.tree) if self.best.tree else None}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Calibration":
        d = dict(d)
        best = d.pop("best")
        cost = d.pop("cost")
        return cls(best=DraftShape(best["k"], tuple(best["tree"]) if best["tree"] else None),
                   cost=CostModel(widths=tuple(cost["widths"]), seconds=tuple(cost["seconds"]),
                                  level_cost=cost.get("level_cost", 0.0), device=cost.get("device", "")),
                   accept_at_least=tuple(d.pop("accept_at_least")), **{**d, "cached": True})


# ---------------------------------------------------------------------------------------------------- the model
def chain_tokens_per_step(accept_at_least: Sequence[float], k: int) -> float:
    """Expected tokens a chain step of ``k`` drafts emits: 1 + sum_{i <= k} P(A >= i)."""
    return 1.0 + float(sum(accept_at_least[:k]))


def chain_rate(accept_at_least: Sequence[float], k: int, cost: CostModel, level_seconds: float,
               overhead_seconds: float) -> float:
    """Expected tokens per second of a chain of ``k`` drafts (see the glossary)."""
    step = cost.seconds[0] * cost.relative(k + 1) + k * level_seconds + overhead_seconds
    return chain_tokens_per_step(accept_at_least, k) / step


def accept_at_least(accepted_length_counts: Sequence[int], k_max: int) -> tuple[float, ...]:
    """P(A >= i) for i = 1 .. k_max from a histogram of accepted drafts per row step."""
    total = sum(accepted_length_counts)
    if total == 0:
        return (0.0,) * k_max
    return tuple(sum(accepted_length_counts[i:]) / total for i in range(1, k_max + 1))


# ---------------------------------------------------------------------------------------------------- measuring
def machine_key() -> str:
    """CPU model, the speed-relevant CPU flags, torch threads and version (or the CUDA device)."""
    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name()} torch {torch.__version__}"
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name" and model in ("", platform.processor(), platform.machine()):
                model = v.strip()
            elif k.strip() == "flags" and not flags:
                flags = [f for f in v.split() if f in ("avx2", "avx_vnni") or f.startswith(("avx512", "amx"))]
    except OSError:  # pragma: no cover - not Linux
        pass
    return f"{model} [{' '.join(flags) or 'no avx2/avx512/amx'}] threads {torch.get_num_threads()} torch {torch.__version__}"


def fingerprint(module: torch.nn.Module | None) -> str:
    """A short hash of a module's parameter names, shapes, dtypes and first values (cheap, weight-sensitive)."""
    if module is None:
        return "none"
    h = hashlib.sha1()
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)[:64].float().cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMSPEC_CACHE", Path.home() / ".cache" / "mmspec")) / "calibration"


def _run(target, drafter, prompts, k, max_new_tokens, eos_token_id):
    stats = GenerationStats()
    for ids in prompts:
        out = generate(target, ids, drafter=drafter, num_draft_tokens=k, max_new_tokens=max_new_tokens,
                       temperature=0.0, eos_token_id=eos_token_id)
        s = out.stats
        for name in ("steps", "row_steps", "drafted_tokens", "accepted_tokens", "prefill_time", "drafter_prefill_time",
                     "target_time", "drafter_time", "total_time"):
            setattr(stats, name, getattr(stats, name) + getattr(s, name))
        counts = stats.accepted_length_counts
        counts.extend([0] * (len(s.accepted_length_counts) - len(counts)))
        for i, c in enumerate(s.accepted_length_counts):
            counts[i] += c
    return stats


def _decode_seconds(s) -> float:
    return max(s.total_time - s.prefill_time - s.drafter_prefill_time, 1e-9)


def calibrate(target: torch.nn.Module, drafter_for: Callable[[DraftShape, CostModel], Any],
              prompts: Sequence[torch.Tensor], *, k_max: int = 8, trees: Sequence[tuple[int, int, int]] = DEFAULT_TREES,
              max_new_tokens: int = 32, drafter_module: torch.nn.Module | None = None, eos_token_id: Any = None,
              cache_dir: str | Path | None = "default", key: str = "", widths: Sequence[int] = VERIFY_WIDTHS,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Measure and choose the draft shape for ``target`` with the drafters ``drafter_for(shape, cost_model)``
    builds, on ``prompts`` (token id tensors [1, n]); see the module glossary. ``drafter_module``: the drafter's
    weights (for packing and the cache key); ``cache_dir`` None: always measure; ``key``: extra text for the
    cache key (e.g. the drafter's folder)."""
    prompts = [p if p.dim() == 2 else p[None] for p in prompts]
    if not prompts or any(p.shape[0] != 1 or p.shape[1] < 1 for p in prompts):
        raise CalibrationError("calibrate needs at least one prompt of shape [1, n] with n >= 1")
    if not (isinstance(k_max, int) and k_max >= 1) or max_new_tokens < 4:
        raise CalibrationError(f"need k_max >= 1 and max_new_tokens >= 4, got {k_max!r}, {max_new_tokens!r}")
    shapes = [DraftShape(tree=tuple(int(v) for v in t)) for t in trees]
    machine = machine_key()
    ident = json.dumps({"version": CACHE_VERSION, "target": fingerprint(target), "target_packed": is_packed(target),
                        "drafter": fingerprint(drafter_module), "key": key,
                        "k_max": k_max, "trees": [s.tree for s in shapes], "max_new_tokens": max_new_tokens,
                        "prompts": [p.tolist() for p in prompts], "widths": list(widths), "machine": machine})
    path = None
    if cache_dir is not None:
        folder = default_cache_dir() if cache_dir == "default" else Path(cache_dir)
        path = folder / (hashlib.sha1(ident.encode()).hexdigest()[:20] + ".json")
        if path.is_file():
            try:
                cached = Calibration.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError):
                cached = None  # an unreadable cache entry is measured again
            if cached is not None:
                if drafter_module is not None:  # the setting it measured faster (a fresh process loads unpacked)
                    want = (getattr(torch, cached.drafter_dtype) if cached.drafter_packed and _can_pack(drafter_module)
                            else None)
                    if packed_dtype(drafter_module) != want:
                        unpack_linear_weights(drafter_module)
                        if want is not None:
                            pack_linear_weights(drafter_module, want)
                return cached
    say = progress or (lambda msg: None)
    t0 = time.time()
    say("calibrating: the target's verification cost for w = 1 ... 32")
    cost = measure_cost_model(target, widths=tuple(widths), repeats=5)
    chain = DraftShape(k=k_max)
    notes: list[str] = []
    packing: dict = {}
    packed = False
    say(f"calibrating: a chain of {k_max} drafts")
    _run(target, drafter_for(chain, cost), prompts[:1], k_max, 4, eos_token_id)  # warm-up: first calls allocate
    s = _run(target, drafter_for(chain, cost), prompts, k_max, max_new_tokens, eos_token_id)
    dtype = "float32"
    if drafter_module is not None and _can_pack(drafter_module):
        settings = [("packed", torch.float32)] + ([("packed bf16", torch.bfloat16)] if bf16_native() else [])
        if not bf16_native():
            notes.append("drafter bf16 not measured (no native bf16 on this CPU: emulated bf16 is slower)")
        packing = {"unpacked": _level(s)}
        best = (packing["unpacked"], None, s)
        for name, dt in settings:
            pack_linear_weights(drafter_module, dt)
            say(f"calibrating: the same chain with the drafter {name} for oneDNN")
            _run(target, drafter_for(chain, cost), prompts[:1], k_max, 4, eos_token_id)  # the same warm-up
            sp = _run(target, drafter_for(chain, cost), prompts, k_max, max_new_tokens, eos_token_id)
            packing[name] = _level(sp)
            if packing[name] < best[0]:
                best = (packing[name], dt, sp)
            unpack_linear_weights(drafter_module)
        if best[1] is not None:
            pack_linear_weights(drafter_module, best[1])
            packed, dtype = True, str(best[1]).removeprefix("torch.")
        s = best[2]
    elif drafter_module is None:
        notes.append("drafter packing not measured (no drafter_module)")
    else:
        notes.append("drafter packing not measured (this build or device cannot pack)")
    level = (s.drafter_time - s.drafter_prefill_time) / max(s.drafted_tokens, 1)
    target_per_step = s.target_time / max(s.steps, 1)
    overhead = max(_decode_seconds(s) / max(s.steps, 1) - target_per_step - level * s.drafted_tokens / max(s.steps, 1),
                   0.0)
    acc = accept_at_least(s.accepted_length_counts, k_max)
    runs = {chain.label: {"tau": (s.accepted_tokens + s.row_steps) / max(s.row_steps, 1),
                          "step_seconds": _decode_seconds(s) / max(s.steps, 1),
                          "tokens_per_s": (s.accepted_tokens + s.row_steps) / _decode_seconds(s), "steps": s.steps}}
    expected = {DraftShape(k=k).label: chain_rate(acc, k, cost, level, overhead) for k in range(1, k_max + 1)}
    for shape in shapes:
        say(f"calibrating: a dynamic {shape.label}")
        st = _run(target, drafter_for(shape, cost), prompts, None, max_new_tokens, eos_token_id)
        tau = (st.accepted_tokens + st.row_steps) / max(st.row_steps, 1)
        rate = (st.accepted_tokens + st.row_steps) / _decode_seconds(st)
        runs[shape.label] = {"tau": tau, "step_seconds": _decode_seconds(st) / max(st.steps, 1), "tokens_per_s": rate,
                             "steps": st.steps}
        expected[shape.label] = rate
    labels = {DraftShape(k=k).label: DraftShape(k=k) for k in range(1, k_max + 1)} | {s.label: s for s in shapes}
    best = labels[max(expected, key=expected.get)]
    cal = Calibration(best=best, expected_tokens_per_s=expected,
                      plain_tokens_per_s=1.0 / (cost.seconds[0] + overhead), cost=cost, level_seconds=level,
                      overhead_seconds=overhead, accept_at_least=acc, runs=runs, drafter_packed=packed,
                      packing=packing, machine=machine, seconds=time.time() - t0, notes=notes, drafter_dtype=dtype)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cal.to_json(), indent=1) + "\n")
    return cal


def head_drafters(head: Any) -> Callable[[DraftShape, CostModel], Any]:
    """``drafter_for`` for an EAGLE-3 head: chains (the loop passes k) or dynamic trees sized per step by the cost
    model."""
    def drafter_for(shape: DraftShape, cost: CostModel) -> Any:
        if shape.tree is None:
            return FeatureDrafter(head)
        depth, top_k, nodes = shape.tree
        return FeatureDrafter(head, tree=DynamicTree(depth=depth, top_k=top_k, num_nodes=nodes, cost_model=cost))
    return drafter_for


def _level(s: GenerationStats) -> float:
    """Seconds of one drafter forward in a calibration run (its prefill left out)."""
    return (s.drafter_time - s.drafter_prefill_time) / max(s.drafted_tokens, 1)


def _can_pack(module: torch.nn.Module) -> bool:
    p = next(module.parameters(), None)
    return packing_available() and p is not None and p.device.type == "cpu" and p.dtype == torch.float32


__all__ = ["DEFAULT_TREES", "VERIFY_WIDTHS", "Calibration", "CalibrationError", "DraftShape", "accept_at_least",
           "calibrate", "chain_rate", "head_drafters", "chain_tokens_per_step", "default_cache_dir", "fingerprint", "machine_key"]
