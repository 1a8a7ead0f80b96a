"""What every subcommand of ``mmspec`` shares: the exit codes, the one-line errors, the parser, the argument
checks, model loading and the flags that mean the same everywhere.

Glossary:
    exit code       ``EXIT_*``: one per kind of outcome, listed in every ``--help`` (:data:`EXIT_CODES_HELP`)
    CLIError        a failure ``main`` prints as one line ``error: ...`` on stderr before returning its code
    CLIExit         ``SystemExit(code)`` whose ``str`` is its one-line message, already printed (``mmspec vlm``
                    with an unreadable image)
    input errors    ``((exception types, exit code), ...)``: the library's exceptions a subcommand reports as
                    one line (first match wins); :data:`INPUT_ERRORS` (``MMSpecError`` -> ``EXIT_BAD_INPUT``)
                    unless the subcommand names its own (:func:`add_subcommand`), translated by ``main``
    sampling flags  ``--max-new-tokens``, ``-k/--num-draft-tokens`` (dest ``k``), ``--temperature``, ``--top-k``,
                    ``--top-p``, ``--seed``: one spelling, dest, help and check everywhere, defaults per
                    subcommand (:func:`add_sampling_flags`, :func:`check_sampling`)
    pack            ``args.pack``: pre-pack float32 CPU linear weights once for oneDNN
                    (:mod:`mmspec.cpu_packing`); ``--no-pack`` where packing is the default, ``--pack`` where not
    toy Llama       a small random Llama built from a seed, the same in every process (:func:`toy_llama`): the
                    ``--example`` models of ``mmspec text`` and ``mmspec pipeline``
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from mmspec.errors import MMSpecError

#: exit codes of ``mmspec`` and ``mmspec-imagegen``, one per kind of outcome
EXIT_OK = 0
EXIT_NOT_IDENTICAL = 1  # ran, but the speculative output differs from the reference (greedy checks)
EXIT_BAD_INPUT = 2  # bad arguments or input: usage, non-finite / out-of-range numbers, empty prompt,
#                     unreadable image, a model path that cannot be loaded, a library input error, a bad plan
EXIT_OUTPUT = 3  # --out cannot be written (an existing file, a path under a file, no permission)
EXIT_ZOO = 4  # the embedded zoo weights are missing or fail their checksums (mmspec run)
EXIT_STAGE = 5  # a pipeline stage died or stopped answering within the timeout (mmspec pipeline)

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  success
  {EXIT_NOT_IDENTICAL}  the speculative output differs from the reference (text at temperature 0, vlm --check, run)
  {EXIT_BAD_INPUT}  bad arguments or input (non-finite or out-of-range numbers, empty prompt, unreadable
     image, a model path that cannot be loaded, an input error reported by the library, a pipeline
     plan that does not fit the model or the processes)
  {EXIT_OUTPUT}  --out cannot be written (an existing file, a path under a file, no permission)
  {EXIT_ZOO}  the embedded zoo weights are missing or fail their checksums
  {EXIT_STAGE}  a pipeline stage died or stopped answering within --timeout
"""

#: the input errors of a subcommand that names none: the library's own
INPUT_ERRORS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (MMSpecError, EXIT_BAD_INPUT),)

#: the chat turn the SmolLM2 subcommands answer without --prompt
CHAT_PROMPT = "Give me three tips for staying focused while studying."
#: the VLM drafter's visual-token pruning strategies (``mmspec.vision.pruning``), the default first
PRUNINGS = ("verifier", "cls", "diversity", "uniform", "none")


class CLIError(Exception):
    """A failure the CLI reports as one line on stderr and an exit code (``main`` returns ``code``)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class CLIExit(SystemExit):
    """``SystemExit(code)`` whose ``str`` is its one-line message (already printed on stderr)."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit ``EXIT_BAD_INPUT``) and the exit codes in every help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", EXIT_CODES_HELP)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _no_cleanup() -> None:
    pass


