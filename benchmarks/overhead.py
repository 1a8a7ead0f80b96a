"""Per-step overhead of mmspec's loop against HF ``generate`` on SmolLM2-135M-Instruct (issue 13, item 5).

Run from the repository root::

    python -m benchmarks.overhead                  # 4 prompts x 2 rounds, 128 new tokens (~5 min, 1 thread)
    python -m benchmarks.overhead --quick          # 2 prompts x 1 round, 32 new tokens
    python -m benchmarks.overhead --cprofile       # also a cProfile of one mmspec prompt-lookup run

Batch 1, greedy. Each round runs every prompt, and on each prompt every method in an order rotated
from prompt to prompt (reversed on odd rounds), so drifts of a shared machine hit all methods alike:

    HF plain             ``model.generate(do_sample=False)``
    HF prompt lookup     ``model.generate(prompt_lookup_num_tokens=k)`` (HF's ``max_matching_ngram_size``
                         default, 2, which is also mmspec's)
    mmspec plain         ``engine.generate(drafter=None)``
    mmspec prompt lookup ``engine.generate(drafter="prompt_lookup", num_draft_tokens=k)``

Every mmspec output and HF's prompt-lookup output are checked token for token against HF plain
greedy. Forward pre/post hooks on the target count its forwards, the tokens each one is fed and the
time spent inside them, for HF and mmspec alike.

Glossary:
    tok/s        generated tokens (EOS included) / wall time, summed over all runs of a method
    x HF plain   tok/s / HF plain tok/s; the per-prompt-run ratio's range in brackets
    tok/fwd      generated tokens per target forward (prefill included): the measured tau
    widths       tokens fed per forward after the first, "width x count" (the first forward is the
                 prompt: alone for HF plain; with the first draft for HF prompt lookup and, since issue
                 13, for mmspec plain and prompt lookup)
    split        ms per forward after the first (a decode step): target forward (inside the model),
                 extend (the session's mask and positions around the forward), drafter (propose +
                 observe), verify, bookkeeping (rollback, commit, row removal) and the rest of the
                 loop's Python; HF rows have only forward and "outside" (everything ``generate`` does
                 around its forwards)

Timings on a shared 2-core machine move with its load (``uptime`` is printed with the results):
read the interleaved ratios, not the absolute numbers. ``--threads 1`` is the default: with other
processes running, two OpenMP threads made every forward several times slower and far noisier here
(per-method tok/s moved by 2x between rounds), which hides the loop's own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp and "
    "a notebook in which he recorded the weather, the passing ships and the colour of the sea. Over forty "
    "years he filled more than two hundred notebooks, and when he retired the town museum put them on "
    "display so that visitors could read about storms that nobody else remembered.")
PARAGRAPH_2 = (
    "Our team meets every Monday morning to review the previous week. Each person describes what they "
    "finished, what is blocked and what they plan to do next. The meeting lasts thirty minutes, and the "
    "notes are shared with everyone in the company by noon.")

PROMPTS = (
    f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "What is the capital of France? Describe its history briefly.",
    f"Rewrite the following paragraph in the past tense, keeping everything else the same:\n\n{PARAGRAPH_2}",
    "Write a short Python function that checks whether a number is prime, and explain how it works.",
)

METHODS = ("HF plain", "HF prompt lookup", "mmspec plain", "mmspec prompt lookup")


@dataclass
class Tally:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    forward_s: float = 0.0  # inside decode forwards (prefill excluded)
    prefill_s: float = 0.0
    steps: int = 0  # forwards after the first (decode steps)
    widths: Counter = field(default_factory=Counter)
    identical: list[bool] = field(default_factory=list)
    per_run_tps: list[float] = field(default_factory=list)
    # mmspec split, seconds
    extend_s: float = 0.0
    drafter_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0
    rest_s: float = 0.0


class ForwardMeter:
    """Counts the target's forwards, their input widths and the time inside them (pre/post hooks)."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[tuple[int, float]] = []  # (width, seconds)
        self._t0 = 0.0
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._width = int(ids.shape[1]) if ids is not None else int(kwargs["inputs_embeds"].shape[1])
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.calls.append((self._width, time.perf_counter() - self._t0))

    def reset(self) -> None:
        self.calls = []

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def run_method(name: str, model, ids, mask, *, k: int, max_new_tokens: int):
    """(generated token ids, seconds, mmspec stats or None)."""
    from mmspec import engine

    t = time.perf_counter()
    if name == "HF plain":
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        seq, stats = out[0, ids.shape[1]:], None
    elif name == "HF prompt lookup":
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             prompt_lookup_num_tokens=k)
        seq, stats = out[0, ids.shape[1]:], None
    else:
        drafter = "prompt_lookup" if name == "mmspec prompt lookup" else None
        res = engine.generate(model, ids, attention_mask=mask, drafter=drafter, num_draft_tokens=k,
                              max_new_tokens=max_new_tokens)
        seq, stats = res.sequences[0, ids.shape[1]:ids.shape[1] + res.num_generated[0]], res.stats
    return seq.tolist(), time.perf_counter() - t, stats


