"""The one training loop of mmspec: every drafter :mod:`mmspec.distill` trains and every model of the zoo
(:mod:`mmspec.zoo`) goes through :func:`train_loop`; a trainer brings only its model, its loss and its data.

Papers: AdamW (Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019); the cosine
schedule of SGDR (Loshchilov and Hutter, ICLR 2017), here with a linear warm-up and a floor at 10 %.

Glossary:
    loss_fn      ``loss_fn(step)``: the trainer's loss (a scalar tensor) on the batch of that step, or
                 ``(loss, metrics)`` with ``metrics`` a dict of floats or lists of floats (accuracy per TTT
                 step, per head) for the progress bar
    step batch   every batch is a pure function of (seed, step) (:func:`step_seed`), so a resumed run sees
                 exactly the batches an uninterrupted run would have seen
    LoopConfig   every setting of the loop, with no defaults: each trainer writes out its own values
                 (schedule, peak learning rate, warm-up, AdamW betas and weight decay, gradient-clipping
                 norm, save cadence)
    schedule     ``"cosine"``: linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to 10 % of
                 it at ``steps``; ``"linear"``: the warm-up ramp times a straight line from ``lr`` at step 0
                 to 10 % at ``steps`` (the distilled drafter LM's)
    checkpoint   one file holding ``{"model", "opt", "step"}`` and the trainer's ``extra`` entries, written
                 every ``save_every`` steps and at the end, through a temporary file and a rename; a run
                 that finds it continues from it
    budget       ``steps`` ends the schedule; ``minutes`` (a wall-clock cap) may stop the run earlier, after
                 a save: a later run continues
    EMA          the loss and the metrics averaged with weight 0.95 on the past (the bar, ``final_loss``)
    non-finite   a NaN or infinite loss or gradient norm stops the run with
                 :class:`~mmspec.errors.NonFiniteError` before the optimiser step; the checkpoint on disk
                 stays the last good one
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Union

import torch
from tqdm.auto import tqdm

from ..errors import MethodParameterError, NonFiniteError

SCHEDULES = ("cosine", "linear")

Metrics = dict[str, Union[float, list[float]]]
LossFn = Callable[[int], Union[torch.Tensor, tuple[torch.Tensor, Metrics]]]


@dataclass(frozen=True)
class LoopConfig:
    steps: int  # the schedule's length (``minutes`` may stop earlier; a rerun continues)
    lr: float  # peak learning rate
    warmup: int  # steps of the linear warm-up
    schedule: str  # one of SCHEDULES (see the glossary)
    betas: tuple[float, float]  # AdamW's
    weight_decay: float  # AdamW's (decoupled)
    clip_norm: float  # the gradient's global norm is clipped to this before every step
    save_every: int  # checkpoint cadence, in steps

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise MethodParameterError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name, low in (("steps", 0), ("warmup", 0), ("save_every", 1)):
            if getattr(self, name) < low:
                raise MethodParameterError(f"{name} must be >= {low}, got {getattr(self, name)!r}")
        if not (self.lr > 0 and self.clip_norm > 0 and self.weight_decay >= 0):
            raise MethodParameterError(f"lr and clip_norm must be > 0 and weight_decay >= 0, got {self}")


@dataclass(frozen=True)
class LoopResult:
    name: str
    steps_done: int
    finished: bool  # the schedule ran to its end (not cut by the time cap)
    final_loss: float | None  # EMA of the loss; None when this call ran no step (resumed a finished run)
    seconds: float


class Weights(NamedTuple):
    """What a checkpoint stores of the module and how it is put back (default: the whole state dict, strict)."""
    get: Callable[[], dict[str, torch.Tensor]]
    load: Callable[[dict[str, torch.Tensor]], Any]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s batch: the batch is a pure function of (seed, step)."""
    return seed * 1_000_003 + step


