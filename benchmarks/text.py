"""Text speculative-decoding benchmark: mmspec vs HF plain / assisted / prompt-lookup generation.

Run from the repository root::

    python -m benchmarks.text                      # full run (trains the models once, ~4 min)
    python -m benchmarks.text --quick              # smoke run (< 1 min)
    python -m benchmarks.text --out benchmarks/RESULTS.md
    python -m benchmarks.text --model smollm2      # the real SmolLM2-135M-Instruct (benchmarks/smollm2.py)

One interleaved run on the same trained byte-level target/drafter pair (see
``benchmarks/_text_models.py``): each repeat is one round per prompt, and each round runs every
batch-1 method on that prompt, the order rotated (``benchmarks._harness.interleave``) so drifts of
a shared machine hit all methods alike; the batch-4 pair has its own interleaved run, a round per
repeat. Speedups are
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

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._harness import (CachedForward, arg_parser, begin, interleave, load_average, md_table, pool_stats, provenance,
                       report)

SECTION_HEADING = "## Text (issue: foundation)"


@dataclass
class Method:
    name: str
    batch: int  # 1: one call per prompt; >1: all prompts in one left-padded call
    run: Callable[[torch.Tensor, torch.Tensor, int], tuple[list[list[int]], object | None]]  # (ids, mask, seed)
    family: str  # "hf", "mmspec", "ref"
    mode: str = "greedy"  # "greedy" or "sampled"
    c: float | None = None  # drafter cost ratio for the theory column (mmspec rows)
    c_label: str = ""


def parse_args(argv=None):
    p = arg_parser("text", __doc__, quick={"max_new_tokens": 24, "repeats": 1},
                   quick_also="tiny training budget")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per prompt")
    p.add_argument("--k", type=int, default=5, help="draft length for every speculative method (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (default ~/.cache/mmspec/bench_text)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads while timing (default 1; training picks its own)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled rows (default 1)")
    p.add_argument("--no-batch", action="store_true", help="skip the batch-4 rows")
    p.add_argument("--no-sampled", action="store_true", help="skip the sampled rows")
    args = p.parse_args(argv)
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
        prefix, step = {"input_ids": context[None]}, context[None, -width:]
        self.jobs = {"target_1": CachedForward(target, prefix, {"input_ids": step[:, -1:]}),
                     "target_w": CachedForward(target, prefix, {"input_ids": step}),
                     "drafter_1": CachedForward(drafter, prefix, {"input_ids": step[:, -1:]})}
        self.samples: dict[str, list[float]] = {key: [] for key in self.jobs}

    def sample(self, reps: int) -> None:
        for key, job in self.jobs.items():
            self.samples[key] += job.samples(reps)

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


def run_benchmark(methods: list[Method], prompts, args, pad_id: int, on_round: Callable[[], None]) -> list:
    """Two interleaved runs (``benchmarks._harness.interleave``): the batch-1 methods, a round per prompt and
    ``on_round`` after each; then the batch-4 methods, a round per repeat on all prompts left-padded.
    Returns the non-empty ones as (Runs, methods, reference rows of a call)."""
    singles = [m for m in methods if m.batch == 1]
    multis = [m for m in methods if m.batch > 1]

    def call(m: Method):
        return lambda p, seed: m.run(p[0], p[1], seed)

    out = []
    if singles:
        items = [(p[None], torch.ones_like(p)[None]) for p in prompts]
        runs = interleave({m.name: call(m) for m in singles}, items, repeats=args.repeats, on_round=on_round,
                          label="text, batch 1")
        out.append((runs, singles))
    if multis:
        runs = interleave({m.name: call(m) for m in multis}, [left_pad(prompts, pad_id)], repeats=args.repeats,
                          label="text, batch 4")
        out.append((runs, multis))
    return out


def theory(alpha: float, k: int, c: float) -> float:
    gain = (k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return gain / (1 + c * k)


def fmt(x, spec=".2f", dash="–", suffix=""):
    return dash if x is None else format(x, spec) + suffix


def summarize(run_list: list, reference: list, args, fwd: dict) -> tuple[list[str], list[str], list[str]]:
    c_fwd = fwd["drafter_1"] / fwd["target_1"]
    main, split, per_pos = [], [], []

    def tokens(call) -> int:
        return sum(len(t) for t in call.result[0])

    for runs, methods in run_list:
        base = {m.mode: m.name for m in methods if m.family == "hf" and m.name.startswith("HF plain")}
        for m in methods:
            calls = runs.of(m.name)
            tps = sum(tokens(c) for c in calls) / runs.total(m.name)
            b = base.get(m.mode)
            speed, spread = None, "–"
            if b is not None:
                speed = runs.speedup(m.name, b, tokens)
                ratios = runs.ratios(m.name, b, tokens)
                spread = f"{min(ratios):.2f}–{max(ratios):.2f}"
            tau = alpha = c = th = frac = th_tau = frac_tau = None
            s = pool_stats(c.result[1] for c in calls if c.result[1] is not None)
            if m.family == "mmspec" and s.row_steps:
                tau, alpha = s.mean_accepted_length, s.acceptance_rate
                c = c_fwd if m.c is None else m.c
                th = theory(alpha, args.k, c)
                th_tau = tau / (1 + c * args.k)
                frac = speed / th if speed is not None else None
                frac_tau = speed / th_tau if speed is not None else None
                steps = s.steps
                drafter = s.drafter_time - s.drafter_prefill_time  # per-step drafter work only
                other = s.total_time - s.prefill_time - s.drafter_prefill_time - s.target_time - drafter - s.verify_time
                split.append([m.name, f"{steps / len(calls):.1f}", f"{1e3 * s.target_time / steps:.2f}",
                              f"{1e3 * drafter / steps:.2f}", f"{1e3 * s.verify_time / steps:.2f}",
                              f"{1e3 * other / steps:.2f}", f"{1e3 * s.prefill_time / len(calls):.1f}",
                              f"{1e3 * drafter / max(1, s.drafted_tokens):.3f}",
                              f"{1e3 * s.target_time / max(1, s.target_calls - len(calls)):.2f}"])
                per_pos.append(f"- {m.name}: " + ", ".join(
                    f"{a / d:.2f}" for a, d in zip(s.accepted_at_position, s.drafted_at_position) if d))
            c_txt = "–" if c is None else f"{c:.3f} ({m.c_label})"
            if m.mode != "greedy":
                ident = "n/a (sampled)"
            else:  # batch 1: the call's prompt's reference row; batch 4: every prompt's
                pairs = [(row, want) for call in calls
                         for row, want in zip(call.result[0], reference if m.batch > 1 else [reference[call.index]])]
                same = sum(row == want for row, want in pairs)
                ident = "yes" if same == len(pairs) else f"NO ({same}/{len(pairs)})"
            main.append([m.name, m.batch, f"{tps:.1f}", f"{fmt(speed)}×", spread, fmt(tau), fmt(alpha), c_txt,
                         fmt(th, suffix="×"), fmt(frac, ".0%"), fmt(th_tau, suffix="×"), fmt(frac_tau, ".0%"), ident])
    main = md_table(["method", "B", "tok/s", "speedup vs HF plain (same mode, B)", "per-round range",
                     "τ (mean acc. len)", "α", "c", "theory (i.i.d. α)", "% of it", "theory (τ)", "% of it",
                     "identical"], main)
    split = md_table(["mmspec method", "steps/call", "target ms/step", "drafter ms/step", "verify ms/step",
                      "other ms/step", "prefill ms/call", "drafter ms/drafted tok", "target ms/verify call"], split)
    return main, split, per_pos


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
    begin(args.threads)
    import transformers

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
    load_before = load_average()
    t_bench = time.perf_counter()
    run_list = run_benchmark(methods, prompts, args, PAD_ID, on_round=lambda: bench.sample(reps))
    t_bench = time.perf_counter() - t_bench
    fwd = bench.medians()
    main_rows, split_rows, per_pos = summarize(run_list, reference, args, fwd)

    v = meta["validation"]
    lines = [
        SECTION_HEADING, "",
        f"- {provenance('text', argv, load_before)}",
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
        f"rotated order{'' if args.no_batch else ' (the B=4 pair in its own interleaved run, a round per repeat)'}; "
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
    ]
    section = "\n".join(lines)
    print()
    report(section, args.out, SECTION_HEADING)
    print(f"[bench_text] wall time: models {t_models:.1f}s, benchmark {t_bench:.1f}s, "
          f"total {time.perf_counter() - t_all:.1f}s (+ imports)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
