"""Spec-Bench-style benchmark on a real chat model: SmolLM2-135M-Instruct, by category of request, mmspec against
HF plain, HF assisted generation and HF prompt lookup on the same weights.

Run from the repository root::

    python -m benchmarks.specbench --out benchmarks/RESULTS.md            # 5 categories x 8 prompts, b1 + b4
    python -m benchmarks.specbench --pack --out benchmarks/RESULTS.md     # packed weights + an as-loaded row
    python -m benchmarks.specbench --quick                                 # smoke run (1 prompt a category)

Prompts: :mod:`benchmarks._specbench` (chat and multi-turn from ShareGPT's dev split, code, rag, rewrite), never
trained on. One interleaved run per (mode, batch): each round is one prompt (batch 1) or four prompts of one
category (batch 4, left padded), every method runs on it in an order rotated from round to round. Without
``--pack`` the target is used as loaded (float32, nothing packed or cast), so "HF plain" is also HF plain on the
model as the user loaded it; with ``--pack`` (the user's choice: oneDNN's packed kernels round differently) every
method runs the packed weights and one more row, "HF plain, as loaded (unpacked)", runs an unpacked copy. Greedy
outputs are checked token for token against HF plain greedy of the same weights and batch.

Methods: HF plain ``generate``; HF assisted generation with the distilled 2-layer drafter; HF prompt lookup (10
tokens); mmspec prompt lookup (10 tokens); mmspec with the EAGLE-3 head in the shape the calibration chose
(:mod:`mmspec.calibration`, on two dev-split chat prompts that are not benchmark prompts); mmspec hybrid drafts
(the head's best calibrated tree plus prompt lookup's chain in one tree, :mod:`mmspec.drafters.hybrid`); prompt
lookup (at most 10) and the head's chain (at most 6) with k chosen each step by
:class:`~mmspec.drafters.adaptive.CostAwareDraftLength` from the calibration's verification costs and the running
acceptance per draft depth ("cost-aware k": k = 0, no drafts, is a choice, as ``mmspec text`` / ``chat`` / ``run``
run it where the head does not pay; "k >= 1": it always drafts; "(one rate)": one geometric rate for every
depth); ``--drafter DIR``: one more HF assisted row with another 2-layer drafter. ``--methods``
picks rows by parts of their names (HF plain always runs).

Glossary:
    tok/s      generated tokens (up to and including EOS) / wall time, summed over the rounds
    speedup    tok/s / HF plain tok/s of the same rounds; per category: over that category's rounds
    tau        tokens emitted per target forward (mmspec rows: its stats; HF rows: counted forwards)
    ceiling    the speedup tau allows with the measured costs and no loop overhead:
               tau / (verify(1 + d) + L c), d the mean drafts per row step, verify(w) the target's measured cost
               of w tokens in 1-token forwards, L the drafter forwards per step (chain: d, tree: its depth,
               lookup: 0) and c one drafter forward in 1-token target forwards (the calibration's)
    split      mmspec's time per step: target forward, drafter, verification, the rest (loop, cache bookkeeping);
               the prefill is left out
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from ._harness import ForwardMeter, arg_parser, begin, interleave, md_table, pool_stats, provenance, report
from ._specbench import CATEGORIES, category_prompts, chat_prompts
from .smollm2 import _generated

SECTION_HEADING = "## Spec-Bench-style categories on SmolLM2-135M-Instruct (issue 32)"
K_LOOKUP = 10


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("specbench", __doc__, max_new_tokens=64, section=SECTION_HEADING,
                    quick={"max_new_tokens": 16, "per_category": 1})
    ap.add_argument("--per-category", type=int, default=8, help="prompts per category (default: %(default)s)")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--modes", default="greedy,sample", help="greedy and/or sample (T = 1)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--methods", default="",
                    help="comma-separated parts of method names to run, -part to leave out (HF plain always runs; default: "
                         "every method)")
    ap.add_argument("--head", default=None, help="a trained head folder (default: the shipped SmolLM2 head)")
    ap.add_argument("--drafter", type=Path, default=None,
                    help="another distilled drafter LM folder: one more HF assisted row beside the shipped drafter's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pack", action="store_true",
                    help="pack the linear weights of the target, the head and the 2-layer drafter for oneDNN (every "
                         "method but 'HF plain, as loaded' runs the packed weights; float rounding changes)")
    a = ap.parse_args(argv)
    load_before = begin(a.threads)
    from mmspec import engine
    from mmspec.calibration import DraftShape, calibrate, head_drafters
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.drafters.hybrid import HybridDrafter
    from mmspec.drafters.model import ModelDrafter
    from mmspec.drafters.adaptive import CostAwareDraftLength
    from mmspec.drafters.prompt_lookup import PromptLookupDrafter
    from mmspec.drafters.tree import DynamicTree
    from mmspec.pretrained import chat_inputs, load_causal_lm
    from mmspec.zoo.smollm2 import load_drafter, load_smollm2_drafter

    target, tok = load_causal_lm()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    head = (load_drafter(a.head, target) if a.head else load_smollm2_drafter("head", target)).head
    small = load_smollm2_drafter("model", target)
    other = load_drafter(a.drafter, target) if a.drafter else None
    as_loaded = None
    if a.pack:  # the user's choice: packing changes float rounding, so it is a flag, and one row keeps the original
        import copy

        from mmspec.cpu_packing import pack_linear_weights

        as_loaded = copy.deepcopy(target)
        packed = sum(pack_linear_weights(m) for m in (target, head, small, other) if m is not None)
        print(f"packed {packed} linear layers for oneDNN", file=sys.stderr, flush=True)
    categories = [c for c in a.categories.split(",") if c]
    prompts = category_prompts(a.per_category, seed=0, categories=categories)
    bench_texts = {m["content"] for ps in prompts.values() for p in ps for m in p}
    calib = [p for p in chat_prompts(40, seed=7) if p[0]["content"] not in bench_texts][:2]

    drafter_for = head_drafters(head)

    cal = calibrate(target, drafter_for, [chat_inputs(tok, [p])["input_ids"] for p in calib], k_max=6,
                    drafter_module=head, eos_token_id=eos, key="benchmarks.specbench", progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(cal.summary(), file=sys.stderr, flush=True)
    trees = {lbl: r for lbl, r in cal.runs.items() if lbl.startswith("tree")}
    best_tree = max(trees, key=lambda lbl: cal.expected_tokens_per_s[lbl])
    tree_shape = tuple(int(v) for v in best_tree.split()[1].split("/"))
    c_head = cal.level_cost

    modes = [m for m in a.modes.split(",") if m]
    batches = [int(b) for b in a.batches.split(",") if b]
    results = {}
    for mode in modes:
        for bs in batches:
            groups, cats = [], []
            for c in categories:
                ps = prompts[c]
                gs = [ps[i:i + bs] for i in range(0, len(ps), bs)]
                gs = [g for g in gs if len(g) == bs] or gs[:1]
                groups += gs
                cats += [c] * len(gs)
            greedy = mode == "greedy"
            hf_kw = dict(do_sample=not greedy, **({} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}))
            mm_kw = dict(temperature=0.0 if greedy else 1.0)

            def hf(enc, **extra):
                return target.generate(**enc, max_new_tokens=a.max_new_tokens, pad_token_id=eos, eos_token_id=eos,
                                       **hf_kw, **extra)

            def mm(enc, drafter, k, seed):
                return engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=drafter,
                                       num_draft_tokens=k, max_new_tokens=a.max_new_tokens, seed=seed,
                                       eos_token_id=eos, **mm_kw)

            d_, k_, n_ = tree_shape
            head_cost = dataclasses.replace(cal.cost, level_cost=c_head)  # cal.cost has level_cost 0: prompt lookup's
            methods = {
                "HF plain": lambda enc, seed: hf(enc),
                **({"HF plain, as loaded (unpacked)": lambda enc, seed: as_loaded.generate(
                    **enc, max_new_tokens=a.max_new_tokens, pad_token_id=eos, eos_token_id=eos, **hf_kw)}
                   if as_loaded is not None else {}),
                "HF assisted (2-layer drafter)": lambda enc, seed: hf(enc, assistant_model=small),
                **({f"HF assisted (2-layer drafter {a.drafter.name})": lambda enc, seed: hf(enc, assistant_model=other)}
                   if other is not None else {}),
                "HF prompt lookup": lambda enc, seed: hf(enc, prompt_lookup_num_tokens=K_LOOKUP),
                "mmspec prompt lookup": lambda enc, seed: mm(enc, "prompt_lookup", K_LOOKUP, seed),
                "mmspec prompt lookup, cost-aware k": lambda enc, seed: mm(
                    enc, PromptLookupDrafter(), CostAwareDraftLength(cal.cost, max_k=K_LOOKUP, min_k=0), seed),
                "mmspec prompt lookup, cost-aware k >= 1": lambda enc, seed: mm(
                    enc, PromptLookupDrafter(), CostAwareDraftLength(cal.cost, max_k=K_LOOKUP), seed),
                "mmspec prompt lookup, cost-aware k >= 1 (one rate)": lambda enc, seed: mm(
                    enc, PromptLookupDrafter(), CostAwareDraftLength(cal.cost, max_k=K_LOOKUP, profile=False), seed),
                f"mmspec EAGLE-3 head, calibrated ({cal.best.label})":
                    lambda enc, seed: mm(enc, drafter_for(cal.best, cal.cost), cal.best.k or None, seed),
                "mmspec EAGLE-3 head, cost-aware k": lambda enc, seed: mm(
                    enc, drafter_for(DraftShape(k=1), cal.cost), CostAwareDraftLength(head_cost, max_k=6), seed),
                f"mmspec hybrid (head {best_tree} + lookup)":
                    lambda enc, seed: mm(enc, HybridDrafter(FeatureDrafter(head, tree=DynamicTree(
                        depth=d_, top_k=k_, num_nodes=n_, cost_model=cal.cost))), None, seed),
            }
            parts = [w.strip() for w in a.methods.split(",") if w.strip()]
            wanted, unwanted = [w for w in parts if not w.startswith("-")], [w[1:] for w in parts if w.startswith("-")]
            methods = {n: f for n, f in methods.items() if n == "HF plain" or (
                (not wanted or any(w in n for w in wanted)) and not any(w in n for w in unwanted))}
            encs = [chat_inputs(tok, g) for g in groups]
            runs = interleave(methods, encs, meter=ForwardMeter(target), catch=True, label=f"{mode} b{bs}")
            if as_loaded is not None:  # its forwards were not metered (another module): tau from the packed twin
                for c in runs.of("HF plain, as loaded (unpacked)"):
                    c.meter = next(x.meter for x in runs.of("HF plain") if x.index == c.index)
            results[(mode, bs)] = (runs, [e["input_ids"].shape[1] for e in encs], cats)

    lines = [a.section, "",
             f"{provenance('specbench', argv, load_before)} {a.per_category} prompts a category "
             f"({', '.join(categories)}), {a.max_new_tokens} new tokens (EOS ends a row), float32, "
             + ("linear weights packed for oneDNN (target, head, 2-layer drafter); 'HF plain, as loaded' runs an "
                "unpacked copy" if a.pack else "the target as loaded") + ".", "",
             f"Calibration ({cal.seconds:.0f} s, cached per model, drafter and machine; on 2 dev-split chat prompts "
             f"that are not benchmark prompts): {cal.summary()}. Target cost of verifying w tokens in 1-token "
             f"forwards: " + ", ".join(f"w={w}: {cal.cost.relative(w):.2f}" for w in cal.cost.widths)
             + f"; 1-token forward {cal.cost.seconds[0] * 1e3:.1f} ms; head forward {cal.level_seconds * 1e3:.1f} ms "
             f"(c = {c_head:.3f}); chain acceptance P(A >= i): "
             + ", ".join(f"{x:.2f}" for x in cal.accept_at_least)
             + (f"; drafter packing: {', '.join(f'{k} {v * 1e3:.2f} ms' for k, v in cal.packing.items())}"
                if cal.packing else "") + ".", ""]
    bad = False
    for (mode, bs), (runs, plens, cats) in results.items():
        def gen(call, plens=plens) -> list[list[int]]:
            out = call.result
            return _generated(out if isinstance(out, torch.Tensor) else out.sequences, plens[call.index], eos)

        def ntok(call) -> int:
            return sum(len(g) for g in gen(call))

        base = "HF plain" if "HF plain" not in runs.failed else None
        rows = []
        width = 7 + len(categories) + (as_loaded is not None)
        for name, calls in runs.ran(rows, width):
            def rate(cs):
                return sum(ntok(c) for c in cs) / max(sum(c.seconds for c in cs), 1e-9)

            per_cat = []
            for c in categories:
                mine = [x for x in calls if cats[x.index] == c]
                ref = [x for x in runs.of(base) if cats[x.index] == c] if base else []
                per_cat.append(f"{rate(mine) / rate(ref):.2f}×" if mine and ref else "")
            st = pool_stats(c.result.stats for c in calls if not isinstance(c.result, torch.Tensor))
            if name.startswith("mmspec"):
                tau = (st.accepted_tokens + st.row_steps) / max(st.row_steps, 1)
                d = st.drafted_tokens / max(st.row_steps, 1)
                levels = 0.0 if "lookup" in name and "hybrid" not in name else (
                    tree_shape[0] if ("tree" in name or "hybrid" in name) else d)
                ceil = cal.ceiling(tau, d, levels)
                sp = st.split_ms_per_step(runs.total(name))
                split = f"{sp['target']:.0f} / {sp['drafter']:.0f} / {sp['verify']:.1f} / {sp['rest']:.1f}"
            else:
                tau = sum(ntok(c) for c in calls) / max((sum(len(c.meter) for c in calls) - len(calls)) * bs, 1)
                ceil, split = None, ""
            ident = ""
            if mode == "greedy" and base:
                ref = {c.index: gen(c) for c in runs.of(base)}
                same = [gen(c) == ref[c.index] for c in calls]
                ident = "yes" if all(same) else f"NO ({sum(same)}/{len(same)})"
                bad |= not all(same)
            sp = runs.speedup(name, base, ntok) if base else float("nan")
            vs_loaded = (f"{runs.speedup(name, 'HF plain, as loaded (unpacked)', ntok):.2f}×"
                         if as_loaded is not None and not runs.na("HF plain, as loaded (unpacked)") else "")
            rows.append([name, f"{runs.rate(name, ntok):.1f}", f"{sp:.2f}×", *([vs_loaded] if as_loaded else []),
                         *per_cat, f"{tau:.2f}",
                         f"{ceil:.2f}" if ceil else "", split, ident])
        label = "greedy" if mode == "greedy" else "T = 1"
        lines += [f"### {label}, batch {bs}", "",
                  *md_table(["method", "tok/s", "speedup", *(["vs HF plain as loaded"] if as_loaded else []),
                             *categories, "tau", "ceiling",
                             "split target / drafter / verify / rest (ms per step)", "identical"], rows), ""]
    report("\n".join(lines), a.out, a.section)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
