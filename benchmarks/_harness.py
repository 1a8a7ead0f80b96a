"""The one benchmark harness: interleaved runs, timers, the machine line, markdown tables and RESULTS.md sections.

Every script of ``benchmarks/`` times its methods against their baselines with :func:`interleave`, its forward
costs with :func:`median_seconds` (or :class:`CachedForward` / :func:`session_seconds` on top of it), says what
it ran on with :func:`provenance` / :func:`machine_line`, and writes its section with :func:`write_section`.
Speed is a ratio to a baseline measured in one such run, never an absolute time compared across runs; a result
also gives tau (mean accepted length), its ceiling, the time split and the machine line.

Glossary:
    method        a named callable ``fn(prompt, seed) -> result``, a baseline (plain AR, HF assisted generation,
                  HF prompt lookup) or a method under test; its result is whatever the script reads afterwards
                  (tokens, ``GenerationStats``, images) and is kept with the call's wall time; a :class:`Fresh`
                  method builds its per-call state (a fresh drafter) untimed first
    round         one prompt (an item of ``prompts``: text, token ids, a dict of model inputs) in one repeat;
                  every method that has not failed runs on it once, back to back
    order         rotated by one from round to round and reversed after every full rotation, so every method
                  runs in every position and after each of its neighbours alike: the drift of a shared
                  machine's load hits every method alike
    warm-up       one untimed call of every method on the first prompt before the timed rounds (lazy imports,
                  allocator, oneDNN kernel choice); a method that raises there (or later) is dropped when
                  ``catch`` is set, its error kept in ``Runs.failed``
    seed          ``1000 + the round's index`` (the same for every method of a round; 0 in the warm-up), also
                  passed to ``torch.manual_seed`` before the call (HF sampling reads the global generator)
    meter         an optional object with ``start()`` and ``stop() -> value`` called, untimed, around every timed
                  call (forward counters, pipeline stage statistics); the value is kept in ``Call.meter``
    speed ratio   of a method to a baseline: (its tokens / its seconds) / (the baseline's), pooled over every
                  round (:meth:`Runs.speedup`) or per round (:meth:`Runs.ratios`); without a token count, the
                  inverse ratio of the seconds
    median timer  :func:`median_seconds`: the median of n timed calls after w untimed ones, an optional ``undo``
                  (cache rollback) untimed after each call, for forward-cost micro-benchmarks
    machine line  CPU model, logical CPUs, torch threads, the CPU flags that change speed (avx2, avx_vnni,
                  avx512*, amx*), torch / transformers / Python versions and the 1/5/15-minute load average
                  before and after the timed part (above ~1 per core, other processes shared the cores)
    notes         hand-written text after ``<!-- notes -->`` (or the older ``<!-- notes:start -->``) in a
                  section of RESULTS.md: kept when the section is written again
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_NOTES_PREFIX = "<!-- notes"  # "<!-- notes -->", and the older "<!-- notes:start -->" ... "<!-- notes:end -->"


# -- interleaved runs ---------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One timed call: the method, the prompt's index, the repeat, wall seconds, what it returned, the meter's."""

    method: str
    index: int
    repeat: int
    seconds: float
    result: Any
    meter: Any = None


