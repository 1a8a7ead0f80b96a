"""``python -m mmspec.zoo``: write/verify the zoo's checksums and measure its held-out quality."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import WEIGHTS_DIR, verify_checksums, write_checksums
from .evaluate import evaluate_image, evaluate_vlm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmspec.zoo", description=__doc__)
    p.add_argument("--write-checksums", action="store_true", help=f"rewrite {WEIGHTS_DIR}/SHA256SUMS")
    p.add_argument("--evaluate", action="store_true", help="held-out caption exact match and prompt faithfulness")
    p.add_argument("--num-scenes", type=int, default=200)
    p.add_argument("--num-prompts", type=int, default=64)
    a = p.parse_args(argv)
    if a.write_checksums:
        print(f"wrote {write_checksums()}")
    verify_checksums()
    print("checksums ok")
    if a.evaluate:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        report = {**evaluate_vlm(a.num_scenes), **evaluate_image(a.num_prompts)}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        json.dump(report, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
