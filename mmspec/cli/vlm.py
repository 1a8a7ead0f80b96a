"""``mmspec vlm``: speculative decoding of a HF vision-language model, drafted by a smaller VLM of its family (or
itself) that sees a pruned share of the image's visual tokens (:mod:`mmspec.vision`).

Glossary:
    target / drafter  HF VLM checkpoints (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) loaded with SDPA attention, which the
                      verifier-guided pruning reads
    pruning           which visual tokens the drafter keeps (``--pruning``, ``--keep-ratio``)
    --check           greedy: also run ``target.generate`` and exit ``EXIT_NOT_IDENTICAL`` when it differs
    unreadable image  one line on stderr, then :class:`~mmspec.cli.common.CLIExit` (``SystemExit`` with
                      ``EXIT_BAD_INPUT`` whose ``str`` is the message)
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image, UnidentifiedImageError

from .common import (EXIT_BAD_INPUT, EXIT_NOT_IDENTICAL, EXIT_OK, CLIError, CLIExit, add_pruning_flags,
                     add_sampling_flags, add_subcommand, check_model_path, check_prompt, check_pruning, check_sampling,
                     load, one_line)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "vlm", run, help="VLM speculative decoding with a pruned drafter (HF checkpoints)")
    p.add_argument("--target", required=True, help="HF VLM checkpoint (LLaVA, LLaVA-NeXT, Qwen2-VL, ...)")
    p.add_argument("--drafter", help="smaller VLM of the same family (default: the target itself)")
    p.add_argument("--processor", help="processor path (default: the target's)")
    p.add_argument("--image", required=True, help="the image file (any mode PIL reads; converted to RGB)")
    p.add_argument("--prompt", required=True, help="the question or instruction about the image")
    add_pruning_flags(p)
    add_sampling_flags(p, max_new_tokens=64, k=4, temperature=0.0, top_k=None, top_p=None, seed=0)
    p.add_argument("--check", action="store_true", help="also run target.generate and compare (greedy)")


def load_image(path: str) -> Image.Image:
    """The image as RGB; an unreadable image prints one line and raises :class:`CLIExit`."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")  # grayscale / RGBA / palette images become RGB
    except (FileNotFoundError, IsADirectoryError):
        message = f"error: image file not found: {path}"
    except (UnidentifiedImageError, OSError) as exc:
        message = f"error: cannot read image {path!r}: {one_line(exc)}"
    print(message, file=sys.stderr)
    raise CLIExit(EXIT_BAD_INPUT, message)


def _vlm(path: str) -> torch.nn.Module:
    """A HF VLM in eval mode with SDPA attention (the verifier-guided pruning captures its attention under SDPA)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()


def _processor(path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def run(args: argparse.Namespace) -> int:
    import mmspec.vision as mv

    for flag, path in (("--target", args.target), ("--drafter", args.drafter), ("--processor", args.processor)):
        check_model_path(flag, path)
    check_sampling(args)
    check_pruning(args)
    check_prompt(args)
    image = load_image(args.image)
    processor = load("processor", args.processor or args.target, _processor)
    target = load("target model", args.target, _vlm)
    drafter = load("drafter model", args.drafter, _vlm) if args.drafter else target
    image_token = getattr(processor, "image_token", "<image>")
    prompt = args.prompt if image_token in args.prompt else f"{image_token} {args.prompt}"
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
    except Exception as exc:  # the processor's own message names the problem
        raise CLIError(EXIT_BAD_INPUT, f"the processor cannot prepare this image/prompt: {one_line(exc)}") from None
    dtype = next(target.parameters()).dtype
    inputs = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    out = mv.generate(target, drafter, inputs, pruning=args.pruning, keep_ratio=args.keep_ratio,
                      max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))
    new = out.sequences[0, inputs["input_ids"].shape[1]:]  # [new tokens]
    print("generated text:", processor.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("visual tokens: target", out.stats.extra.get("visual_tokens"), "drafter",
          out.stats.extra.get("drafter_visual_tokens"))
    if args.check and args.temperature == 0.0:
        with torch.no_grad():
            ref = target.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)  # [1, n + new]
        same = torch.equal(ref, out.sequences)
        print("identical to target.generate:", same)
        return EXIT_OK if same else EXIT_NOT_IDENTICAL
    return EXIT_OK
