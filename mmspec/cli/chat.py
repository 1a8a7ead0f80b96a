"""``mmspec chat``: an interactive chat (stdin lines) with SmolLM2-135M-Instruct or ``--target`` through
speculative decoding, each answer streamed (:class:`mmspec.chat.Chat`).

Glossary:
    drafter   what ``--drafter`` names (:func:`mmspec.zoo.smollm2.chat_drafter`): ``head`` / ``model`` (shipped for
              SmolLM2 only), ``prompt-lookup``, or a folder written by ``mmspec train-drafter``
    tree      a head drafts a dynamic tree ``depth,top_k,nodes`` (:func:`parse_tree`); ``--chain``: chains of
              ``-k`` tokens instead
    commands  ``/reset`` forgets the conversation, ``/exit`` (or ``/quit``, or end of input) ends the chat
"""

from __future__ import annotations

import argparse
import sys

from mmspec.chat import Chat
from mmspec.cpu_packing import pack_linear_weights
from mmspec.drafters.tree import DynamicTree
from mmspec.pretrained import load_causal_lm

from .common import (EXIT_BAD_INPUT, EXIT_OK, CLIError, add_pack_flag, add_sampling_flags, add_subcommand,
                     check_model_path, check_sampling, load)

SHIPPED = ("head", "model")  # the drafters shipped for SmolLM2 that --drafter names


def _errors() -> tuple:
    """Library errors, and a drafter or setting the chat cannot use (ValueError, a missing drafter file)."""
    return (((ValueError, FileNotFoundError), EXIT_BAD_INPUT),)  # MMSpecError is a ValueError


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "chat", run, errors=_errors,
                       help="chat with SmolLM2-135M-Instruct (or --target) through speculative decoding, answers "
                            "streamed (reads stdin; /reset, /exit)")
    p.add_argument("--target", default="smollm2", help="HF folder, .gguf file or 'smollm2' (default)")
    p.add_argument("--drafter", default="head",
                   help="head (shipped EAGLE-3 head, default), model (shipped distilled drafter), prompt-lookup, "
                        "or a folder written by `mmspec train-drafter`")
    p.add_argument("--tree", default="auto",
                   help="a head's draft shape: auto (default: the chain or tree the calibration measures fastest on "
                        "this machine, cached; prompt lookup with a cost-aware k where it expects the head not to pay) "
                        "or a dynamic "
                        "tree depth,top_k,nodes")
    p.add_argument("--chain", action="store_true", help="draft chains of -k tokens instead of trees")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_flags(p, max_new_tokens=256, k=3, temperature=0.0, top_k=None, top_p=None, seed=0)
    p.add_argument("--quiet", action="store_true", help="no speed line after each answer")
    add_pack_flag(p, default=False)  # packing changes the target's float rounding: the user's choice


def parse_tree(spec: str) -> DynamicTree:
    """``"depth,top_k,nodes"`` -> a :class:`~mmspec.drafters.tree.DynamicTree` (ValueError otherwise)."""
    try:
        parts = tuple(int(x) for x in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"tree must be three ints >= 1 as depth,top_k,nodes (e.g. 5,4,16); got {spec!r}")
    depth, top_k, nodes = parts
    return DynamicTree(depth=depth, top_k=top_k, num_nodes=nodes)


def _check(args: argparse.Namespace) -> DynamicTree | None:
    """The checks before any model is loaded; returns the draft tree (None: chains)."""
    check_sampling(args)
    try:
        tree = None if args.chain or args.tree == "auto" else parse_tree(args.tree)
    except ValueError as exc:
        raise CLIError(EXIT_BAD_INPUT, f"--tree: {exc}") from None
    if args.drafter in SHIPPED and args.target != "smollm2":
        raise CLIError(EXIT_BAD_INPUT, f"--drafter {args.drafter} is the one shipped for SmolLM2; for another "
                                       "target give a folder from `mmspec train-drafter` or prompt-lookup")
    if args.drafter not in SHIPPED and args.drafter != "prompt-lookup":
        check_model_path("--drafter", args.drafter, "trained drafter folder", local_only=True)
    return tree


def run(args: argparse.Namespace) -> int:
    """Interactive chat (stdin lines; ``/reset`` forgets the conversation, ``/exit`` or EOF ends it)."""
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.zoo.smollm2 import calibrated_head_drafter, calibration_line, chat_drafter

    tree = _check(args)
    target, tokenizer = load("target", args.target, load_causal_lm)
    if args.pack:  # CPU: linear weights packed once for oneDNN
        pack_linear_weights(target)
    drafter, k = chat_drafter(args.drafter, target, tree), args.k
    if args.tree == "auto" and not args.chain and isinstance(drafter, FeatureDrafter):
        drafter, k, cal = calibrated_head_drafter(target, tokenizer, drafter.head,
                                                  log=lambda m: print(m, file=sys.stderr, flush=True))
        print(calibration_line(cal), file=sys.stderr, flush=True)
    chat = Chat(target, tokenizer, drafter, system=args.system, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, num_draft_tokens=k, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("mmspec chat: type a message; /reset forgets the conversation, /exit (or Ctrl-D) ends it.")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            print("(conversation cleared)")
            continue
        print("assistant> ", end="", flush=True)
        for piece in chat.reply(line):
            print(piece, end="", flush=True)
        print()
        if not args.quiet:
            print(f"  [{chat.last.summary()}]", file=sys.stderr)
    return EXIT_OK
