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

from . import blockwise, collaborative, image_gen, pipeline, smollm2, smollm2_vlm, text, trees, tts, vlm, zoo_training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/RESULTS.md (nothing with --quick)")
    ap.add_argument("--plots", type=Path, default=None, help="default: benchmarks/ (nothing with --quick)")
    ap.add_argument("--only", default="text,smollm2,vlm,smollm2_vlm,image,trees,tts,blockwise,collaborative,pipeline,"
                                      "train",
                    help="comma-separated subset of text,smollm2,vlm,smollm2_vlm,image,trees,tts,blockwise,"
                         "collaborative,pipeline,train")
    ap.add_argument("--quick", action="store_true", help="smoke run of every benchmark (tables not worth keeping)")
    a = ap.parse_args(argv)
    parts = {p.strip() for p in a.only.split(",") if p.strip()}
    unknown = parts - {"text", "smollm2", "vlm", "smollm2_vlm", "image", "trees", "tts", "blockwise", "collaborative",
                       "pipeline", "train"}
    if unknown:
        print(f"error: unknown benchmark(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    if not a.quick:  # a smoke run never overwrites the recorded results
        a.out = a.out or Path("benchmarks/RESULTS.md")
        a.plots = a.plots or Path("benchmarks")
    common = (["--out", str(a.out)] if a.out else []) + (["--quick"] if a.quick else [])
    plots = ["--plots", str(a.plots)] if a.plots else []
    rc = 0
    if "text" in parts:
        rc |= text.main(common)
    if "smollm2" in parts:
        rc |= smollm2.main(common)
    if "vlm" in parts:
        rc |= vlm.main(common + plots)
    if "smollm2_vlm" in parts:
        rc |= smollm2_vlm.main(common)
    if "image" in parts:
        rc |= image_gen.main(common + plots)
        rc |= image_gen.main(common + ["--only", "learned", "--mulo-taus", "0.9,0.98,0.95/2,0.98/2",
                                       "--section", "## Image generation: MuLo-SD τ sweep (issue 15)"])
        rc |= image_gen.main(common + ["--only", "LANTERN,exact SD", "--draft-lengths", "8", "--lantern-deltas",
                                       "0.3,0.9,1.0", "--lantern-lambdas", "3,50", "--mulo-taus", "",
                                       "--section", "## Image generation: LANTERN budget sweep (issue 15)"])
        rc |= image_gen.main(common + ["--only", "EAGLE head,exact SD (drafter", "--draft-lengths", "4,8",
                                       "--mulo-taus", "", "--lantern-deltas", "0.3", "--lantern-lambdas", "3",
                                       "--section", "## Image generation: EAGLE feature head (issue 15)"])
    if "trees" in parts:
        rc |= trees.main(common)
    if "tts" in parts:
        rc |= tts.main(common + plots)
        rc |= tts.main(common + plots + ["--prompts", "2", "--temperature", "0.8", "--section",
                                         "## Test-Time Speculation on SmolLM2, sampled continuation (issue 16)"])
        for extra, title in (([], ""), (["--temperature", "0.8"], ", sampled")):
            rc |= tts.main(common + plots + ["--domain", "german", "--prompts", "2", *extra, "--section",
                                             f"## Test-Time Speculation on SmolLM2, German prose{title} (issue 16)"])
    if "blockwise" in parts:
        rc |= blockwise.main(common + plots + ["--pack", "--ngram-weight", "1.0"])
    if "collaborative" in parts:
        rc |= collaborative.main(common + plots + ["--pack"])
    if "pipeline" in parts:
        rc |= pipeline.main(common + plots + ["--plan", "0,20,30"])
    if "train" in parts:
        rc |= zoo_training.main(common)
    return rc


if __name__ == "__main__":
    sys.exit(main())
