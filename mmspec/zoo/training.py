"""A small resumable training loop shared by the zoo's training scripts.

Glossary:
    run dir      a working directory holding ``<name>.ckpt.pt`` (model + optimizer state + step) while
                 a stage trains; re-running the same command resumes from it
    step batch   every batch is a pure function of (seed, step), so a resumed run sees exactly the
                 batches an uninterrupted run would have seen
    budget       ``steps`` (the schedule's length) and ``minutes`` (a wall-clock cap: the stage stops
                 early, saves, and a later run continues)

Schedule: linear warm-up then cosine decay to 10 % (the usual recipe for small transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class StageBudget:
    steps: int
    minutes: float = float("inf")
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    save_every: int = 100


@dataclass(frozen=True)
class StageResult:
    name: str
    steps_done: int
    finished: bool  # the schedule ran to its end (not cut by the time cap)
    final_loss: float | None  # EMA of the loss; None when this call ran no step (resumed a finished stage)
    seconds: float


def lr_at(step: int, budget: StageBudget) -> float:
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    frac = (step - budget.warmup) / max(budget.steps - budget.warmup, 1)
    return budget.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def optimizer_step(module: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1, step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def run_stage(name: str, module: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], budget: StageBudget,
              run_dir: str | os.PathLike, *, progress: bool = True,
              on_save: Callable[[int], None] | None = None) -> StageResult:
    """Train ``module`` by AdamW on ``loss_fn(step)`` for ``budget.steps`` steps, resuming from
    ``run_dir/<name>.ckpt.pt`` if present.  ``loss_fn`` builds its own batch from ``step``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / f"{name}.ckpt.pt"
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=budget.lr,
                            betas=(0.9, 0.98), weight_decay=budget.weight_decay)
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": module.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
        os.replace(tmp, ckpt)
        if on_save is not None:
            on_save(step)

    module.train()
    start = time.perf_counter()
    loss_ema = float("nan")
    bar = tqdm(total=budget.steps, initial=step, desc=name, disable=not progress, dynamic_ncols=True)
    while step < budget.steps:
        if (time.perf_counter() - start) / 60 > budget.minutes:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, budget)
        value = optimizer_step(module, opt, loss_fn(step))
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if step % budget.save_every == 0 and step < budget.steps:
            save()
    bar.close()
    save()
    module.eval()
    return StageResult(name, step, step >= budget.steps, None if math.isnan(loss_ema) else loss_ema,
                       time.perf_counter() - start)


def training_cli(argv: list[str] | None, *, description: str, family: str, stages: Sequence[str],
                 presets: dict[str, Any], out_help: str,
                 check: Callable[[list[str], Path], str | None] | None = None,
                 train: Callable[[str, Any, Path, Path, bool, float], StageResult]) -> int:
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
