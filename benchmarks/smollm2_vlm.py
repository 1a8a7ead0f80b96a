"""VLM benchmark on the scene VLM built on SmolLM2-135M-Instruct: plain AR, HF assisted generation (small VLM
drafter, full tokens) and mmspec with both drafter kinds, full and pruned, at a short and a long visual context.

Run from the repository root::

    python -m benchmarks.vlm --model smollm2                       # full run (~30 min here)
    python -m benchmarks.vlm --model smollm2 --quick               # smoke run
    python -m benchmarks.vlm --model smollm2 --out benchmarks/RESULTS.md

One interleaved run (method order rotated per prompt, reversed every other prompt), greedy, batch 1 (HF
assisted generation serves batch 1 only), "Describe the image in detail." about held-out scenes.

Glossary:
    short / long   one 64 px image (64 visual tokens) / LLaVA-NeXT-style tiles: the base image + 4 x 4 crops
                   of the scene at 256 px (1088 visual tokens)
    head           the EAGLE-3 head over the target's features (:class:`mmspec.vision.PrunedFeatureDrafter`)
    small VLM      the 2-layer LLaVA distilled from the target (:class:`mmspec.vision.VLMDrafter`)
    tau            tokens emitted per verification step (mmspec rows); HF rows: generated tokens per target
                   forward (HF's first forward, prompt included, already emits)
    c              one drafter step / one target decoding forward, both at this context with every visual
                   token (micro-benchmark; a pruned drafter's step is cheaper)
    ceiling        tau / (1 + c k): the speedup if forwards at 1-token cost were the only cost
    prefill_d      the drafter's own prefill (ms, mean per request): the small VLM's vision tower + its
                   pruned decoder prefill; the head's pruned pair prefill
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .smollm2 import _count_forwards
from .vlm import decode_forward_ms

SECTION = "## VLM on SmolLM2-135M-Instruct (issue 14)"
STRATEGIES = ("verifier", "cls", "diversity", "uniform")
RATIOS = (0.1, 0.25, 0.5)
QUESTION = "Describe the image in detail."


@dataclass
class Row:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    runs: int = 0
    steps: int = 0
    row_steps: int = 0
    accepted: int = 0
    drafter_prefill: float = 0.0
    kept: list = field(default_factory=list)
    identical: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    na: str = ""


def _step_ms(model, inputs: dict, reps: int = 8, head=None) -> float:
    """Median ms of one cached 1-token step after prefilling ``inputs`` (the head: with random features)."""
    from mmspec.cache import CacheSession

    if head is None:
        return decode_forward_ms(model, inputs, steps=reps)
    with torch.no_grad():
        n = inputs["input_ids"].shape[1]
        s = CacheSession(head, 1, torch.device("cpu"))
        d = head.config.hidden_size
        s.extend(inputs["input_ids"][:, :n - 1], features=torch.randn(1, n - 1, d), num_logits=1)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            s.extend(inputs["input_ids"][:, -1:], features=torch.randn(1, 1, d), num_logits=1)
            ts.append(time.perf_counter() - t0)
            s.rollback(torch.ones(1, dtype=torch.long))
        return 1e3 * statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vlm --model smollm2", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--contexts", default="short,long")
    ap.add_argument("--k-head", type=int, default=4)
    ap.add_argument("--k-small", type=int, default=4)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder", default=None, help="a training output folder instead of the shipped weights")
    ap.add_argument("--pack", action="store_true", help="pre-pack every linear weight for oneDNN (mmspec.cpu_packing) "
                                                        "in the target and both drafters; every row runs them")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.max_new_tokens, a.strategies, a.ratios = 1, 12, "verifier", "0.1"
    torch.set_num_threads(a.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import mmspec.vision as mv
    from mmspec.zoo.scenes import render
    from mmspec.zoo.data import heldout_scenes
    from mmspec.zoo.smollm2_llava import TILE, load_smollm2_vlm, vlm_inputs

    vlm = load_smollm2_vlm(folder=a.folder)
    target, head, small, processor = vlm.target, vlm.head, vlm.drafter, vlm.processor
    if a.pack:
        from mmspec.cpu_packing import pack_linear_weights

        print(f"packed {sum(pack_linear_weights(m) for m in (target, head, small))} linear layers", flush=True)
    eos = target.generation_config.eos_token_id
    strategies = [s for s in a.strategies.split(",") if s]
    ratios = [float(r) for r in a.ratios.split(",") if r]
    grids = {"short": 1, "long": 4}
    contexts = [c for c in a.contexts.split(",") if c]
    scenes = heldout_scenes()[: a.prompts]

    def generated(seq, plen):
        row = seq[0, plen:].tolist()
        return row[: row.index(eos) + 1] if eos in row else row

    results, micro = {}, {}
    t_start = time.time()
    for ctx in contexts:
        grid = grids[ctx]
        prompts = [vlm_inputs(processor, [render(s, TILE * grid)], QUESTION, grid=grid) for s in scenes]
        n_visual = int((prompts[0]["input_ids"] == target.config.image_token_id).sum())
        t_t = _step_ms(target, prompts[0])
        micro[ctx] = dict(visual=n_visual, target=t_t, head=_step_ms(None, prompts[0], head=head) / t_t,
                          small=_step_ms(small, prompts[0]) / t_t, target_ms=t_t, length=prompts[0]["input_ids"].shape[1])

        def hf(inp, **extra):
            return target.generate(**inp, do_sample=False, max_new_tokens=a.max_new_tokens, **extra)

        methods = {"plain AR (HF generate)": lambda inp: ("hf", hf(inp)),
                   "HF assisted (small VLM, full tokens, HF's draft-length heuristic)": lambda inp: ("hf", hf(inp, assistant_model=small))}

        def mm(drafter, strategy, ratio, k):
            return lambda inp: ("mm", mv.generate(target, drafter, inp, pruning=strategy, keep_ratio=ratio,
                                                  max_new_tokens=a.max_new_tokens, num_draft_tokens=k))

        for kind, drafter, k in (("head", head, a.k_head), ("small VLM", small, a.k_small)):
            methods[f"mmspec {kind}, full tokens"] = mm(drafter, "none", 1.0, k)
            for strategy in strategies:
                for ratio in ratios:
                    methods[f"mmspec {kind}, {strategy} keep {ratio}"] = mm(drafter, strategy, ratio, k)
        names = list(methods)
        rows = {n: Row(n) for n in names}
        with torch.no_grad():
            for n in names:  # warm-up outside the timed runs
                try:
                    methods[n](prompts[0])
                except Exception as exc:  # noqa: BLE001 - an HF feature that refuses this pair
                    rows[n].na = type(exc).__name__ + ": " + " ".join(str(exc).split())[:80]
            for r, inp in enumerate(prompts):
                plen = inp["input_ids"].shape[1]
                order = names[r % len(names):] + names[: r % len(names)]
                if r % 2:
                    order.reverse()
                outs, times = {}, {}
                for n in order:
                    row = rows[n]
                    if row.na:
                        continue
                    counter, restore = _count_forwards(target)
                    t0 = time.perf_counter()
                    kind, out = methods[n](inp)
                    dt = time.perf_counter() - t0
                    restore()
                    gen = generated(out if kind == "hf" else out.sequences, plen)
                    outs[n], times[n] = gen, dt
                    row.tokens += len(gen)
                    row.seconds += dt
                    row.forwards += counter["n"]
                    row.runs += 1
                    if kind == "mm":
                        st = out.stats
                        row.steps += st.steps
                        row.row_steps += st.row_steps
                        row.accepted += st.accepted_tokens
                        row.drafter_prefill += st.drafter_prefill_time
                        row.kept.append(st.extra.get("drafter_visual_tokens", ["–"])[0])
                base = names[0]
                for n, gen in outs.items():
                    rows[n].identical.append(gen == outs[base])
                    rows[n].ratios.append((len(gen) / times[n]) / (len(outs[base]) / times[base]))
                print(f"[{ctx}] prompt {r + 1}/{len(prompts)} done ({time.time() - t_start:.0f} s)", flush=True)
        results[ctx] = rows

    load = os.getloadavg()
    lines = [SECTION + (", pre-packed weights" if a.pack else ""), "",
             f"Recorded {_dt.date.today()} by `python -m benchmarks.vlm {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"on {platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}; load "
             f"average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. Target: the scene VLM on SmolLM2 "
             f"(`mmspec.zoo.smollm2_llava.load_smollm2_vlm`), float32, SDPA"
             f"{', linear weights pre-packed for oneDNN (every row)' if a.pack else ''}. {len(scenes)} held-out scenes, "
             f"\"{QUESTION}\", greedy, batch 1, at most {a.max_new_tokens} new tokens (EOS ends); chains: head "
             f"k = {a.k_head}, small VLM k = {a.k_small}. Speedup = tokens/s over plain AR's, pooled over the prompts "
             f"(range: per prompt).", ""]
    for ctx, rows in results.items():
        m = micro[ctx]
        lines += [f"### {ctx} visual context: {m['visual']} visual tokens, {m['length']}-token prompt", "",
                  f"One target decoding forward at this context: {m['target_ms']:.1f} ms; c (full context): head "
                  f"{m['head']:.3f}, small VLM {m['small']:.3f}.", "",
                  "| method | tok/s | speedup (range) | tau | ceiling | % ceiling | drafter visual tokens | "
                  "drafter prefill ms | identical to AR |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = rows["plain AR (HF generate)"]
        base_tps = base.tokens / base.seconds
        for n, row in rows.items():
            if row.na or not row.seconds:
                lines.append(f"| {n} | n/a ({row.na}) | | | | | | | |")
                continue
            tps = row.tokens / row.seconds
            sp = tps / base_tps
            rng = f"{min(row.ratios):.2f}–{max(row.ratios):.2f}"
            if n.startswith("mmspec"):
                tau = (row.accepted + row.row_steps) / max(row.row_steps, 1)
                c, k = (m["head"], a.k_head) if "head" in n else (m["small"], a.k_small)
                ceil = tau / (1 + c * k)
                ceil_s, pct = f"{ceil:.2f}", f"{100 * sp / ceil:.0f} %"
                kept = str(row.kept[0])
                pre = f"{1e3 * row.drafter_prefill / row.runs:.0f}"
            else:
                tau = row.tokens / max(row.forwards, 1)  # HF: every target forward emits (its prefill too)
                ceil_s = pct = pre = ""
                kept = str(m["visual"]) if "assisted" in n else ""
            ident = "yes" if all(row.identical) else f"NO ({sum(row.identical)}/{len(row.identical)})"
            lines.append(f"| {n} | {tps:.1f} | {sp:.2f}× ({rng}) | {tau:.2f} | {ceil_s} | {pct} | {kept} | {pre} | {ident} |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if a.out is not None and not a.quick:
        from ._report import write_section

        write_section(a.out, SECTION + (", pre-packed weights" if a.pack else ""), table)
    return 0 if all(all(r.identical) for rows in results.values() for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
