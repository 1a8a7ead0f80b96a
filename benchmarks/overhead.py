"""Per-step overhead of mmspec's loop against HF ``generate`` on SmolLM2-135M-Instruct (issue 13, item 5).

Run from the repository root::

    python -m benchmarks.overhead                  # 4 prompts x 2 rounds, 128 new tokens (~5 min, 1 thread)
    python -m benchmarks.overhead --quick          # 2 prompts x 1 round, 32 new tokens
    python -m benchmarks.overhead --cprofile       # also a cProfile of one mmspec prompt-lookup run

Batch 1, greedy. One interleaved run (``benchmarks._harness.interleave``): after a warm-up, each round
runs every prompt, and on each prompt every method in an order rotated from prompt to prompt, so
drifts of a shared machine hit all methods alike:

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

Timings on a shared 2-core machine move with its load (the machine line printed with the results
gives the load average before and after):
read the interleaved ratios, not the absolute numbers. ``--threads 1`` is the default: with other
processes running, two OpenMP threads made every forward several times slower and far noisier here
(per-method tok/s moved by 2x between rounds), which hides the loop's own cost.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import pstats
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

from ._harness import ForwardMeter, arg_parser, begin, interleave, md_table, provenance, report

HEADING = "## Loop overhead against HF generate on SmolLM2 (issue 13)"

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
    # mmspec split, seconds
    extend_s: float = 0.0
    drafter_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0
    rest_s: float = 0.0


def run_method(name: str, model, ids, mask, *, k: int, max_new_tokens: int):
    """(generated token ids, mmspec stats or None)."""
    from mmspec import engine

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
    return seq.tolist(), stats


def trim_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("overhead", __doc__, prompts=len(PROMPTS), max_new_tokens=128,
                    quick={"rounds": 1, "max_new_tokens": 32, "prompts": 2})
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-k", "--num-draft-tokens", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cprofile", action="store_true", help="cProfile one mmspec prompt-lookup run at the end")
    ap.add_argument("--model", default="smollm2", help="anything mmspec.pretrained.load_causal_lm takes")
    args = ap.parse_args(argv)
    load_before = begin(args.threads)
    from mmspec.pretrained import chat_inputs, load_causal_lm

    model, tok = load_causal_lm(args.model)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompts = [chat_inputs(tok, [p]) for p in PROMPTS[: args.prompts]]
    k, T = args.num_draft_tokens, args.max_new_tokens
    print(f"SmolLM2 overhead: {len(prompts)} prompts x {args.rounds} rounds, {T} new tokens, k={k}, "
          f"threads={args.threads}", flush=True)

    def method(name: str):
        return lambda enc, seed: run_method(name, model, enc["input_ids"], enc["attention_mask"], k=k,
                                            max_new_tokens=T)

    with torch.no_grad():
        runs = interleave({name: method(name) for name in METHODS}, prompts, repeats=args.rounds,
                          meter=ForwardMeter(model), label="overhead")
    seqs = {id(c): trim_eos(c.result[0], eos) for c in runs.calls}
    ref = {(c.repeat, c.index): seqs[id(c)] for c in runs.of("HF plain")}

    def tokens(call) -> int:
        return len(seqs[id(call)])

    tallies = {name: Tally(name) for name in METHODS}
    for c in runs.calls:
        t, stats, calls = tallies[c.method], c.result[1], c.meter
        t.tokens += tokens(c)
        t.seconds += c.seconds
        t.forwards += len(calls)
        t.prefill_s += calls[0][1]
        decode_calls = calls[1:]
        t.forward_s += sum(sec for _, sec in decode_calls)
        t.widths.update(w for w, _ in decode_calls)
        t.steps += len(decode_calls)
        t.identical.append(seqs[id(c)] == ref[(c.repeat, c.index)])
        if stats is not None:
            # the loop's own forwards: all of them when step 0 fed the prompt, else all but the prefill
            in_loop = calls if len(calls) == stats.steps else decode_calls
            fwd = sum(sec for _, sec in in_loop)
            drafter = stats.drafter_time - stats.drafter_prefill_time
            book = getattr(stats, "bookkeeping_time", 0.0)
            t.extend_s += stats.target_time - fwd
            t.drafter_s += drafter
            t.verify_s += stats.verify_time
            t.bookkeeping_s += book
            t.rest_s += (stats.total_time - stats.prefill_time - stats.drafter_prefill_time
                         - stats.target_time - drafter - stats.verify_time - book)
    ratios = {name: runs.ratios(name, "HF plain", tokens) for name in METHODS}
    pl_vs_hf_pl = runs.ratios("mmspec prompt lookup", "HF prompt lookup", tokens)
    text = "\n".join([HEADING, "", f"{provenance('overhead', argv, load_before)} {len(prompts)} chat prompts x "
                      f"{args.rounds} rounds, {T} new tokens, k = {k}, batch 1, greedy.", "",
                      *tables(tallies, ratios, pl_vs_hf_pl), ""])
    report(text, args.out, HEADING)
    if args.cprofile:
        profile(model, prompts[0], k, T)
    return 0


def tables(tallies: dict[str, Tally], ratios: dict[str, list[float]], pl_vs_hf_pl: list[float]) -> list[str]:
    base = tallies["HF plain"]
    base_tps = base.tokens / base.seconds
    rows = []
    for name, t in tallies.items():
        tps = t.tokens / t.seconds
        rs = ratios[name]
        widths = ", ".join(f"{w}x{c}" for w, c in sorted(t.widths.items()))
        rows.append([name, f"{tps:.2f}", f"{tps / base_tps:.2f} [{min(rs):.2f}-{max(rs):.2f}]",
                     f"{t.tokens / t.forwards:.2f}", t.forwards, widths, all(t.identical)])
    lines = md_table(["method", "tok/s", "x HF plain [range]", "tok/fwd", "forwards", "widths (decode)",
                      "identical"], rows)
    pl, hf_pl = tallies["mmspec prompt lookup"], tallies["HF prompt lookup"]
    lines += ["", f"mmspec prompt lookup / HF prompt lookup, per run: median {statistics.median(pl_vs_hf_pl):.2f} "
              f"(range {min(pl_vs_hf_pl):.2f}-{max(pl_vs_hf_pl):.2f}); overall "
              f"{(pl.tokens / pl.seconds) / (hf_pl.tokens / hf_pl.seconds):.2f}", "",
              "ms per decode step (the first forward, with the prompt, excluded):", ""]
    rows = []
    for name, t in tallies.items():
        n = max(t.steps, 1)
        fed = sum(w * c for w, c in t.widths.items())
        per_token = f"{1e3 * t.forward_s / max(fed, 1):.1f}"
        if name.startswith("HF"):
            outside = t.seconds - t.prefill_s - t.forward_s
            rows.append([name, t.steps, f"{1e3 * t.forward_s / n:.1f}", "-", "-", "-", "-", f"{1e3 * outside / n:.2f}",
                         per_token])
        else:
            split = (t.extend_s, t.drafter_s, t.verify_s, t.bookkeeping_s, t.rest_s)
            rows.append([name, t.steps, f"{1e3 * t.forward_s / n:.1f}", *(f"{1e3 * v / n:.2f}" for v in split),
                         per_token])
    return lines + md_table(["method", "steps", "forward", "extend", "drafter", "verify", "bookkeeping",
                             "rest / outside", "ms/fwd-token"], rows)


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
        sys.exit(main())