@dataclass
class Runs:
    """Every timed call of one interleaved run, in the order they ran."""

    names: list[str]
    calls: list[Call] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # method -> "ErrorType: first line of the message"
    seconds: float = 0.0  # wall time of the timed rounds

    def of(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.method == name]

    def results(self, name: str) -> list:
        return [c.result for c in self.calls if c.method == name]

    def na(self, name: str) -> str | None:
        """``"n/a (why)"`` for a method that failed or never ran; None for one that ran."""
        if name in self.failed or not self.of(name):
            return f"n/a ({self.failed.get(name, 'no run')})"
        return None

    def ran(self, rows: list, width: int) -> Iterator[tuple[str, list[Call]]]:
        """(name, calls) of every method that ran, in order; for one that did not, its n/a row (``width`` cells)
        is appended to ``rows`` instead."""
        for name in self.names:
            if self.na(name):
                rows.append([name, self.na(name), *[""] * (width - 2)])
            else:
                yield name, self.of(name)

    def total(self, name: str) -> float:
        """Seconds summed over the method's calls."""
        return sum(c.seconds for c in self.calls if c.method == name)

    def per_repeat(self, name: str) -> list[float]:
        """Seconds per repeat (all prompts of the repeat summed)."""
        out: dict[int, float] = {}
        for c in self.of(name):
            out[c.repeat] = out.get(c.repeat, 0.0) + c.seconds
        return [out[r] for r in sorted(out)]

    def rounds(self) -> list[dict[str, Call]]:
        """Per round (repeat, prompt), the calls by method."""
        out: dict[tuple[int, int], dict[str, Call]] = {}
        for c in self.calls:
            out.setdefault((c.repeat, c.index), {})[c.method] = c
        return list(out.values())

    def rate(self, name: str, tokens: Callable[[Call], float]) -> float:
        """Tokens per second of ``name`` over every round (``tokens(call)``: a call's tokens)."""
        return sum(tokens(c) for c in self.of(name)) / self.total(name)

    def speedup(self, name: str, base: str, tokens: Callable[[Call], float] | None = None) -> float:
        """Pooled speed ratio of ``name`` to ``base``: tokens/s over every round, ``tokens(call)`` counting a call's
        tokens (without it, the inverse ratio of the seconds)."""
        if tokens is None:
            return self.total(base) / self.total(name)
        return self.rate(name, tokens) / self.rate(base, tokens)

    def ratios(self, name: str, base: str, tokens: Callable[[Call], float] | None = None) -> list[float]:
        """The speed ratio of ``name`` to ``base`` in every round both ran."""
        out = []
        for rnd in self.rounds():
            if name in rnd and base in rnd:
                m, b = rnd[name], rnd[base]
                if tokens is None:
                    out.append(b.seconds / m.seconds)
                else:
                    out.append((tokens(m) / m.seconds) / (tokens(b) / b.seconds))
        return out

    def speed_cell(self, name: str, base: str | None, tokens: Callable[[Call], float] | None = None) -> str:
        """``"1.23× (0.98–1.40)"``: the pooled speed ratio to ``base`` and its range over the rounds."""
        if base is None:
            return "nan×"
        ratios = self.ratios(name, base, tokens)
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else ""
        return f"{self.speedup(name, base, tokens):.2f}×{spread}"


@dataclass
class Fresh:
    """A method with per-call state built untimed before each call (a fresh drafter that adapts, or one loaded
    from disk): :func:`interleave` calls ``make()``, then times ``run(prompt, seed, state)``."""

    make: Callable[[], Any]
    run: Callable[[Any, int, Any], Any]


def _rotated(names: list[str], t: int) -> list[str]:
    if not names:
        return names
    k = t % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if (t // len(names)) % 2 else order


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {' '.join(lines[0].split())[:120] if lines else ''}"


def interleave(methods: Mapping[str, Callable[[Any, int], Any]], prompts: Sequence, *, repeats: int = 1,
               warmup: bool = True, meter: Any = None, catch: bool = False,
               on_round: Callable[[], None] | None = None, label: str | None = None) -> Runs:
    """Run every method on every prompt, ``repeats`` times, round by round in rotated order (see the glossary).

    ``on_round`` is called (untimed) after every round, e.g. to sample a micro-benchmark between rounds;
    ``label`` prints a progress line per round to stderr.
    """
    runs = Runs(names=list(methods))

    def prepared(name: str, prompt, seed: int) -> Callable[[], Any]:
        fn = methods[name]
        state = fn.make() if isinstance(fn, Fresh) else None
        torch.manual_seed(seed)
        return (lambda: fn.run(prompt, seed, state)) if isinstance(fn, Fresh) else (lambda: fn(prompt, seed))

    if warmup and prompts:
        for name in runs.names:
            try:
                prepared(name, prompts[0], 0)()
            except Exception as exc:  # e.g. an HF feature that refuses this model or batch
                if not catch:
                    raise
                runs.failed[name] = _error(exc)
    t_start = time.perf_counter()
    total = repeats * len(prompts)
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            t = r * len(prompts) + i
            alive = [n for n in runs.names if n not in runs.failed]
            for name in _rotated(alive, t):
                try:
                    run = prepared(name, prompt, 1000 + t)
                    if meter is not None:
                        meter.start()
                    try:
                        t0 = time.perf_counter()
                        result = run()
                        seconds = time.perf_counter() - t0
                    finally:
                        measured = meter.stop() if meter is not None else None
                except Exception as exc:
                    if not catch:
                        raise
                    runs.failed[name] = _error(exc)
                    continue
                runs.calls.append(Call(name, i, r, seconds, result, measured))
            if on_round is not None:
                on_round()
            if label:
                print(f"[{label}] round {t + 1}/{total} done ({time.perf_counter() - t_start:.0f} s)",
                      file=sys.stderr, flush=True)
    runs.seconds = time.perf_counter() - t_start
    return runs


class ForwardMeter:
    """A meter for :func:`interleave`: the forwards of ``model`` during a call, as (tokens fed, seconds inside).

    Forward hooks, installed by ``start()`` and removed by ``stop()``, which returns the list.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls: list[tuple[int, float]] = []
        self._handles: list = []
        self._t0 = 0.0
        self._width = 0

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._width = int(ids.shape[1]) if ids is not None else int(kwargs["inputs_embeds"].shape[1])
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.calls.append((self._width, time.perf_counter() - self._t0))

    def start(self) -> None:
        self.calls = []
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post, with_kwargs=True)]

    def stop(self) -> list[tuple[int, float]]:
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.calls


# -- timers -------------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], reps: int, *, undo: Callable[[], Any] | None = None,
               warmup: int = 0) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones; ``undo()`` untimed after each."""
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if undo is not None:
            undo()
    return times


def median_seconds(fn: Callable[[], Any], reps: int = 15, *, undo: Callable[[], Any] | None = None,
                   warmup: int = 2) -> float:
    """The median timer: median seconds of ``reps`` calls of ``fn`` (see :func:`time_calls`)."""
    return statistics.median(time_calls(fn, reps, undo=undo, warmup=warmup))


class CachedForward:
    """An HF model with ``prefix`` (model inputs: ids, mask, pixels, ...) in a KV cache; :meth:`samples` times
    forwarding ``step`` (model inputs, without the cache) on top of it, the step cropped off after each."""

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, prefix: Mapping[str, Any], step: Mapping[str, Any]):
        from transformers import DynamicCache

        self.model, self.step = model, dict(step)
        self.width = int(self.step["input_ids"].shape[1])
        self.cache = DynamicCache()
        model(**prefix, past_key_values=self.cache, use_cache=True)

    @torch.no_grad()
    def _forward(self) -> None:
        self.model(**self.step, past_key_values=self.cache, use_cache=True)

    def samples(self, reps: int, warmup: int = 0) -> list[float]:
        return time_calls(self._forward, reps, undo=lambda: self.cache.crop(-self.width), warmup=warmup)

    def median(self, reps: int = 15, warmup: int = 2) -> float:
        return statistics.median(self.samples(reps, warmup))


