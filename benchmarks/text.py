"""Text speculative-decoding benchmark: mmspec vs HF plain / assisted / prompt-lookup generation.

Run from the repository root::

    python -m benchmarks.text                      # full run (trains the models once, ~4 min)
    python -m benchmarks.text --quick              # smoke run (< 1 min)
    python -m benchmarks.text --out benchmarks/RESULTS.md
    python -m benchmarks.text --model smollm2      # the real SmolLM2-135M-Instruct (benchmarks/smollm2.py)

One interleaved run on the same trained byte-level target/drafter pair (see
``benchmarks/_text_models.py``): each repeat is one round per prompt, and each round runs every
batch-1 method on that prompt, the order rotated (and reversed on alternate rounds) so drifts of
a shared machine hit all methods alike; the batch-4 pair runs once per repeat. Speedups are
ratios of tokens/s (all tokens / all time) to the HF plain baseline of the same mode and batch
size, with the range of the per-round ratios. No EOS exists, so every method generates exactly
``--max-new-tokens`` tokens; greedy outputs are checked token for token against HF plain greedy
(column "identical").

Greedy decoding of such small, briefly trained models can fall into loops that target and
drafter both predict (acceptance near 1 on that prompt); the sampled rows (temperature
``--temperature``, exact rejection sampling) show the acceptance of the full distributions.

Timing uses ``--threads 1`` by default: these models are too small for intra-op parallelism to
help a single-token forward, and on a shared machine 2 OpenMP threads were measured 7x slower
(34.6 vs 5.0 ms per target forward) while other processes ran.

Glossary:
    tau      mean accepted length: tokens emitted per verification step (accepted + 1)
    alpha    acceptance rate: accepted / drafted tokens
    c        drafter cost ratio: one single-token drafter forward / one single-token target
             forward, both with a KV cache at the prompt+half-generation context, timed in a
             micro-benchmark (0 for prompt lookup, which runs no model)
    theory   (1 - alpha^(k+1)) / ((1 - alpha)(1 + c k)): the i.i.d.-acceptance speedup of
             Leviathan et al. (2023), which assumes a (k+1)-token verification costs one
             single-token forward and that nothing but forwards costs time
    theory (tau)
             tau / (1 + c k): the same cost model with the measured tokens per step instead of
             the i.i.d. prediction from alpha (acceptances within a step are strongly correlated
             here, so the i.i.d. formula underestimates tau)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

SECTION_HEADING = "## Text (issue: foundation)"
NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"
STAT_FIELDS = ("steps", "row_steps", "target_calls", "drafter_calls", "drafted_tokens", "accepted_tokens",
               "emitted_tokens", "prefill_time", "drafter_prefill_time", "target_time", "drafter_time",
               "verify_time", "total_time")


@dataclass
class Method:
    name: str
    batch: int  # 1: one call per prompt; >1: all prompts in one left-padded call
    run: Callable[[torch.Tensor, torch.Tensor, int], tuple[list[list[int]], object | None]]  # (ids, mask, seed)
    family: str  # "hf", "mmspec", "ref"
    mode: str = "greedy"  # "greedy" or "sampled"
    c: float | None = None  # drafter cost ratio for the theory column (mmspec rows)
    c_label: str = ""
    times: list[float] = field(default_factory=list)  # per round: seconds
    tokens: list[int] = field(default_factory=list)  # per round: generated tokens
    identical: int = 0
    checked: int = 0
    stats: dict = field(default_factory=lambda: dict.fromkeys(STAT_FIELDS, 0))
    accepted_at: list[int] = field(default_factory=list)
    drafted_at: list[int] = field(default_factory=list)
    calls: int = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.text", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per prompt (default 128; quick 24)")
    p.add_argument("--k", type=int, default=5, help="draft length for every speculative method (default 5)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny training budget, short generations")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write the results section into (replaced if present, else appended)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (default ~/.cache/mmspec/bench_text)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads while timing (default 1; training picks its own)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled rows (default 1)")
    p.add_argument("--no-batch", action="store_true", help="skip the batch-4 rows")
    p.add_argument("--no-sampled", action="store_true", help="skip the sampled rows")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 24 if args.quick else 128
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.k < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        p.error("--k, --max-new-tokens and --repeats must be >= 1")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (the greedy rows are always run)")
    return args


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel():] = p
        mask[b, width - p.numel():] = 1
    return ids, mask


class ForwardBench:
    """Cached forwards at a fixed context, sampled a few at a time between benchmark rounds.

    Keys: ``target_1`` (one token), ``target_w`` (w = k + 1 tokens, one verification),
    ``drafter_1``; :meth:`medians` gives median seconds over every sample taken.
    """

    def __init__(self, target, drafter, context: torch.Tensor, width: int):
        from transformers import DynamicCache

        self.width = width
        self.models = {}
        with torch.no_grad():
            for name, model in (("target", target), ("drafter", drafter)):
                cache = DynamicCache()
                model(input_ids=context[None], past_key_values=cache, use_cache=True)
                self.models[name] = (model, cache)
        self.step = context[None, -width:]
        self.jobs = (("target_1", "target", 1), ("target_w", "target", width), ("drafter_1", "drafter", 1))
        self.samples: dict[str, list[float]] = {key: [] for key, _, _ in self.jobs}

    @torch.no_grad()
    def sample(self, reps: int) -> None:
        for _ in range(reps):
            for key, name, w in self.jobs:
                model, cache = self.models[name]
                t0 = time.perf_counter()
                model(input_ids=self.step[:, -w:], past_key_values=cache, use_cache=True)
                self.samples[key].append(time.perf_counter() - t0)
                cache.crop(-w)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}


def build_methods(target, drafter, args, pad_id: int) -> list[Method]:
    import mmspec

    n, k, temp = args.max_new_tokens, args.k, args.temperature
    # HF assisted generation: constant k drafts, no confidence early-stop (as mmspec's fixed k)
    gc = drafter.generation_config
    gc.num_assistant_tokens = k
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0
    # HF would otherwise fill in its default top_k=50 when sampling
    sampled_hf = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0)

    def new_tokens(seqs: torch.Tensor, width: int) -> list[list[int]]:
        return seqs[:, width:].tolist()

    def hf(sampled=False, **extra):
        def run(ids, mask, seed):
            if sampled:
                torch.manual_seed(seed)
            out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=pad_id,
                                  **(sampled_hf if sampled else dict(do_sample=False)), **extra)
            return new_tokens(out, ids.shape[1]), None
        return run

    def spec(d, sampled=False):
        def run(ids, mask, seed):
            gen = torch.Generator().manual_seed(seed) if sampled else None
            out = mmspec.generate(target, ids, attention_mask=mask, drafter=d, max_new_tokens=n,
                                  num_draft_tokens=k, temperature=temp if sampled else 0.0, generator=gen)
            return new_tokens(out.sequences, ids.shape[1]), out.stats
        return run

    @torch.no_grad()
    def manual(ids, mask, seed):
        from transformers import DynamicCache

        cache = DynamicCache()
        logits = target(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        out = []
        for _ in range(n):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            logits = target(input_ids=tok, past_key_values=cache, use_cache=True).logits
        return torch.cat(out, 1).tolist(), None

    methods = [
        Method("HF plain greedy (AR)", 1, hf(), "hf"),
        Method("AR manual cached loop (reference)", 1, manual, "ref"),
        Method("HF assisted (drafter)", 1, hf(assistant_model=drafter), "hf"),
        Method("HF prompt lookup", 1, hf(prompt_lookup_num_tokens=k), "hf"),
        Method("mmspec drafter", 1, spec(drafter), "mmspec", c_label="fwd"),
        Method("mmspec prompt lookup", 1, spec("prompt_lookup"), "mmspec", c=0.0, c_label="lookup"),
        Method("mmspec self-draft (drafter=target)", 1, spec(target), "mmspec", c=1.0, c_label="= target"),
    ]
    if not args.no_sampled:
        methods += [
            Method(f"HF plain sampled (AR), T={temp:g}", 1, hf(sampled=True), "hf", mode="sampled"),
            Method(f"HF assisted (drafter), T={temp:g}", 1, hf(sampled=True, assistant_model=drafter), "hf",
                   mode="sampled"),
            Method(f"mmspec drafter, T={temp:g}", 1, spec(drafter, sampled=True), "mmspec", mode="sampled",
                   c_label="fwd"),
        ]
    if not args.no_batch:
        methods += [
            Method("HF plain greedy (AR), B=4", 4, hf(), "hf"),
            Method("mmspec drafter, B=4", 4, spec(drafter), "mmspec", c_label="fwd"),
        ]
    return methods


def add_stats(m: Method, stats) -> None:
    m.calls += 1
    for f in STAT_FIELDS:
        m.stats[f] += getattr(stats, f)
    for acc, src in ((m.accepted_at, stats.accepted_at_position), (m.drafted_at, stats.drafted_at_position)):
        acc.extend([0] * (len(src) - len(acc)))
        for i, v in enumerate(src):
            acc[i] += v


def run_benchmark(methods: list[Method], prompts, reference, args, pad_id: int, progress,
                  on_round: Callable[[], None]) -> None:
    """Repeats x rounds: each round runs every batch-1 method on one prompt (rotated order), the
    batch-4 methods run as a block at the end of each repeat (alternating order)."""
    batched = left_pad(prompts, pad_id)
    singles = [m for m in methods if m.batch == 1]
    multis = [m for m in methods if m.batch > 1]

    def timed(m: Method, ids, mask, ref, slot: int) -> None:
        t0 = time.perf_counter()
        toks, stats = m.run(ids, mask, 1000 + slot)
        elapsed = time.perf_counter() - t0
        while len(m.times) <= slot:
            m.times.append(0.0)
            m.tokens.append(0)
        m.times[slot] += elapsed
        m.tokens[slot] += sum(len(t) for t in toks)
        if m.mode == "greedy":
            for row, want in zip(toks, ref):
                m.checked += 1
                m.identical += int(row == want)
        if stats is not None:
            add_stats(m, stats)

    # warm-up: every method once (untimed, unrecorded)
    for m in methods:
        if m.batch == 1:
            m.run(prompts[0][None], torch.ones_like(prompts[0])[None], 0)
        else:
            m.run(*batched, 0)
    progress.update(1)
    for r in range(args.repeats):
        for i, p in enumerate(prompts):
            rot = (r * len(prompts) + i) % len(singles)
            order = singles[rot:] + singles[:rot]
            if (r + i) % 2:
                order = order[::-1]
            for m in order:
                timed(m, p[None], torch.ones_like(p)[None], [reference[i]], r * len(prompts) + i)
            on_round()
            progress.update(1)
        for m in (multis if r % 2 == 0 else multis[::-1]):
            timed(m, batched[0], batched[1], reference, r)
        if multis:
            progress.update(1)


def theory(alpha: float, k: int, c: float) -> float:
    gain = (k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return gain / (1 + c * k)


def fmt(x, spec=".2f", dash="–", suffix=""):
    return dash if x is None else format(x, spec) + suffix


def summarize(methods: list[Method], args, fwd: dict) -> tuple[list[str], list[str], list[str]]:
    base = {}  # (mode, batch) -> the HF plain baseline
    for m in methods:
        if m.family == "hf" and m.name.startswith("HF plain"):
            base[(m.mode, m.batch)] = m
    c_fwd = fwd["drafter_1"] / fwd["target_1"]
    main = ["| method | B | tok/s | speedup vs HF plain (same mode, B) | per-round range | τ (mean acc. len) | α | "
            "c | theory (i.i.d. α) | % of it | theory (τ) | % of it | identical |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    split = ["| mmspec method | steps/call | target ms/step | drafter ms/step | verify ms/step | other ms/step | "
             "prefill ms/call | drafter ms/drafted tok | target ms/verify call |",
             "|---|---|---|---|---|---|---|---|---|"]
    per_pos = []
    for m in methods:
        tps = sum(m.tokens) / sum(m.times)
        b = base.get((m.mode, m.batch))
        speed, spread = None, "–"
        if b is not None:
            speed = tps / (sum(b.tokens) / sum(b.times))
            ratios = [(t / s) / (bt / bs) for t, s, bt, bs in zip(m.tokens, m.times, b.tokens, b.times)]
            spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
        tau = alpha = c = th = frac = th_tau = frac_tau = None
        if m.family == "mmspec" and m.stats["row_steps"]:
            s = m.stats
            tau = (s["accepted_tokens"] + s["row_steps"]) / s["row_steps"]
            alpha = s["accepted_tokens"] / s["drafted_tokens"] if s["drafted_tokens"] else 0.0
            c = c_fwd if m.c is None else m.c
            th = theory(alpha, args.k, c)
            th_tau = tau / (1 + c * args.k)
            frac = speed / th if speed is not None else None
            frac_tau = speed / th_tau if speed is not None else None
            steps = s["steps"]
            drafter = s["drafter_time"] - s["drafter_prefill_time"]  # per-step drafter work only
            other = (s["total_time"] - s["prefill_time"] - s["drafter_prefill_time"] - s["target_time"] - drafter
                     - s["verify_time"])
            split.append(
                f"| {m.name} | {steps / m.calls:.1f} | {1e3 * s['target_time'] / steps:.2f} | "
                f"{1e3 * drafter / steps:.2f} | {1e3 * s['verify_time'] / steps:.2f} | "
                f"{1e3 * other / steps:.2f} | {1e3 * s['prefill_time'] / m.calls:.1f} | "
                f"{1e3 * drafter / max(1, s['drafted_tokens']):.3f} | "
                f"{1e3 * s['target_time'] / max(1, s['target_calls'] - m.calls):.2f} |")
            per_pos.append(f"- {m.name}: " + ", ".join(
                f"{a / d:.2f}" for a, d in zip(m.accepted_at, m.drafted_at) if d))
        c_txt = "–" if c is None else f"{c:.3f} ({m.c_label})"
        if m.mode != "greedy":
            ident = "n/a (sampled)"
        else:
            ident = "yes" if m.identical == m.checked else f"NO ({m.identical}/{m.checked})"
        main.append(f"| {m.name} | {m.batch} | {tps:.1f} | {fmt(speed)}× | {spread} | {fmt(tau)} | "
                    f"{fmt(alpha)} | {c_txt} | {fmt(th, suffix='×')} | {fmt(frac, '.0%')} | "
                    f"{fmt(th_tau, suffix='×')} | {fmt(frac_tau, '.0%')} | {ident} |")
    return main, split, per_pos


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    start = text.find(SECTION_HEADING)
    if start < 0:
        text = (text.rstrip() + "\n\n" if text.strip() else "# mmspec benchmarks\n\n") + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION_HEADING):], flags=re.M)
        end = len(text) if nxt is None else start + len(SECTION_HEADING) + nxt.start()
        old = text[start:end]
        if NOTES_START in old and NOTES_END in old:  # keep hand-written notes
            notes = old[old.index(NOTES_START): old.index(NOTES_END) + len(NOTES_END)]
            section = section.replace(f"{NOTES_START}\n{NOTES_END}", notes)
        text = text[:start] + section + ("\n" if end < len(text) else "") + text[end:]
    path.write_text(text.rstrip() + "\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:  # ``--model smollm2``: the real pretrained model (benchmarks/smollm2.py)
        i = argv.index("--model")
        model = argv[i + 1] if i + 1 < len(argv) else ""
        if model != "smollm2":
            print(f"error: --model must be smollm2 (the toy pair is the default), got {model!r}", file=sys.stderr)
            return 2
        from . import smollm2

        return smollm2.main(argv[:i] + argv[i + 2:])
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    from ._text_models import PAD_ID, load_meta, load_or_train

    t_all = time.perf_counter()
    target, drafter, prompts = load_or_train(args.cache_dir, quick=args.quick)
    meta = load_meta(args.cache_dir, quick=args.quick)
    t_models = time.perf_counter() - t_all
    n = args.max_new_tokens

    # reference: HF plain greedy, batch 1 (untimed)
    reference = []
    for p in prompts:
        out = target.generate(input_ids=p[None], attention_mask=torch.ones_like(p)[None], do_sample=False,
                              max_new_tokens=n, pad_token_id=PAD_ID)
        reference.append(out[0, p.numel():].tolist())
    mean_len = sum(p.numel() for p in prompts) / len(prompts)
    ctx = torch.cat([prompts[1 % len(prompts)], torch.tensor(reference[1 % len(prompts)])])
    ctx = ctx[: int(mean_len + n / 2)]
    bench = ForwardBench(target, drafter, ctx, args.k + 1)
    reps = 5 if args.quick else 15
    bench.sample(reps)  # warm-up of the micro-benchmark
    bench.samples = {key: [] for key in bench.samples}

    methods = build_methods(target, drafter, args, PAD_ID)
    rounds = 1 + args.repeats * (len(prompts) + (0 if args.no_batch else 1))
    load_before = os.getloadavg()[0]
    t_bench = time.perf_counter()
    with tqdm(total=rounds, desc="benchmark (warm-up + interleaved rounds)", unit="round") as progress:
        run_benchmark(methods, prompts, reference, args, PAD_ID, progress, on_round=lambda: bench.sample(reps))
    load_after = os.getloadavg()[0]
    t_bench = time.perf_counter() - t_bench
    fwd = bench.medians()
    main_rows, split_rows, per_pos = summarize(methods, args, fwd)

    cmd = "python -m benchmarks.text " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    v = meta["validation"]
    lines = [
        SECTION_HEADING, "",
        f"- command: `{cmd.strip()}`",
        f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine_line()}; 1-min load average {load_before:.2f} before / {load_after:.2f} after "
        "the timed part (above ~1, other processes were sharing the 2 cores)",
        f"- models (byte-level Llama, trained on this machine on the Python {meta['python']} stdlib sources, "
        f"{meta['steps_done']} steps × {meta['budget']['batch']}×{meta['budget']['seq_len']} bytes in "
        f"{meta['train_seconds']} s, joint distillation): target {meta['target_params'] / 1e6:.2f} M params "
        f"({meta['target_arch']['num_hidden_layers']} layers × {meta['target_arch']['hidden_size']}), drafter "
        f"{meta['drafter_params'] / 1e6:.2f} M ({meta['drafter_arch']['num_hidden_layers']} layer × "
        f"{meta['drafter_arch']['hidden_size']}); held-out bits/byte target {v['target_bits_per_byte']:.2f}, "
        f"drafter {v['drafter_bits_per_byte']:.2f}; drafter top-1 agreement with target "
        f"{v['drafter_top1_agreement_with_target']:.2f}",
        f"- workload: {len(prompts)} held-out prompts ({min(p.numel() for p in prompts)}–"
        f"{max(p.numel() for p in prompts)} bytes), {n} new tokens each (no EOS), greedy, k = {args.k}, "
        f"{args.repeats} repeat(s) after a warm-up, each a round per prompt running all batch-1 methods in "
        f"rotated order{'' if args.no_batch else ' (the B=4 pair once per repeat)'}; "
        f"tok/s = all tokens / all time over the rounds; "
        f"speedup = ratio of that to the HF plain row of the same mode and batch size, and its range over "
        f"single rounds (one prompt each; the prompts differ a lot in acceptance); "
        f"HF assisted uses constant k = {args.k} drafts without confidence early-stop"
        + ("" if args.no_sampled else f"; sampled rows: temperature {args.temperature:g}, no top-k/top-p, "
           "a seed per round"),
        f"- cached forward micro-benchmark (medians, sampled between rounds; context {ctx.numel()}): target 1 token "
        f"{1e3 * fwd['target_1']:.2f} ms, target {args.k + 1} tokens {1e3 * fwd['target_w']:.2f} ms, "
        f"drafter 1 token {1e3 * fwd['drafter_1']:.2f} ms → c = {fwd['drafter_1'] / fwd['target_1']:.3f}",
        "",
        *main_rows,
        "",
        "mmspec time split (from `GenerationStats`, summed over all timed calls, per verification step; "
        "the drafter column is `drafter_time − drafter_prefill_time` (per-step drafter work); prefill ms/call is "
        "the target's prefill; 'other' = total − target prefill − drafter prefill − target − drafter − verify, "
        "i.e. the engine loop's own bookkeeping):",
        "",
        *split_rows,
        "",
        "Acceptance per draft position (mmspec):",
        "",
        *per_pos,
        "",
        NOTES_START,
        NOTES_END,
        "",
    ]
    section = "\n".join(lines)
    print()
    print(section)
    print(f"[bench_text] wall time: models {t_models:.1f}s, benchmark {t_bench:.1f}s, "
          f"total {time.perf_counter() - t_all:.1f}s (+ imports)")
    if args.out is not None:
        write_section(args.out, section)
        print(f"[bench_text] wrote section {SECTION_HEADING!r} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
