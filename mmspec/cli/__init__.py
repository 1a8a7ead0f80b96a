"""The ``mmspec`` command (and ``mmspec-imagegen``): one module per subcommand, each with ``add_parser(subparsers)``
and ``run(args) -> int``; what they share is in :mod:`~mmspec.cli.common`.

Glossary:
    subcommands  ``run`` (the main job on the embedded models), ``text``, ``collaborate``, ``vlm``,
                 ``train-drafter``, ``chat``, ``imagegen`` (also installed as ``mmspec-imagegen``) and ``pipeline``
                 (launched as ``torchrun --nproc-per-node N -m mmspec pipeline ...``; ``python -m mmspec`` is
                 :mod:`mmspec.__main__`)
    failures     every argument is checked before any model is loaded or any output written; a failure prints one
                 line ``error: ...`` on stderr and ends with one of the exit codes ``EXIT_*`` (listed in every
                 ``--help``). ``main`` returns the code: it reports a :class:`CLIError`, and the input errors the
                 subcommand names (:func:`~mmspec.cli.common.add_subcommand`), so subcommands raise and never print;
                 ``mmspec vlm`` with an unreadable image raises :class:`CLIExit` (a ``SystemExit`` with the code
                 whose ``str`` is the message)
"""

from __future__ import annotations

import argparse
import sys

from mmspec.image_gen.heatmap import heatmap_image

from . import chat, collaborate, imagegen, pipeline, run, serve, text, train_drafter, vlm
from .chat import parse_tree
from .common import (EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_NOT_IDENTICAL, EXIT_OK, EXIT_OUTPUT, EXIT_STAGE, EXIT_ZOO,
                     CLIError, CLIExit, Parser, check_out_dir, one_line)

SUBCOMMANDS = (run, text, collaborate, vlm, train_drafter, chat, serve, imagegen, pipeline)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mmspec", description="Speculative decoding for multimodal models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def _failed(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (``EXIT_*``). A failure prints one line on stderr."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except CLIError as exc:
        return _failed(exc.code, str(exc))
    except Exception as exc:
        code = next((code for kinds, code in args.errors() if isinstance(exc, kinds)), None)
        if code is None:
            raise
        return _failed(code, one_line(exc))
    finally:
        args.cleanup()


def imagegen_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mmspec-imagegen`` (same as ``mmspec imagegen``)."""
    return main(["imagegen", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["EXIT_BAD_INPUT", "EXIT_CODES_HELP", "EXIT_NOT_IDENTICAL", "EXIT_OK", "EXIT_OUTPUT", "EXIT_STAGE",
           "EXIT_ZOO", "CLIError", "CLIExit", "build_parser", "check_out_dir", "heatmap_image", "imagegen_main", "main",
           "parse_tree"]
