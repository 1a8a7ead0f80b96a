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

import statistics
import sys
from dataclasses import replace

import torch

from ._harness import arg_parser, begin, interleave, md_table, provenance, report, time_calls

HEADING = "## Zoo training step (bf16 autocast)"


def main(argv: list[str] | None = None) -> int:
    from mmspec.image_gen import ARImageModel, VQTokenizer

    from mmspec.zoo import WEIGHTS_DIR
    from mmspec.distill.loop import optimizer_step
    from mmspec.zoo.train_image import PRESETS, ar_loss

    ap = arg_parser("zoo_training", __doc__, quick={"rounds": 1, "steps": 2}, quick_also="batch 2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode and round (after one warm-up)")
    a = ap.parse_args(argv)
    load_before = begin(torch.get_num_threads())
    cfg = PRESETS["full"]
    if a.quick:
        cfg = replace(cfg, ar_batch=2)
    tok = VQTokenizer.from_pretrained(WEIGHTS_DIR / "image" / "tokenizer").resized(64)
    torch.manual_seed(0)
    init = ARImageModel(cfg.target).state_dict()

    def mode(bf16: bool):
        """``a.steps`` training steps of the target stage's recipe per call (the step counter runs on), each
        timed; the call's result is their seconds."""
        model = ARImageModel(cfg.target)
        model.load_state_dict(init)
        model.train()
        budget = cfg.target_budget  # the target stage's loop settings (mmspec.distill.loop.train_loop's AdamW)
        opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=budget.betas, weight_decay=budget.weight_decay)
        step = [0]

        def one_step():
            loss = ar_loss(model, tok, cfg.seed, step[0], cfg.ar_batch, 64, bf16)
            optimizer_step(model.parameters(), opt, loss, clip_norm=budget.clip_norm)
            step[0] += 1

        one_step()  # warm-up
        return lambda rnd, seed: time_calls(one_step, a.steps)

    # a round per --rounds: each mode runs --steps steps, who goes first rotating from round to round
    runs = interleave({"fp32": mode(False), "bf16": mode(True)}, list(range(a.rounds)), warmup=False,
                      label="zoo training")
    fp32, bf16 = (1000 * statistics.median(t for ts in runs.results(m) for t in ts) for m in ("fp32", "bf16"))
    table = "\n".join([
        HEADING, "",
        f"{provenance('zoo_training', argv, load_before)} The AR target of `mmspec.zoo.train_image` (6 × 128, "
        f"batch {cfg.ar_batch}, 16 × 16 tokens plus the caption prefix): one full training step, data included; "
        f"{a.rounds} interleaved rounds of {a.steps} steps per mode after a warm-up step; medians.", "",
        *md_table(["forward pass", "ms / step", "ratio to fp32"],
                  [["fp32 (`--preset fp32`)", f"{fp32:.0f}", "1.00"],
                   ["bf16 autocast (`--preset full`)", f"{bf16:.0f}", f"{bf16 / fp32:.2f}"]]), ""])
    report(table, a.out, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