def load_avg() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover
        return "load average n/a"


def trim_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def main(argv: list[str] | None = None) -> dict[str, Tally]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("-k", "--num-draft-tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 1 round, 32 new tokens")
    ap.add_argument("--cprofile", action="store_true", help="cProfile one mmspec prompt-lookup run at the end")
    ap.add_argument("--model", default="smollm2", help="anything mmspec.pretrained.load_causal_lm takes")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.max_new_tokens, args.prompts = 1, 32, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from mmspec.pretrained import chat_inputs, load_causal_lm

    model, tok = load_causal_lm(args.model)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompts = [chat_inputs(tok, [p]) for p in PROMPTS[: args.prompts]]
    k, T = args.num_draft_tokens, args.max_new_tokens
    print(f"SmolLM2 overhead: {len(prompts)} prompts x {args.rounds} rounds, {T} new tokens, k={k}, "
          f"threads={args.threads}, {load_avg()}", flush=True)

    meter = ForwardMeter(model)
    with torch.no_grad():  # warm up every path once
        for name in METHODS:
            run_method(name, model, prompts[0]["input_ids"], prompts[0]["attention_mask"], k=k, max_new_tokens=4)
    tallies = {name: Tally(name) for name in METHODS}
    ratios: dict[str, list[float]] = {name: [] for name in METHODS}
    pl_vs_hf_pl: list[float] = []
    run = 0
    for r in range(args.rounds):
        for pi, enc in enumerate(prompts):
            ids, mask = enc["input_ids"], enc["attention_mask"]
            order = list(METHODS[run % len(METHODS):] + METHODS[: run % len(METHODS)])
            if r % 2:
                order.reverse()
            run += 1
            tps, outputs = {}, {}
            for name in order:
                meter.reset()
                seq, secs, stats = run_method(name, model, ids, mask, k=k, max_new_tokens=T)
                seq = trim_eos(seq, eos)
                outputs[name] = seq
                t = tallies[name]
                t.tokens += len(seq)
                t.seconds += secs
                t.forwards += len(meter.calls)
                t.prefill_s += meter.calls[0][1]
                decode_calls = meter.calls[1:]
                t.forward_s += sum(s for _, s in decode_calls)
                t.widths.update(w for w, _ in decode_calls)
                tps[name] = len(seq) / secs
                t.per_run_tps.append(tps[name])
                t.steps += len(decode_calls)
                if stats is not None:
                    # the loop's own forwards: all of them when step 0 fed the prompt, else all but the prefill
                    in_loop = meter.calls if len(meter.calls) == stats.steps else decode_calls
                    fwd = sum(s for _, s in in_loop)
                    drafter = stats.drafter_time - stats.drafter_prefill_time
                    book = getattr(stats, "bookkeeping_time", 0.0)
                    t.extend_s += stats.target_time - fwd
                    t.drafter_s += drafter
                    t.verify_s += stats.verify_time
                    t.bookkeeping_s += book
                    t.rest_s += (stats.total_time - stats.prefill_time - stats.drafter_prefill_time
                                 - stats.target_time - drafter - stats.verify_time - book)
            for name in METHODS:
                tallies[name].identical.append(outputs[name] == outputs["HF plain"])
                ratios[name].append(tps[name] / tps["HF plain"])
            pl_vs_hf_pl.append(tps["mmspec prompt lookup"] / tps["HF prompt lookup"])
            print(f"  round {r} prompt {pi}: " + ", ".join(f"{n} {tps[n]:.1f}" for n in METHODS) + " tok/s"
                  f" ({len(outputs['HF plain'])} tokens, {load_avg()})", flush=True)
    meter.close()
    report(tallies, ratios, pl_vs_hf_pl)
    if args.cprofile:
        profile(model, prompts[0], k, T)
    return tallies


