"""``mmspec imagegen`` (also installed as ``mmspec-imagegen``): images from an AR image model by one of the image
methods (AR, exact SD, SJD, LANTERN, LANTERN++, MuLo-SD), written as PNGs with an acceptance heat-map and
``stats.json``.

Glossary:
    model / tokenizer  an :class:`~mmspec.image_gen.ARImageModel` folder and the VQ tokenizer that turns its
                       tokens into PNGs (without one only the tokens and statistics are written)
    condition          ``--class ID`` (repeatable, class-conditional models) or ``--prompt TEXT``, not both
    method parameters  ``-k`` and the ``--lantern-*`` / ``--mulo-*`` flags are passed only when given: unset ones
                       take the method's defaults, and one the method does not use is the library's named error
                       (:data:`mmspec.image_gen.METHODS` declares them), checked before any model is loaded
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import mmspec.image_gen as ig
from mmspec.errors import MMSpecError
from mmspec.image_gen.heatmap import heatmap_image
from mmspec.image_gen.methods import METHOD_NAMES, get_method
from mmspec.image_gen.token_resampler import TokenResampler

from .common import (EXIT_BAD_INPUT, EXIT_OK, EXIT_OUTPUT, CLIError, add_sampling_flags, add_subcommand,
                     check_model_path, check_number, check_out_dir, check_sampling, one_line)

#: method parameter -> its flag's dest (``args.<dest>``), passed to the method only when given
METHOD_FLAGS = {"num_draft_tokens": "k", "lantern_k": "lantern_k", "lantern_delta": "lantern_delta",
                "lantern_lambda": "lantern_lambda", "mulo_tau": "mulo_tau", "mulo_delta": "mulo_delta",
                "mulo_redraw": "mulo_redraw", "mulo_l": "mulo_l", "mulo_k": "mulo_k", "mulo_scale": "mulo_scale",
                "gsd_k": "gsd_k", "gsd_window": "gsd_window", "gsd_p": "gsd_p"}


def _errors() -> tuple:
    """The library's errors and a model folder that cannot be read: bad input."""
    return (((MMSpecError, OSError), EXIT_BAD_INPUT),)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "imagegen", run, errors=_errors,
                       help="generate images with an AR image model (AR, exact SD, SJD, GSD, LANTERN, LANTERN++, "
                            "MuLo-SD)")
    p.add_argument("--model", required=True, help="AR image model directory (ARImageModel.save_pretrained)")
    p.add_argument("--tokenizer", help="VQ tokenizer directory (to write PNGs)")
    p.add_argument("--drafter", help="smaller AR image model or an EAGLE head folder (exact, lantern); "
                                     "low-resolution model (mulo)")
    p.add_argument("--class", dest="class_ids", type=int, action="append", default=[], help="class id (repeatable)")
    p.add_argument("--prompt", help="prompt for a text-conditional model")
    p.add_argument("--method", default="sjd", choices=list(METHOD_NAMES))
    method_default = " (default: the method's; an option the method does not use is an error)"
    p.add_argument("--lantern-k", type=int, default=None,
                   help="latent neighbours per codebook entry (lantern, lantern++)" + method_default)
    p.add_argument("--lantern-delta", type=float, default=None, help="LANTERN total-variation budget in [0, 1]")
    p.add_argument("--lantern-lambda", type=float, default=None, help="LANTERN++ multiplicative cap, >= 1")
    p.add_argument("--mulo-delta", type=float, default=None,
                   help="MuLo-SD's bounded test: total-variation budget per token in [0, 1] (default 0)")
    p.add_argument("--mulo-tau", type=float, default=None,
                   help="MuLo-SD with the paper's pooled-probability threshold (>= 0; no bound) instead")
    p.add_argument("--mulo-redraw", default=None, choices=["rest", "local"],
                   help="what a MuLo-SD rejection redraws: the rest of the block (default) or its neighbourhood")
    p.add_argument("--gsd-k", type=int, default=None, help="GSD latent-neighbour candidates per code")
    p.add_argument("--gsd-window", type=int, default=None, help="GSD: a candidate's rank within this of the draft's")
    p.add_argument("--gsd-p", type=float, default=None,
                   help="GSD: a candidate's probability within this of the draft's, in [0, 1]")
    p.add_argument("--mulo-l", type=int, default=None, help="MuLo-SD resampling neighbourhood radius, >= 0")
    p.add_argument("--mulo-k", type=int, default=None, help="MuLo-SD latent neighbours per codebook entry")
    p.add_argument("--mulo-scale", type=int, default=None,
                   help="MuLo-SD resolution ratio (checked against the drafter's grid)")
    p.add_argument("--resampler", help="MuLo-SD's learned U_r / D_r directory (TokenResampler.save_pretrained; "
                                       "default: decode -> resize -> re-encode)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    add_sampling_flags(p, helps={"k": "drafted tokens per step / SJD window" + method_default},
                       k=None, temperature=1.0, top_k=None, top_p=None, seed=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--out", default="out/images")


def _check(args: argparse.Namespace) -> None:
    """Argument-level checks (the library checks what depends on the models)."""
    if args.prompt is not None and args.class_ids:
        raise CLIError(EXIT_BAD_INPUT, "give --class or --prompt, not both")
    if args.prompt is None and not args.class_ids:
        raise CLIError(EXIT_BAD_INPUT, "give a condition: --class ID (class-conditional) or --prompt TEXT")
    for flag, path, what in (("--model", args.model, "AR image model"), ("--tokenizer", args.tokenizer, "VQ tokenizer"),
                             ("--drafter", args.drafter, "AR image model or EAGLE head")):
        check_model_path(flag, path, what, local_only=True)
    check_sampling(args)
    check_number(args, "num_images", lo=1, integer=True)
    check_number(args, "cfg_scale", lo=0)
    check_number(args, "lantern_k", lo=1, integer=True)
    check_number(args, "lantern_delta", lo=0, hi=1)
    check_number(args, "lantern_lambda", lo=1)
    check_number(args, "mulo_tau", lo=0)
    check_number(args, "mulo_delta", lo=0, hi=1)
    check_number(args, "gsd_k", lo=1, integer=True)
    check_number(args, "gsd_window", lo=0, integer=True)
    check_number(args, "gsd_p", lo=0, hi=1)
    check_number(args, "mulo_l", lo=0, integer=True)
    check_number(args, "mulo_k", lo=1, integer=True)
    check_number(args, "mulo_scale", lo=1, integer=True)
    check_out_dir(args.out)


class _PlaceholderResampler:  # stands for --resampler while the parameters are checked (nothing loaded yet)
    scale = 2

    def upsample(self, low):  # pragma: no cover - never called
        raise NotImplementedError

    def downsample(self, high):  # pragma: no cover - never called
        raise NotImplementedError


_PLACEHOLDER_RESAMPLER = _PlaceholderResampler()


def run(args: argparse.Namespace) -> int:
    _check(args)
    method_args = {name: getattr(args, dest) for name, dest in METHOD_FLAGS.items() if getattr(args, dest) is not None}
    # the registry checks the method's parameters before any model is loaded
    get_method(args.method).resolve({**method_args, "drafter": args.drafter or None,
                                     "mulo_resampler": _PLACEHOLDER_RESAMPLER if args.resampler else None})
    target = ig.ARImageModel.from_pretrained(args.model)
    tokenizer = ig.VQTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    if args.drafter:  # an AR image model or an EAGLE head folder
        method_args["drafter"] = ig.load_image_drafter(args.drafter, target)
    if args.resampler:
        method_args["mulo_resampler"] = TokenResampler.from_pretrained(args.resampler)
    condition = args.prompt if args.prompt is not None else args.class_ids
    out = ig.generate(target, tokenizer, condition=condition, method=args.method, cfg_scale=args.cfg_scale,
                      cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed),
                      num_images=args.num_images, progress=True, **method_args)
    outdir = Path(args.out).expanduser()
    try:
        _write(out, outdir, args)
    except OSError as exc:
        raise CLIError(EXIT_OUTPUT, f"cannot write to --out {outdir}: {exc.strerror or one_line(exc)}") from None
    print(f"{len(out.conditions)} image(s) -> {outdir}: {out.stats.summary()}; "
          f"target forwards per image {out.stats.target_forwards_per_image:.1f}")
    return EXIT_OK


def _write(out: ig.ImageGenerationOutput, outdir: Path, args: argparse.Namespace) -> None:
    """The PNGs (with a tokenizer), ``acceptance_heatmap.png`` and ``stats.json`` (tokens: [images, grid tokens])."""
    files = []
    outdir.mkdir(parents=True, exist_ok=True)
    for i in range(len(out.conditions)):
        if out.images is not None:
            name = f"image_{i:03d}.png"
            out.images[i].save(outdir / name)
            files.append(name)
    heatmap_image(out.stats.accepted_map).save(outdir / "acceptance_heatmap.png")
    stats = out.stats.as_dict()
    stats.update(method=args.method, conditions=out.conditions, images=files, seed=args.seed,
                 tokens=out.tokens.tolist())
    (outdir / "stats.json").write_text(json.dumps(stats, indent=2))