def add_subcommand(subparsers, name: str, run: Callable[[argparse.Namespace], int], *,
                   errors: Callable[[], tuple] = lambda: INPUT_ERRORS, cleanup: Callable[[], None] = _no_cleanup,
                   **kwargs: Any) -> Parser:
    """The subcommand's parser: ``main`` calls ``run(args)``, reports an exception matching ``errors()`` (the
    subcommand's input errors, asked for only when one is raised so their modules load with the subcommand) as
    one line with its exit code, and calls ``cleanup()`` last, after that line is printed."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.set_defaults(func=run, errors=errors, cleanup=cleanup)
    return parser


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line of at most ``limit`` characters (its type's name when it has none)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_number(args: argparse.Namespace, dest: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, integer: bool = False) -> None:
    """``args.<dest>`` (None = not given) must be finite and inside the range, else :class:`CLIError`."""
    value = getattr(args, dest)
    if value is None:
        return
    ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        parts = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "", f"<= {hi:g}" if hi is not None else ""]
        bound = " and ".join(p for p in parts if p)
        kind = "an integer" if integer else "a number"
        flag = "--" + dest.replace("_", "-") if dest != "k" else "-k/--num-draft-tokens"
        raise CLIError(EXIT_BAD_INPUT, f"{dest} must be {kind} {bound}, got {value} ({flag})".replace("  ", " "))


def check_prompt(args: argparse.Namespace) -> None:
    """A given ``--prompt`` must not be blank."""
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError(EXIT_BAD_INPUT, "--prompt is empty")


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith(("./", "../", "~")) or path in (".", "..") or os.path.exists(path)


def check_model_path(flag: str, path: str | None, what: str = "checkpoint", *, local_only: bool = False) -> None:
    """A local-looking model path (any path with ``local_only``) must be an existing directory; hub names
    are checked when loading."""
    if path is None:
        return
    if not path.strip():
        raise CLIError(EXIT_BAD_INPUT, f"{flag} is empty")
    local = os.path.expanduser(path)
    if (local_only or _looks_local(path)) and not os.path.isdir(local):
        why = "not a directory" if os.path.exists(local) else "no such directory"
        raise CLIError(EXIT_BAD_INPUT, f"{flag}: no {what} at {path} ({why})")


def load(what: str, path: str, fn: Callable[[str], Any]) -> Any:
    """``fn(path)``, with a one-line :class:`CLIError` when the checkpoint cannot be loaded."""
    try:
        return fn(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(EXIT_BAD_INPUT, f"cannot load the {what} from {path!r}: {one_line(exc)}") from None


def hf_causal_lm(path: str) -> torch.nn.Module:
    """A HF causal LM checkpoint (folder or hub name) in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def hf_tokenizer(path: str) -> Any:
    """The tokenizer of a HF checkpoint (folder or hub name)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Raise :class:`CLIError` (``EXIT_OUTPUT``) unless ``path`` is, or can be created as, a writable
    directory. Checked by trying: missing directories are created, probed with a temporary file and
    removed again, so a later failure leaves nothing behind."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(EXIT_OUTPUT, f"{flag} {out} exists and is not a directory")
    missing, base = [], out
    while not base.exists() and base != base.parent:
        missing.append(base)
        base = base.parent
    if not base.is_dir():
        raise CLIError(EXIT_OUTPUT, f"{flag} {out}: {base} is not a directory")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                raise CLIError(EXIT_OUTPUT, f"{flag} {out}: cannot create directory {d}: "
                                            f"{exc.strerror or one_line(exc)}") from None
            created.append(d)
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            raise CLIError(EXIT_OUTPUT, f"cannot write to {flag} {out}: {exc.strerror or one_line(exc)}") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
    return out


# ------------------------------------------------------------------ flags shared by the subcommands

#: dest -> (flags, type, help, the check's bounds); a subcommand adds those it passes a default for
_SAMPLING = {
    "max_new_tokens": (("--max-new-tokens",), int, "tokens to generate (default: %(default)s)",
                       dict(lo=1, integer=True)),
    "k": (("-k", "--num-draft-tokens"), int, "drafted tokens per verification step (default: %(default)s)",
          dict(lo=1, integer=True)),
    "temperature": (("--temperature",), float, "sampling temperature, 0 = greedy (default: %(default)s)",
                    dict(lo=0)),
    "top_k": (("--top-k",), int, "sample from the k most likely tokens only (default: all)",
              dict(lo=0, integer=True)),
    "top_p": (("--top-p",), float, "sample from the smallest set of tokens holding this probability, in (0, 1] "
                                   "(default: all)", dict(lo=0, hi=1, lo_open=True)),
    "seed": (("--seed",), int, "random seed (default: %(default)s)", None),
}


def add_sampling_flags(parser: argparse.ArgumentParser, helps: dict[str, str] | None = None, **defaults: Any) -> None:
    """Add the sampling flags named by ``defaults`` (dest -> default: ``max_new_tokens``, ``k``, ``temperature``,
    ``top_k``, ``top_p``, ``seed``), in that order; ``helps`` replaces a flag's help where it means more there."""
    unknown = set(defaults) - set(_SAMPLING)
    if unknown:
        raise KeyError(f"not sampling flags: {sorted(unknown)}")
    for dest, (flags, kind, text, _) in _SAMPLING.items():
        if dest in defaults:
            parser.add_argument(*flags, dest=dest, type=kind, default=defaults[dest],
                                help=(helps or {}).get(dest, text))


def check_sampling(args: argparse.Namespace) -> None:
    """The sampling numbers the subcommand has must be finite and in range (:class:`CLIError` otherwise)."""
    for dest, (_, _, _, bounds) in _SAMPLING.items():
        if bounds is not None and hasattr(args, dest):
            check_number(args, dest, **bounds)


def add_pack_flag(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """``args.pack``: ``--no-pack`` where packing is the default, ``--pack`` where it is not."""
    what = "pre-pack float32 CPU linear weights once for oneDNN, which makes verifying several tokens about " \
           "as cheap as one"
    if default:
        parser.add_argument("--no-pack", dest="pack", action="store_false",
                            help=f"keep the linear weights as they are (default: {what})")
    else:
        parser.add_argument("--pack", dest="pack", action="store_true", help=f"{what} (default: off)")


def add_pruning_flags(parser: argparse.ArgumentParser) -> None:
    """``--pruning`` and ``--keep-ratio``: the VLM drafter's visual-token pruning."""
    parser.add_argument("--pruning", default=PRUNINGS[0], choices=PRUNINGS,
                        help="the drafter's visual-token pruning (default: %(default)s)")
    parser.add_argument("--keep-ratio", type=float, default=0.25,
                        help="share of the visual tokens the drafter keeps, in [0, 1] (default: %(default)s)")


def check_pruning(args: argparse.Namespace) -> None:
    check_number(args, "keep_ratio", lo=0, hi=1)


# ------------------------------------------------------------------ toy models


def toy_llama(seed: int, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
              initializer_range: float, **config: Any) -> torch.nn.Module:
    """A small random float32 Llama in eval mode, the same for the same seed and sizes (on every rank of a
    launch and in the tests), with no end-of-sequence token (it generates the tokens asked for)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      initializer_range=initializer_range, **config)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model