def decode_step_seconds(model: torch.nn.Module, inputs: Mapping[str, Any], reps: int = 15, warmup: int = 2) -> float:
    """Median seconds of one cached single-token forward after prefilling ``inputs`` (a dict of model inputs)."""
    ids = inputs["input_ids"]
    step = {"input_ids": ids[:, -1:]}
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        step["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return CachedForward(model, inputs, step).median(reps, warmup)


@torch.no_grad()
def session_seconds(model: torch.nn.Module, context: torch.Tensor, step: torch.Tensor, *,
                    features: tuple[torch.Tensor, torch.Tensor] | None = None, num_logits: int | None = 1,
                    reps: int = 15, warmup: int = 2) -> float:
    """Median seconds of one :meth:`mmspec.cache.CacheSession.extend` of ``step`` ([B, w] ids) with ``context``
    ([B, n] ids) in the cache, the step rolled back after each; ``features`` (context's, step's) for a feature
    head; ``num_logits`` as ``extend`` takes it (None: every column)."""
    from mmspec.cache import CacheSession

    session = CacheSession(model, context.shape[0], context.device)
    ctx_kw, step_kw = ({}, {}) if features is None else ({"features": features[0]}, {"features": features[1]})
    session.extend(context, num_logits=1, **ctx_kw)
    width = torch.full((step.shape[0],), step.shape[1], dtype=torch.long)
    return median_seconds(lambda: session.extend(step, num_logits=num_logits, **step_kw),
                          reps, undo=lambda: session.rollback(width), warmup=warmup)


# -- the machine line ---------------------------------------------------------------------------------------------
def begin(threads: int) -> tuple[float, float, float] | None:
    """The start of every script: ``threads`` torch threads, library warnings silenced; returns the load average
    now (the machine line's "before")."""
    import warnings

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    return load_average()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on this platform
        return None


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    except OSError:  # pragma: no cover - not Linux
        pass
    return model or platform.processor() or platform.machine(), flags


def speed_flags(flags: Iterable[str]) -> list[str]:
    """The CPU flags that change the speed of these benchmarks: avx2, avx_vnni, avx512*, amx*."""
    return [f for f in flags if f in ("avx2", "avx_vnni") or f.startswith(("avx512", "amx"))]


def _fmt_load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)


def machine_line(load_before: tuple[float, float, float] | None = None) -> str:
    """CPU model, logical CPUs, torch threads, speed-relevant CPU flags, versions, load average before / now."""
    import transformers

    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    fast = speed_flags(flags)
    load = (f"1/5/15-min load average {_fmt_load(load_before)} before, {_fmt_load(load_average())} after"
            if load_before is not None else f"1/5/15-min load average {_fmt_load(load_average())}")
    return (f"{model}, {usable} of {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} thread(s), transformers {transformers.__version__}, Python "
            f"{platform.python_version()}; CPU flags: {' '.join(fast) if fast else 'no avx2 / avx512 / amx'}; {load}")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """``python -m benchmarks.<module> <args>`` as it was run (``argv`` None: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m benchmarks." + module, *(shlex.quote(a) for a in args)])


def provenance(module: str, argv: Sequence[str] | None, load_before: tuple[float, float, float] | None) -> str:
    """The line every section starts with: the command, the date (UTC) and the machine line."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Command: `{command_line(module, argv)}` — {date}; machine: {machine_line(load_before)}."


