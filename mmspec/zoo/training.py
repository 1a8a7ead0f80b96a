"""What the zoo's training scripts share: a stage's loop settings, its checkpoint, and the command line.

Glossary:
    stage        one model a script trains (``vq``, ``target``, ...), through the one loop of
                 :mod:`mmspec.distill.loop`; its settings are a :class:`~mmspec.distill.loop.LoopConfig`
                 made by :func:`zoo_stage`: warm-up + cosine to 10 %, AdamW betas (0.9, 0.98), gradient norm
                 clipped to 1, and the stage's own steps, peak learning rate, warm-up, weight decay and
                 save cadence
    run dir      a working directory holding ``<name>.ckpt.pt`` (model + optimizer state + step) while
                 a stage trains; re-running the same command resumes from it
    step batch   every batch is a pure function of (seed, step), so a resumed run sees exactly the
                 batches an uninterrupted run would have seen
    budget       ``steps`` (the schedule's length) and ``--minutes`` (a wall-clock cap: the stage stops
                 early, saves, and a later run continues; the script exits 3)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmspec.distill.loop import LoopConfig, LoopResult, LossFn, train_loop


def zoo_stage(*, steps: int, lr: float, warmup: int, weight_decay: float, save_every: int) -> LoopConfig:
    """The loop settings of one zoo stage: the stage's numbers, and what every zoo stage shares (warm-up +
    cosine to 10 %, AdamW betas (0.9, 0.98), gradient norm clipped to 1)."""
    return LoopConfig(steps=steps, lr=lr, warmup=warmup, schedule="cosine", betas=(0.9, 0.98),
                      weight_decay=weight_decay, clip_norm=1.0, save_every=save_every)


def run_stage(name: str, module: torch.nn.Module, loss_fn: LossFn, budget: LoopConfig, run_dir: str | os.PathLike,
              *, minutes: float = math.inf, progress: bool = True) -> LoopResult:
    """Train ``module`` on ``loss_fn(step)`` (:func:`~mmspec.distill.loop.train_loop`), checkpointed as
    ``run_dir/<name>.ckpt.pt``."""
    return train_loop(name, module, loss_fn, budget, Path(run_dir) / f"{name}.ckpt.pt", minutes=minutes,
                      progress=progress)


def training_cli(argv: list[str] | None, *, description: str, family: str, stages: Sequence[str],
                 presets: dict[str, Any], out_help: str,
                 check: Callable[[list[str], Path], str | None] | None = None,
                 train: Callable[[str, Any, Path, Path, bool, float], LoopResult]) -> int:
    """The command line shared by the zoo's training scripts: parse, run the chosen stages in their
    canonical order, log each to ``OUT/training.json``; exit 2 on bad input, 3 when the time cap cut a
    stage (run again to resume).  ``train(stage, cfg, out, run_dir, progress, minutes)`` trains one stage;
    ``check(stages, out)`` may return an error message before anything runs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--run-dir", default=None,
                   help=f"checkpoints for resuming (default: ~/.cache/mmspec/train_{family}/PRESET)")
    p.add_argument("--stages", default=",".join(stages), help=f"comma-separated subset of {','.join(stages)}")
    p.add_argument("--preset", default="full", choices=sorted(presets))
    p.add_argument("--minutes", type=float, default=float("inf"), help="wall-clock cap per stage (resume later)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    chosen = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in chosen if s not in stages]
    if bad:
        print(f"error: unknown stage(s) {bad}; choose from {tuple(stages)}", file=sys.stderr)
        return 2
    chosen = sorted(set(chosen), key=list(stages).index)  # dependencies come first
    out = Path(a.out)
    problem = check(chosen, out) if check else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = presets[a.preset]
    run_dir = Path(a.run_dir) if a.run_dir else Path.home() / ".cache" / "mmspec" / f"train_{family}" / a.preset
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "training.json"
    for stage in chosen:
        t0 = time.perf_counter()
        res = train(stage, cfg, out, run_dir, not a.no_progress, a.minutes)
        log = json.loads(log_file.read_text()) if log_file.is_file() else {}  # other stages may run in parallel
        log[stage] = {**asdict(res), "preset": a.preset, "wall_s": round(time.perf_counter() - t0, 1)}
        log_file.write_text(json.dumps(log, indent=2) + "\n")
        if not res.finished:
            print(f"{stage}: stopped at step {res.steps_done} (time cap); run again to resume", file=sys.stderr)
            return 3
    return 0
