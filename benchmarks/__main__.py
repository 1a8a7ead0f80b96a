"""``python -m benchmarks``: every table of benchmarks/RESULTS.md and its figures, in one command.

Runs, one after the other (never concurrently: 2-core timings), the text benchmark (toy pair, then
SmolLM2-135M-Instruct with its trained drafters), the VLM
benchmark on the zoo pair, the image-generation benchmark on the zoo image models, draft trees
against chains (and MuLo-SD on the cached loop), Test-Time Speculation on SmolLM2 under a domain
shift, blockwise heads, collaborative decoding via speculation (CoS), SmolLM2 over pipeline stages
(naive pipelined SD and FlowSpec), and the zoo's
training-step benchmark (fp32 against bf16 autocast), each an interleaved run against its own
baseline, and writes the sections of ``--out`` plus the PNGs (speed-quality, acceptance histograms)
into ``--plots``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import (blockwise, collaborative, image_gen, mulo_bias, pipeline, smollm2, smollm2_vlm, specbench, text, trees,
               tts, vlm, zoo_training)

#: part -> the runs it makes: (module, extra arguments, whether it writes figures into --plots)
PARTS = {
    "text": [(text, [], False)],
    "smollm2": [(smollm2, [], False)],
    "specbench": [(specbench, [], False)],
    "vlm": [(vlm, [], True)],
    "smollm2_vlm": [(smollm2_vlm, [], False)],
    "image": [
        (image_gen, [], True),
        (image_gen, ["--only", "exact SD,SJD,GSD,LANTERN,MuLo-SD", "--draft-lengths", "4", "--lantern-deltas", "0.2",
                     "--lantern-lambdas", "2", "--section", "## Image generation: what users see (issue 29)"], False),
        (mulo_bias, [], False),
        (image_gen, ["--only", "SJD,GSD,exact SD (EAGLE head", "--draft-lengths", "4", "--sjd-window", "16",
                     "--gsd-ks", "16,32", "--mulo-taus", "", "--mulo-deltas", "", "--lantern-deltas", "",
                     "--lantern-lambdas", "", "--section",
                     "## Image generation: SJD and GSD at their default window 16 (issue 29)"], False),
        (image_gen, ["--only", "learned", "--mulo-taus", "0.9,0.95/2,0.98/2", "--mulo-deltas", "0,0.1,0.3",
                     "--gsd-ks", "", "--section",
                     "## Image generation: MuLo-SD τ / δ trade-off with the attribute table (issue 29)"], False),
        (image_gen, ["--only", "learned", "--mulo-taus", "0.9,0.98,0.95/2,0.98/2", "--mulo-deltas", "",
                     "--section", "## Image generation: MuLo-SD τ sweep (issue 15)"], False),
        (image_gen, ["--only", "LANTERN,exact SD", "--draft-lengths", "8", "--lantern-deltas", "0.3,0.9,1.0",
                     "--lantern-lambdas", "3,50", "--mulo-taus", "", "--mulo-deltas", "", "--gsd-ks", "",
                     "--section", "## Image generation: LANTERN budget sweep (issue 15)"], False),
        (image_gen, ["--only", "EAGLE head,exact SD (drafter", "--draft-lengths", "4,8", "--mulo-taus", "",
                     "--mulo-deltas", "", "--gsd-ks", "",
                     "--lantern-deltas", "0.3", "--lantern-lambdas", "3",
                     "--section", "## Image generation: EAGLE feature head (issue 15)"], False),
    ],
    "trees": [(trees, [], False)],
    "tts": [
        (tts, [], True),
        (tts, ["--prompts", "2", "--temperature", "0.8",
               "--section", "## Test-Time Speculation on SmolLM2, sampled continuation (issue 16)"], True),
        (tts, ["--domain", "german", "--prompts", "2",
               "--section", "## Test-Time Speculation on SmolLM2, German prose (issue 16)"], True),
        (tts, ["--domain", "german", "--prompts", "2", "--temperature", "0.8",
               "--section", "## Test-Time Speculation on SmolLM2, German prose, sampled (issue 16)"], True),
    ],
    "blockwise": [(blockwise, ["--pack", "--ngram-weight", "1.0"], True)],
    "collaborative": [(collaborative, ["--pack"], True)],
    "pipeline": [(pipeline, ["--plan", "0,20,30"], True)],
    "train": [(zoo_training, [], False)],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/RESULTS.md (nothing with --quick)")
    ap.add_argument("--plots", type=Path, default=None, help="default: benchmarks/ (nothing with --quick)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="smoke run of every benchmark (tables not worth keeping)")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"error: unknown benchmark(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    if not a.quick:  # a smoke run never overwrites the recorded results
        a.out = a.out or Path("benchmarks/RESULTS.md")
        a.plots = a.plots or Path("benchmarks")
    common = (["--out", str(a.out)] if a.out else []) + (["--quick"] if a.quick else [])
    plots = ["--plots", str(a.plots)] if a.plots else []
    rc = 0
    for name in PARTS:  # in this order, one after the other
        if name in parts:
            for module, extra, figures in PARTS[name]:
                rc |= module.main(common + (plots if figures else []) + extra)
    return rc


if __name__ == "__main__":
    sys.exit(main())