def report(tallies: dict[str, Tally], ratios: dict[str, list[float]], pl_vs_hf_pl: list[float]) -> None:
    base = tallies["HF plain"]
    base_tps = base.tokens / base.seconds
    print(f"\n{load_avg()}")
    print("| method | tok/s | x HF plain [range] | tok/fwd | forwards | widths (decode) | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, t in tallies.items():
        tps = t.tokens / t.seconds
        rs = ratios[name]
        widths = ", ".join(f"{w}x{c}" for w, c in sorted(t.widths.items()))
        print(f"| {name} | {tps:.2f} | {tps / base_tps:.2f} [{min(rs):.2f}-{max(rs):.2f}] | "
              f"{t.tokens / t.forwards:.2f} | {t.forwards} | {widths} | {all(t.identical)} |")
    print(f"\nmmspec prompt lookup / HF prompt lookup, per run: median {statistics.median(pl_vs_hf_pl):.2f} "
          f"(range {min(pl_vs_hf_pl):.2f}-{max(pl_vs_hf_pl):.2f}); overall "
          f"{(tallies['mmspec prompt lookup'].tokens / tallies['mmspec prompt lookup'].seconds) / (tallies['HF prompt lookup'].tokens / tallies['HF prompt lookup'].seconds):.2f}")
    print("\nms per decode step (the first forward, with the prompt, excluded):")
    print("| method | steps | forward | extend | drafter | verify | bookkeeping | rest / outside | ms/fwd-token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t in tallies.items():
        n = max(t.steps, 1)
        fed = sum(w * c for w, c in t.widths.items())
        if name.startswith("HF"):
            outside = t.seconds - t.prefill_s - t.forward_s
            print(f"| {name} | {t.steps} | {1e3 * t.forward_s / n:.1f} | - | - | - | - | {1e3 * outside / n:.2f} | "
                  f"{1e3 * t.forward_s / max(fed, 1):.1f} |")
        else:
            print(f"| {name} | {t.steps} | {1e3 * t.forward_s / n:.1f} | {1e3 * t.extend_s / n:.2f} | "
                  f"{1e3 * t.drafter_s / n:.2f} | {1e3 * t.verify_s / n:.2f} | {1e3 * t.bookkeeping_s / n:.2f} | "
                  f"{1e3 * t.rest_s / n:.2f} | {1e3 * t.forward_s / max(fed, 1):.1f} |")


def profile(model, enc, k: int, max_new_tokens: int) -> None:
    """cProfile of one mmspec prompt-lookup run: the loop's own functions by total time."""
    from mmspec import engine

    pr = cProfile.Profile()
    with torch.no_grad():
        pr.enable()
        engine.generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], drafter="prompt_lookup",
                        num_draft_tokens=k, max_new_tokens=max_new_tokens)
        pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(r"mmspec|kernels", 20)
    print("\ncProfile, mmspec prompt lookup (mmspec and kernels functions by own time):")
    print(buf.getvalue())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
