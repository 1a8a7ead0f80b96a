"""Text speculative decoding on a real pretrained model: SmolLM2-135M-Instruct, mmspec vs HF.

Run from the repository root (``python -m benchmarks.text --model smollm2`` is the same)::

    python -m benchmarks.smollm2 --out benchmarks/RESULTS.md     # full run (~25 min on 2 cores)
    python -m benchmarks.smollm2 --quick                          # smoke run (2 prompts, 24 tokens)

One interleaved run over held-out chat prompts (written here, never used for training): each round
is one prompt (batch 1) or one group of four prompts (batch 4, left padded), and every method runs on
it in an order rotated from round to round. Methods: HF plain ``generate``; HF assisted generation
with the distilled standalone drafter; HF prompt lookup; mmspec with the standalone drafter (chain),
prompt lookup, the EAGLE-3 head (chain) and the head with a dynamic tree sized by the measured cost
model. Greedy outputs are checked token for token against HF plain greedy of the same batch.

Glossary:
    tok/s      generated tokens (up to and including EOS) / wall time, summed over the rounds
    speedup    tok/s / HF plain tok/s of the same mode and batch size
    tau        tokens emitted per target forward (mmspec rows: its stats; HF rows: counted forwards)
    c          one drafter step / one single-token target forward (micro-benchmark at a 200-token
               context; the head's step is one head forward; prompt lookup: 0)
    ceiling    tau / (1 + c k) for chains (k drafts per step); for trees tau / (relative(N + 1) + c d)
               with the target's measured cost of verifying N + 1 tokens (the tree's N nodes and the
               pending token) and d head levels
    % ceiling  speedup / ceiling
    split      mmspec's time per step: target forward, drafter, verification, the rest (loop Python,
               cache bookkeeping)
"""

from __future__ import annotations

import argparse
import functools
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SECTION_HEADING = "## Text on SmolLM2-135M-Instruct (issue 13)"

PROMPTS = (
    "Explain how photosynthesis works in simple terms.",
    "Write a short story about a robot who learns to paint.",
    "What are the main differences between Python lists and tuples?",
    "Give me three tips for staying focused while studying.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How does a refrigerator keep food cold?",
    "Write a haiku about autumn leaves and explain it.",
    "What should I consider when buying a used car?",
)


@dataclass
class Row:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0
    identical: list[bool] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    target_s: float = 0.0
    drafter_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0
    row_steps: int = 0
    drafts: int = 0
    accepted: int = 0
    na: str = ""


def _count_forwards(model):
    """Wrap ``model.forward`` to count calls (HF rows' tau); returns (counter, restore)."""
    counter = {"n": 0}
    orig = model.forward

    @functools.wraps(orig)  # HF checks generate's kwargs against forward's signature
    def forward(*a, **k):
        counter["n"] += 1
        return orig(*a, **k)

    model.forward = forward
    return counter, lambda: model.__dict__.pop("forward", None)