# -- tables and sections ------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """``--quick`` sets the options of ``quick_values`` (whatever was given for them)."""

    quick_values: Mapping[str, Any] = {}

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if ns.quick:
            for key, value in self.quick_values.items():
                setattr(ns, key, value)
        return ns


def arg_parser(module: str, doc: str, *, prompts: int | None = None, max_new_tokens: int | None = None,
               section: str | None = None, plots: str | None = None, quick: Mapping[str, Any] | None = None,
               quick_also: str = "") -> argparse.ArgumentParser:
    """The parser every script starts from: ``--quick`` (a smoke run: the options in ``quick`` take those values;
    ``quick_also`` says what else it changes) and ``--out``; with ``prompts`` / ``max_new_tokens``
    (their defaults) the workload's ``--prompts`` / ``--max-new-tokens``; with ``section`` (its default heading)
    ``--section``, with ``plots`` (what the figures are) ``--plots``. Sections and figures are written only where
    ``--out`` / ``--plots`` point."""
    ap = _Parser(prog=f"python -m benchmarks.{module}", description=doc.strip().split("\n\n")[0])
    ap.quick_values = dict(quick or {})
    smaller = [f"--{k.replace('_', '-')} {v}" for k, v in ap.quick_values.items()] + [quick_also] * bool(quick_also)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run, its table not worth keeping" + (f" ({', '.join(smaller)})" if smaller else ""))
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown file (benchmarks/RESULTS.md) to write the section into: replaced in place, its "
                         "hand-written notes kept, else appended (default: print only)")
    if prompts is not None:
        ap.add_argument("--prompts", type=int, default=prompts, help="how many of the script's prompts to run")
    if max_new_tokens is not None:
        ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="new tokens per prompt (at most, where EOS ends a row)")
    if section is not None:
        ap.add_argument("--section", default=section, help="the section heading to (re)write")
    if plots is not None:
        ap.add_argument("--plots", type=Path, default=None, help=f"folder for {plots} (default: none)")
    return ap


def md_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Markdown table lines: the header, its rule and one line per row (cells as ``str``)."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section starting at ``heading`` (up to the next ``## ``) with ``text``, keeping the old
    section's hand-written notes (from ``<!-- notes`` on); a new section is appended."""
    path = Path(path)
    old_text = path.read_text() if path.exists() else "# mmspec benchmarks\n"
    text = text.rstrip("\n") + "\n"
    start = ("\n" + old_text).find("\n" + heading + "\n")  # the heading's own line, not a longer one
    if start < 0:
        new = old_text.rstrip("\n") + "\n\n" + text
    else:
        end = old_text.find("\n## ", start + 1)
        old = old_text[start:] if end < 0 else old_text[start:end + 1]
        notes = old[old.index(_NOTES_PREFIX):].rstrip("\n") + "\n" if _NOTES_PREFIX in old else ""
        new = old_text[:start] + text + ("\n" + notes if notes else "") + ("" if end < 0 else old_text[end:])
    path.write_text(new)


def report(text: str, out: Path | None, heading: str) -> None:
    """Print the section and, with ``out``, write it into that markdown file."""
    print(text)
    if out is not None:
        write_section(Path(out), heading, text)
        print(f"[benchmarks] wrote section {heading!r} to {out}", file=sys.stderr)


# -- statistics -----------------------------------------------------------------------------------------------------
def pool_stats(stats: Iterable) -> Any:
    """One ``mmspec.stats.GenerationStats`` summing several (numbers, and per-position lists element-wise)."""
    from mmspec.stats import GenerationStats

    out = GenerationStats()
    for s in stats:
        for f in dataclasses.fields(GenerationStats):
            mine, theirs = getattr(out, f.name), getattr(s, f.name)
            if isinstance(mine, (int, float)) and not isinstance(mine, bool):
                setattr(out, f.name, mine + theirs)
            elif isinstance(mine, list):
                mine.extend([0] * (len(theirs) - len(mine)))
                for i, v in enumerate(theirs):
                    mine[i] += v
    return out


def pool_accepted_lengths(stats: Iterable) -> list[int]:
    """Sum the ``accepted_length_counts`` of several GenerationStats (lists of different lengths)."""
    return pool_stats(stats).accepted_length_counts
