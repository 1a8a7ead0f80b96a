"""Training-step time of the zoo's AR image target: fp32 against bf16 autocast, interleaved.

Glossary:
    step        one optimiser step of ``mmspec.zoo.train_image``'s target stage: render and encode a
                batch of scenes, forward, cross-entropy, backward, gradient clipping, AdamW
    autocast    ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass (weights and
                AdamW state stay fp32), what the ``full`` preset uses; ``fp32`` is the ``fp32`` preset

The two modes alternate in rounds on fresh copies of the same initial model, so drift of the machine's
load hits both; the table gives the median step time of each mode and their ratio from this run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HEADING = "## Zoo training step (bf16 autocast)"


def time_steps(model, opt, tok, cfg, bf16: bool, first_step: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` training steps of the target stage's recipe."""
    from mmspec.zoo.train_image import ar_loss
    from mmspec.zoo.training import optimizer_step

    times = []
    for step in range(first_step, first_step + steps):
        t0 = time.perf_counter()
        optimizer_step(model, opt, ar_loss(model, tok, cfg.seed, step, cfg.ar_batch, 64, bf16))
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    from mmspec.image_gen import ARImageModel, VQTokenizer
    from mmspec.zoo import WEIGHTS_DIR
    from mmspec.zoo.train_image import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round (after one warm-up)")
    ap.add_argument("--quick", action="store_true", help="one round of two steps on a small batch")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    cfg = PRESETS["full"]
    if a.quick:
        a.rounds, a.steps, cfg = 1, 2, replace(cfg, ar_batch=2)
    tok = VQTokenizer.from_pretrained(WEIGHTS_DIR / "image" / "tokenizer").resized(64)
    torch.manual_seed(0)
    init = ARImageModel(cfg.target).state_dict()
    runs = {}
    for mode in (False, True):
        model = ARImageModel(cfg.target)
        model.load_state_dict(init)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.target_budget.lr)
        time_steps(model, opt, tok, cfg, mode, 0, 1)  # warm-up
        runs[mode] = (model, opt, [])
    for r in range(a.rounds):
        for mode in ((False, True) if r % 2 == 0 else (True, False)):
            model, opt, times = runs[mode]
            times += time_steps(model, opt, tok, cfg, mode, 1 + r * a.steps, a.steps)
    fp32, bf16 = (statistics.median(runs[m][2]) * 1000 for m in (False, True))
    table = (
        f"{HEADING}\n\nCommand: `python -m benchmarks.zoo_training` — {_dt.date.today()}, {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}. The AR target of `mmspec.zoo.train_image` "
        f"(6 × 128, batch {cfg.ar_batch}, 16 × 16 tokens plus the caption prefix): one full training step, data "
        f"included; {a.rounds} interleaved rounds of {a.steps} steps per mode after a warm-up step; medians.\n\n"
        f"| forward pass | ms / step | ratio to fp32 |\n|---|---|---|\n"
        f"| fp32 (`--preset fp32`) | {fp32:.0f} | 1.00 |\n"
        f"| bf16 autocast (`--preset full`) | {bf16:.0f} | {bf16 / fp32:.2f} |\n"
    )
    print(table)
    if a.out:
        from ._report import write_section

        write_section(a.out, HEADING, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
