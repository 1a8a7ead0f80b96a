"""``mmspec run``: the main job on the models embedded in the package (:mod:`mmspec.zoo.main_job`).

Glossary:
    main job   describe a held-out scene with the VLM built on SmolLM2 (pruned drafter), draw images of it with
               AR and a relaxed image method, chat with SmolLM2; writes the images, a heat-map and
               ``report.json`` under ``--out``
    zoo        the embedded weights, checked against their checksums before use: missing or corrupt ones end
               with ``EXIT_ZOO``
    identical  exit ``EXIT_NOT_IDENTICAL`` when the speculative VLM or chat answer differs from HF ``generate``
"""

from __future__ import annotations

import argparse

from mmspec.errors import MMSpecError
from mmspec.image_gen.methods import METHOD_NAMES

from .common import (EXIT_BAD_INPUT, EXIT_NOT_IDENTICAL, EXIT_OK, EXIT_ZOO, add_pruning_flags, add_sampling_flags,
                     add_subcommand, check_number, check_out_dir, check_prompt, check_pruning)


def _errors() -> tuple:
    """Missing or corrupt zoo weights have their own code; every other library error is bad input."""
    from mmspec.zoo import ZooError

    return (ZooError, EXIT_ZOO), (MMSpecError, EXIT_BAD_INPUT)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "run", run, errors=_errors,
                       help="the main job on the embedded models: describe a scene with the VLM on SmolLM2 (pruned "
                            "drafter), draw images (AR vs a speculative method), chat with SmolLM2")
    p.add_argument("--out", default="mmspec_out", help="directory for the images, heat-map and report.json")
    p.add_argument("--prompt", default=None, help="image prompt (default: a held-out scene's caption)")
    p.add_argument("--method", default="sjd", choices=[m for m in METHOD_NAMES if m != "ar"],
                   help="the speculative image method (default: SJD, lossless and the fastest whose images stay "
                        "within plain AR's noise floor)")
    add_pruning_flags(p)
    p.add_argument("--vlm-drafter", default="head", choices=["head", "model"],
                   help="the VLM's drafter: its EAGLE-3 head (default) or the small distilled VLM")
    p.add_argument("--vlm-grid", type=int, default=1, help="4: tile the image (1088 visual tokens)")
    p.add_argument("--num-images", type=int, default=4)
    add_sampling_flags(p, seed=0)


def run(args: argparse.Namespace) -> int:
    from mmspec.zoo.main_job import MainJobConfig, run_main_job

    check_prompt(args)
    check_number(args, "num_images", lo=1, integer=True)
    check_pruning(args)
    check_out_dir(args.out)
    cfg = MainJobConfig(pruning=args.pruning, keep_ratio=args.keep_ratio, prompt=args.prompt,
                        image_method=args.method, num_images=args.num_images, seed=args.seed,
                        vlm_drafter=args.vlm_drafter, vlm_grid=args.vlm_grid)
    report = run_main_job(args.out, cfg)
    same = report["vlm"]["identical_to_hf_generate"] and report["text"].get("identical_to_hf_generate", True)
    return EXIT_OK if same else EXIT_NOT_IDENTICAL
