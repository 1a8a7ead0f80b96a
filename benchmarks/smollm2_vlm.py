"""VLM benchmark on the scene VLM built on SmolLM2-135M-Instruct: plain AR, HF assisted generation (small VLM
drafter, full tokens) and mmspec with both drafter kinds, full and pruned, at a short and a long visual context.

Run from the repository root::

    python -m benchmarks.vlm --model smollm2                       # full run (~30 min here)
    python -m benchmarks.vlm --model smollm2 --quick               # smoke run
    python -m benchmarks.vlm --model smollm2 --out benchmarks/RESULTS.md

One interleaved run (method order rotated per prompt, after a warm-up), greedy, batch 1 (HF
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

import sys

import torch

from ._harness import (ForwardMeter, arg_parser, begin, decode_step_seconds, interleave, md_table, pool_stats,
                       provenance, report, session_seconds)

SECTION = "## VLM on SmolLM2-135M-Instruct (issue 14)"
STRATEGIES = ("verifier", "cls", "diversity", "uniform")
RATIOS = (0.1, 0.25, 0.5)
QUESTION = "Describe the image in detail."


def _step_ms(model, inputs: dict, reps: int = 8, head=None) -> float:
    """Median ms of one cached 1-token step after prefilling ``inputs`` (the head: with random features)."""
    if head is None:
        return 1e3 * decode_step_seconds(model, inputs, reps=reps)
    ids, d = inputs["input_ids"], head.config.hidden_size
    feats = (torch.randn(1, ids.shape[1] - 1, d), torch.randn(1, 1, d))
    return 1e3 * session_seconds(head, ids[:, :-1], ids[:, -1:], features=feats, reps=reps)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("smollm2_vlm", __doc__, prompts=3, max_new_tokens=64,
                    quick={"prompts": 1, "max_new_tokens": 12, "strategies": "verifier", "ratios": "0.1"})
    ap.add_argument("--model", default="smollm2", choices=["smollm2"])
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
    load_before = begin(a.threads)
    import mmspec.vision as mv

    from mmspec.zoo.data import heldout_scenes
    from mmspec.zoo.scenes import render
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
    for ctx in contexts:
        grid = grids[ctx]
        prompts = [vlm_inputs(processor, [render(s, TILE * grid)], QUESTION, grid=grid) for s in scenes]
        n_visual = int((prompts[0]["input_ids"] == target.config.image_token_id).sum())
        t_t = _step_ms(target, prompts[0])
        micro[ctx] = dict(visual=n_visual, target=t_t, head=_step_ms(None, prompts[0], head=head) / t_t,
                          small=_step_ms(small, prompts[0]) / t_t, target_ms=t_t, length=prompts[0]["input_ids"].shape[1])

        def hf(inp, seed, **extra):
            return target.generate(**inp, do_sample=False, max_new_tokens=a.max_new_tokens, **extra)

        methods = {"plain AR (HF generate)": hf,
                   "HF assisted (small VLM, full tokens, HF's draft-length heuristic)":
                       lambda inp, seed: hf(inp, seed, assistant_model=small)}

        def mm(drafter, strategy, ratio, k):
            return lambda inp, seed: mv.generate(target, drafter, inp, pruning=strategy, keep_ratio=ratio,
                                                 max_new_tokens=a.max_new_tokens, num_draft_tokens=k)

        for kind, drafter, k in (("head", head, a.k_head), ("small VLM", small, a.k_small)):
            methods[f"mmspec {kind}, full tokens"] = mm(drafter, "none", 1.0, k)
            for strategy in strategies:
                for ratio in ratios:
                    methods[f"mmspec {kind}, {strategy} keep {ratio}"] = mm(drafter, strategy, ratio, k)
        with torch.no_grad():  # an HF feature that refuses this pair: its row says n/a
            runs = interleave(methods, prompts, meter=ForwardMeter(target), catch=True, label=ctx)
        results[ctx] = (runs, [p["input_ids"].shape[1] for p in prompts])

    lines = [SECTION + (", pre-packed weights" if a.pack else ""), "",
             f"{provenance('smollm2_vlm', argv, load_before)} Target: the scene VLM on SmolLM2 "
             f"(`mmspec.zoo.smollm2_llava.load_smollm2_vlm`), float32, SDPA"
             f"{', linear weights pre-packed for oneDNN (every row)' if a.pack else ''}. {len(scenes)} held-out scenes, "
             f"\"{QUESTION}\", greedy, batch 1, at most {a.max_new_tokens} new tokens (EOS ends); chains: head "
             f"k = {a.k_head}, small VLM k = {a.k_small}. Speedup = tokens/s over plain AR's, pooled over the prompts "
             f"(range: per prompt).", ""]
    all_same = True
    for ctx, (runs, plens) in results.items():
        m = micro[ctx]

        def gen(call, plens=plens) -> list[int]:
            out = call.result
            return generated(out if isinstance(out, torch.Tensor) else out.sequences, plens[call.index])

        def tokens(call) -> int:
            return len(gen(call))

        base = runs.names[0]
        ref = {c.index: gen(c) for c in runs.of(base)}
        rows = []
        for n, calls in runs.ran(rows, 9):
            if n.startswith("mmspec"):
                st = pool_stats(c.result.stats for c in calls)
                tau = (st.accepted_tokens + st.row_steps) / max(st.row_steps, 1)
                c, k = (m["head"], a.k_head) if "head" in n else (m["small"], a.k_small)
                ceil = tau / (1 + c * k)
                ceil_s, pct = f"{ceil:.2f}", f"{100 * runs.speedup(n, base, tokens) / ceil:.0f} %"
                kept = str(calls[0].result.stats.extra.get("drafter_visual_tokens", ["–"])[0])
                pre = f"{1e3 * st.drafter_prefill_time / len(calls):.0f}"
            else:
                # HF: every target forward emits (its prefill too)
                tau = sum(tokens(c) for c in calls) / max(sum(len(c.meter) for c in calls), 1)
                ceil_s = pct = pre = ""
                kept = str(m["visual"]) if "assisted" in n else ""
            same = [gen(c) == ref[c.index] for c in calls]
            all_same &= all(same)
            ident = "yes" if all(same) else f"NO ({sum(same)}/{len(same)})"
            rows.append([n, f"{runs.rate(n, tokens):.1f}", runs.speed_cell(n, base, tokens), f"{tau:.2f}", ceil_s, pct,
                         kept, pre, ident])
        lines += [f"### {ctx} visual context: {m['visual']} visual tokens, {m['length']}-token prompt", "",
                  f"One target decoding forward at this context: {m['target_ms']:.1f} ms; c (full context): head "
                  f"{m['head']:.3f}, small VLM {m['small']:.3f}.", "",
                  *md_table(["method", "tok/s", "speedup (range)", "tau", "ceiling", "% ceiling",
                             "drafter visual tokens", "drafter prefill ms", "identical to AR"], rows), ""]
    report("\n".join(lines), a.out, SECTION + (", pre-packed weights" if a.pack else ""))
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