def _generated(seq: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    rows = []
    for r in seq[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t == eos), len(r))
        rows.append(r[:cut])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.smollm2", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--modes", default="greedy,sample")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--k-head", type=int, default=3)
    ap.add_argument("--k-model", type=int, default=3)
    ap.add_argument("--k-lookup", type=int, default=10)
    ap.add_argument("--tree", default="5,4,24", help="dynamic tree depth,top_k,max nodes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pack", action="store_true",
                    help="pre-pack every linear weight for oneDNN (mmspec.cpu_packing) in the target, the head and "
                         "the 2-layer drafter first; HF and mmspec rows run the same packed models (own section)")
    a = ap.parse_args(argv)
    if a.quick:
        a.max_new_tokens, a.prompts = 24, 2
    torch.set_num_threads(a.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from mmspec import engine
    from mmspec.drafters.cost_model import measure_cost_model
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.drafters.model import ModelDrafter
    from mmspec.drafters.tree import DynamicTree
    from mmspec.pretrained import chat_inputs, load_causal_lm
    from mmspec.zoo.smollm2 import load_smollm2_drafter

    target, tok = load_causal_lm()
    head_drafter = load_smollm2_drafter("head", target)
    head = head_drafter.head
    small = load_smollm2_drafter("model", target)
    if a.pack:
        from mmspec.cpu_packing import pack_linear_weights

        packed = sum(pack_linear_weights(mod) for mod in (target, head, small))
        print(f"packed {packed} linear layers for oneDNN", flush=True)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = list(PROMPTS[: a.prompts])

    # ---- micro-benchmarks: c and the cost model
    from mmspec.cache import CacheSession

    def time_single(model, extra=None, reps=20):
        s = CacheSession(model, 1, torch.device("cpu"))
        ids = torch.randint(0, 1000, (1, 201))
        kw = {} if extra is None else {"features": extra(200)}
        s.extend(ids[:, :200], num_logits=1, **kw)
        kw1 = {} if extra is None else {"features": extra(1)}
        ts = []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            s.extend(ids[:, 200:], num_logits=1, **kw1)
            ts.append(time.perf_counter() - t0)
            s.rollback(torch.ones(1, dtype=torch.long))
        return statistics.median(ts[2:])

    with torch.no_grad():
        t_target = time_single(target)
        t_head = time_single(head, extra=lambda w: torch.randn(1, w, head.config.hidden_size))
        t_small = time_single(small)
    c_head, c_small = t_head / t_target, t_small / t_target
    cost = measure_cost_model(target, widths=(1, 2, 4, 8, 16, 24, 32, 48), context=200, repeats=3,
                              level_seconds=t_head)
    depth, top_k, nodes = (int(x) for x in a.tree.split(","))
    tree = DynamicTree(depth=depth, top_k=top_k, num_nodes=nodes, cost_model=cost)

    modes = [m for m in a.modes.split(",") if m]
    batches = [int(b) for b in a.batches.split(",") if b]
    sampling = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0, top_p=0.9)}
    results: dict[tuple[str, int], dict[str, Row]] = {}
    t_start = time.time()
    for mode in modes:
        for bs in batches:
            groups = [prompts[i:i + bs] for i in range(0, len(prompts), bs)] if bs > 1 else [[p] for p in prompts]
            groups = [g for g in groups if len(g) == bs] or groups[:1]
            rows: dict[str, Row] = {}
            s = sampling[mode]
            hf_kw = dict(do_sample=mode != "greedy", **({"temperature": 1.0, "top_p": 0.9} if mode != "greedy" else {}))

            def hf(enc, **extra):
                return target.generate(**enc, max_new_tokens=a.max_new_tokens, pad_token_id=eos, **hf_kw, **extra)

            def mm(enc, drafter, k, seed):
                return engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=drafter,
                                       num_draft_tokens=k, max_new_tokens=a.max_new_tokens, seed=seed, **s)

            methods = {
                "HF plain": lambda enc, seed: ("hf", hf(enc)),
                "HF assisted (2-layer drafter)": lambda enc, seed: ("hf", hf(enc, assistant_model=small)),
                "HF prompt lookup": lambda enc, seed: ("hf", hf(enc, prompt_lookup_num_tokens=a.k_lookup)),
                "mmspec 2-layer drafter, chain": lambda enc, seed: ("mm", mm(enc, ModelDrafter(small), a.k_model, seed)),
                "mmspec prompt lookup": lambda enc, seed: ("mm", mm(enc, "prompt_lookup", a.k_lookup, seed)),
                "mmspec EAGLE-3 head, chain": lambda enc, seed: ("mm", mm(enc, FeatureDrafter(head), a.k_head, seed)),
                "mmspec EAGLE-3 head, dynamic tree": lambda enc, seed: ("mm", mm(enc, FeatureDrafter(head, tree=tree),
                                                                                 None, seed)),
            }
            names = list(methods)
            for r, group in enumerate(groups):
                enc = chat_inputs(tok, group)
                plen = enc["input_ids"].shape[1]
                order = names[r % len(names):] + names[: r % len(names)]
                if r % 2:
                    order = order[::-1]
                ref_tokens, times = None, {}
                outs = {}
                for name in order:
                    row = rows.setdefault(name, Row(name))
                    if row.na:
                        continue
                    torch.manual_seed(1000 + r)
                    counter, restore = _count_forwards(target)
                    t0 = time.perf_counter()
                    try:
                        kind, out = methods[name](enc, 1000 + r)
                    except Exception as exc:  # noqa: BLE001 - HF features that do not support a batch
                        restore()
                        row.na = type(exc).__name__ + ": " + " ".join(str(exc).split())[:80]
                        continue
                    dt = time.perf_counter() - t0
                    restore()
                    seq = out if kind == "hf" else out.sequences
                    gen = _generated(seq, plen, eos)
                    row.tokens += sum(len(g) for g in gen)
                    row.seconds += dt
                    row.forwards += counter["n"]
                    times[name] = (sum(len(g) for g in gen), dt)
                    outs[name] = gen
                    if kind == "mm":
                        st = out.stats
                        row.target_s += st.target_time
                        row.drafter_s += st.drafter_time
                        row.verify_s += st.verify_time
                        row.steps += st.steps
                        row.row_steps += st.row_steps
                        row.drafts += st.drafted_tokens
                        row.accepted += st.accepted_tokens
                if mode == "greedy" and "HF plain" in outs:
                    ref_tokens = outs["HF plain"]
                    for name, gen in outs.items():
                        rows[name].identical.append(gen == ref_tokens)
                if "HF plain" in times:
                    n0, t0_ = times["HF plain"]
                    for name, (n, dt) in times.items():
                        rows[name].ratios.append((n / dt) / (n0 / t0_))
                print(f"[{mode} b{bs}] round {r + 1}/{len(groups)} done ({time.time() - t_start:.0f}s)", flush=True)
            results[(mode, bs)] = rows

    def ceiling(name: str, tau: float) -> float | None:
        if "tree" in name:
            return tau / (cost.relative(nodes + 1) + c_head * depth)
        if "head" in name:
            return tau / (1 + c_head * a.k_head)
        if "2-layer" in name:
            return tau / (1 + c_small * a.k_model)
        if "prompt lookup" in name:
            return tau
        return None

    load = os.getloadavg()
    heading = SECTION_HEADING + (", pre-packed linear weights" if a.pack else "")
    lines = [heading, "",
             f"Recorded {_dt.date.today()} by `python -m benchmarks.smollm2 {' '.join(argv or sys.argv[1:])}` on "
             f"{platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}; "
             f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. {len(prompts)} held-out chat prompts, "
             f"{a.max_new_tokens} new tokens (EOS ends a row), float32.", "",
             f"Micro-benchmarks at a 200-token context: target 1-token forward {t_target * 1e3:.1f} ms; EAGLE-3 head "
             f"step {t_head * 1e3:.1f} ms (c = {c_head:.3f}); 2-layer drafter step {t_small * 1e3:.1f} ms "
             f"(c = {c_small:.3f}). Target cost of verifying w tokens, in 1-token forwards: "
             + ", ".join(f"w={w}: {cost.relative(w):.2f}" for w in cost.widths) + ".", "",
             f"Draft settings: head chain k={a.k_head}; head dynamic tree depth {depth}, top-k {top_k}, at most "
             f"{nodes} nodes, sized per step by the cost model; 2-layer drafter k={a.k_model} (HF assisted: its own "
             f"defaults); prompt lookup {a.k_lookup} tokens (HF and mmspec).", ""]
    for (mode, bs), rows in results.items():
        label = "greedy" if mode == "greedy" else "T = 1, top-p 0.9"
        lines += [f"### {label}, batch {bs}", "",
                  "| method | tok/s | speedup (range) | tau | alpha | ceiling | % ceiling | split target / drafter / verify / rest (ms per step) | identical |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = rows.get("HF plain")
        base_tps = base.tokens / base.seconds if base and base.seconds else None
        for name, row in rows.items():
            if row.na or not row.seconds:
                lines.append(f"| {name} | n/a ({row.na}) | | | | | | | |")
                continue
            tps = row.tokens / row.seconds
            sp = tps / base_tps if base_tps else float("nan")
            rng = f"{min(row.ratios):.2f}–{max(row.ratios):.2f}" if row.ratios else ""
            if name.startswith("mmspec"):
                tau = (row.accepted + row.row_steps) / max(row.row_steps, 1)
            else:  # HF: generated tokens per decoding forward and row (the prefill forward is not counted)
                tau = row.tokens / max((row.forwards - len(row.ratios)) * bs, 1)
            alpha = f"{row.accepted / row.drafts:.2f}" if row.drafts else ""
            ceil = ceiling(name, tau)
            ceil_s = f"{ceil:.2f}" if ceil else ""
            pct = f"{100 * sp / ceil:.0f} %" if ceil else ""
            if name.startswith("mmspec") and row.steps:
                per = 1e3 / row.steps
                rest = row.seconds - row.target_s - row.drafter_s - row.verify_s
                split = f"{row.target_s * per:.1f} / {row.drafter_s * per:.1f} / {row.verify_s * per:.1f} / {rest * per:.1f}"
            else:
                split = ""
            ident = "" if not row.identical else ("yes" if all(row.identical) else f"NO ({sum(row.identical)}/{len(row.identical)})")
            lines.append(f"| {name} | {tps:.1f} | {sp:.2f}× ({rng}) | {tau:.2f} | {alpha} | {ceil_s} | {pct} | {split} | {ident} |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if a.out is not None and not a.quick:
        from ._report import write_section

        write_section(a.out, heading, table)
    bad = any(r.identical and not all(r.identical) for rows in results.values() for r in rows.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