def lr_at(step: int, config: LoopConfig) -> float:
    """The learning rate of ``step`` under ``config.schedule`` (see the glossary)."""
    if config.schedule == "linear":
        ramp = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
        return config.lr * ramp * (0.1 + 0.9 * (1 - step / max(config.steps, 1)))
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    frac = min(1.0, (step - config.warmup) / max(config.steps - config.warmup, 1))
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def read_checkpoint(path: str | os.PathLike) -> dict | None:
    """A checkpoint's contents (on the CPU), or None when there is none yet."""
    path = Path(path)
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def _non_finite(where: str, what: str, value: float) -> NonFiniteError:
    return NonFiniteError(
        f"{where}: the {what} is {value} (NaN/inf); stopped before the optimiser step, the checkpoint on disk is "
        "the last good one. It usually comes from features overflowing float16 (a residual stream above 65,504 "
        "becomes inf there and NaN here: keep the target's hidden states in bfloat16 or float32, as mmspec's own "
        "shards do), activations overflowing under half-precision autocast, or a learning rate too high for the "
        "batch")


def optimizer_step(params: Iterable[torch.Tensor], opt: torch.optim.Optimizer, loss: torch.Tensor, *,
                   clip_norm: float, where: str = "training") -> float:
    """Check the loss is finite, backward, clip the gradients' global norm to ``clip_norm`` (and check it),
    step ``opt``; returns the loss value. :class:`NonFiniteError` (naming ``where``) leaves the weights alone."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _non_finite(where, "loss", value)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(params), clip_norm))
    if not math.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise _non_finite(where, "gradient norm", norm)
    opt.step()
    return value


def _ema(old: Any, new: Any) -> Any:
    if isinstance(new, (list, tuple)):
        return list(new) if old is None else [_ema(a, b) for a, b in zip(old, new)]
    return new if old is None or math.isnan(old) else 0.95 * old + 0.05 * new


def _postfix(loss: float, metrics: Metrics) -> dict[str, str]:
    shown = {"loss": f"{loss:.4f}"}
    for name, value in metrics.items():
        shown[name] = "/".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"{value:.2f}"
    return shown


def train_loop(name: str, module: torch.nn.Module, loss_fn: LossFn, config: LoopConfig,
               checkpoint: str | os.PathLike, *, minutes: float = math.inf, progress: bool = True,
               weights: Weights | None = None, extra: dict[str, Any] | None = None,
               state: dict | None = None) -> LoopResult:
    """Train the parameters of ``module`` that require a gradient by AdamW on ``loss_fn(step)`` until
    ``config.steps`` (or ``minutes``), continuing from ``checkpoint`` when it exists; ``module`` is in train
    mode during the run and in eval mode after it.

    ``name`` titles the progress bar and the errors; ``weights``: what the checkpoint stores of ``module``;
    ``extra``: entries saved next to the weights (what a trainer needs to rebuild its model before resuming);
    ``state``: the checkpoint's contents when the caller has already read them (:func:`read_checkpoint`) to
    build ``module``, else the loop reads ``checkpoint``."""
    path = Path(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    weights = weights or Weights(module.state_dict, module.load_state_dict)
    state = state if state is not None else read_checkpoint(path)
    step = 0
    if state is not None:
        weights.load(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"model": weights.get(), "opt": opt.state_dict(), "step": step, **(extra or {})}, tmp)
        os.replace(tmp, path)

    module.train()
    start = time.perf_counter()
    loss_ema, metrics_ema = None, {}
    bar = tqdm(total=config.steps, initial=step, desc=name, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        while step < config.steps and (time.perf_counter() - start) / 60 < minutes:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, config)
            out = loss_fn(step)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            value = optimizer_step(params, opt, loss, clip_norm=config.clip_norm,
                                   where=f"training run {name!r} at step {step}")
            step += 1
            loss_ema = _ema(loss_ema, value)
            metrics_ema = {k: _ema(metrics_ema.get(k), v) for k, v in metrics.items()}
            bar.update(1)
            bar.set_postfix(_postfix(loss_ema, metrics_ema))
            if step % config.save_every == 0 and step < config.steps:
                save()
    finally:
        bar.close()
    save()
    module.eval()
    return LoopResult(name, step, step >= config.steps, loss_ema, time.perf_counter() - start)
