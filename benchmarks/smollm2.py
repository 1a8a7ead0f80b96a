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

import sys

import torch

from ._harness import (ForwardMeter, arg_parser, begin, interleave, md_table, pool_stats, provenance, report,
                       session_seconds)

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


def chat_model():
    """SmolLM2-135M-Instruct (:func:`mmspec.pretrained.load_causal_lm`), its tokenizer and the id of
    ``<|im_end|>``, which ends an answer."""
    from mmspec.pretrained import load_causal_lm

    target, tok = load_causal_lm()
    return target, tok, tok.convert_tokens_to_ids("<|im_end|>")


def _generated(seq: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    rows = []
    for r in seq[:, prompt_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t == eos), len(r))
        rows.append(r[:cut])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("smollm2", __doc__, prompts=len(PROMPTS), max_new_tokens=128,
                    quick={"max_new_tokens": 24, "prompts": 2})
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
    load_before = begin(a.threads)
    from mmspec import engine
    from mmspec.drafters.cost_model import measure_cost_model
    from mmspec.drafters.feature import FeatureDrafter
    from mmspec.drafters.model import ModelDrafter
    from mmspec.drafters.tree import DynamicTree
    from mmspec.pretrained import chat_inputs
    from mmspec.zoo.smollm2 import load_smollm2_drafter

    target, tok, eos = chat_model()
    head_drafter = load_smollm2_drafter("head", target)
    head = head_drafter.head
    small = load_smollm2_drafter("model", target)
    if a.pack:
        from mmspec.cpu_packing import pack_linear_weights

        packed = sum(pack_linear_weights(mod) for mod in (target, head, small))
        print(f"packed {packed} linear layers for oneDNN", flush=True)
    prompts = list(PROMPTS[: a.prompts])

    # ---- micro-benchmarks: c and the cost model
    ids = torch.randint(0, 1000, (1, 201))

    def time_single(model, hidden=None):
        feats = None if hidden is None else (torch.randn(1, 200, hidden), torch.randn(1, 1, hidden))
        return session_seconds(model, ids[:, :200], ids[:, 200:], features=feats, reps=20)

    t_target = time_single(target)
    t_head = time_single(head, hidden=head.config.hidden_size)
    t_small = time_single(small)
    c_head, c_small = t_head / t_target, t_small / t_target
    cost = measure_cost_model(target, widths=(1, 2, 4, 8, 16, 24, 32, 48), context=200, repeats=3,
                              level_seconds=t_head)
    depth, top_k, nodes = (int(x) for x in a.tree.split(","))
    tree = DynamicTree(depth=depth, top_k=top_k, num_nodes=nodes, cost_model=cost)

    modes = [m for m in a.modes.split(",") if m]
    batches = [int(b) for b in a.batches.split(",") if b]
    sampling = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0, top_p=0.9)}
    results = {}  # (mode, batch) -> (Runs, prompt length per round)
    for mode in modes:
        for bs in batches:
            groups = [prompts[i:i + bs] for i in range(0, len(prompts), bs)] if bs > 1 else [[p] for p in prompts]
            groups = [g for g in groups if len(g) == bs] or groups[:1]
            s = sampling[mode]
            hf_kw = dict(do_sample=mode != "greedy", **({"temperature": 1.0, "top_p": 0.9} if mode != "greedy" else {}))

            def hf(enc, **extra):
                return target.generate(**enc, max_new_tokens=a.max_new_tokens, pad_token_id=eos, **hf_kw, **extra)

            def mm(enc, drafter, k, seed):
                return engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=drafter,
                                       num_draft_tokens=k, max_new_tokens=a.max_new_tokens, seed=seed, **s)

            methods = {
                "HF plain": lambda enc, seed: hf(enc),
                "HF assisted (2-layer drafter)": lambda enc, seed: hf(enc, assistant_model=small),
                "HF prompt lookup": lambda enc, seed: hf(enc, prompt_lookup_num_tokens=a.k_lookup),
                "mmspec 2-layer drafter, chain": lambda enc, seed: mm(enc, ModelDrafter(small), a.k_model, seed),
                "mmspec prompt lookup": lambda enc, seed: mm(enc, "prompt_lookup", a.k_lookup, seed),
                "mmspec EAGLE-3 head, chain": lambda enc, seed: mm(enc, FeatureDrafter(head), a.k_head, seed),
                "mmspec EAGLE-3 head, dynamic tree": lambda enc, seed: mm(enc, FeatureDrafter(head, tree=tree),
                                                                          None, seed),
            }
            encs = [chat_inputs(tok, group) for group in groups]
            # HF features that do not support a batch fail: their rows say n/a
            runs = interleave(methods, encs, meter=ForwardMeter(target), catch=True, label=f"{mode} b{bs}")
            results[(mode, bs)] = (runs, [enc["input_ids"].shape[1] for enc in encs])

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

    heading = SECTION_HEADING + (", pre-packed linear weights" if a.pack else "")
    lines = [heading, "",
             f"{provenance('smollm2', argv, load_before)} {len(prompts)} held-out chat prompts, "
             f"{a.max_new_tokens} new tokens (EOS ends a row), float32.", "",
             f"Micro-benchmarks at a 200-token context: target 1-token forward {t_target * 1e3:.1f} ms; EAGLE-3 head "
             f"step {t_head * 1e3:.1f} ms (c = {c_head:.3f}); 2-layer drafter step {t_small * 1e3:.1f} ms "
             f"(c = {c_small:.3f}). Target cost of verifying w tokens, in 1-token forwards: "
             + ", ".join(f"w={w}: {cost.relative(w):.2f}" for w in cost.widths) + ".", "",
             f"Draft settings: head chain k={a.k_head}; head dynamic tree depth {depth}, top-k {top_k}, at most "
             f"{nodes} nodes, sized per step by the cost model; 2-layer drafter k={a.k_model} (HF assisted: its own "
             f"defaults); prompt lookup {a.k_lookup} tokens (HF and mmspec).", ""]
    bad = False
    for (mode, bs), (runs, plens) in results.items():
        label = "greedy" if mode == "greedy" else "T = 1, top-p 0.9"

        def gen(call, plens=plens) -> list[list[int]]:
            out = call.result
            return _generated(out if isinstance(out, torch.Tensor) else out.sequences, plens[call.index], eos)

        def tokens(call) -> int:
            return sum(len(g) for g in gen(call))

        base = "HF plain" if "HF plain" not in runs.failed else None
        rows = []
        for name, calls in runs.ran(rows, 9):
            ntok = sum(tokens(c) for c in calls)
            sp = runs.speedup(name, base, tokens) if base else float("nan")
            st = pool_stats(c.result.stats for c in calls if not isinstance(c.result, torch.Tensor))
            if name.startswith("mmspec"):
                tau = (st.accepted_tokens + st.row_steps) / max(st.row_steps, 1)
            else:  # HF: generated tokens per decoding forward and row (the prefill forward is not counted)
                tau = ntok / max((sum(len(c.meter) for c in calls) - len(calls)) * bs, 1)
            alpha = f"{st.accepted_tokens / st.drafted_tokens:.2f}" if st.drafted_tokens else ""
            ceil = ceiling(name, tau)
            ceil_s = f"{ceil:.2f}" if ceil else ""
            pct = f"{100 * sp / ceil:.0f} %" if ceil else ""
            if name.startswith("mmspec") and st.steps:
                per = 1e3 / st.steps
                rest = runs.total(name) - st.target_time - st.drafter_time - st.verify_time
                split = (f"{st.target_time * per:.1f} / {st.drafter_time * per:.1f} / {st.verify_time * per:.1f} / "
                         f"{rest * per:.1f}")
            else:
                split = ""
            ident = ""
            if mode == "greedy" and base:
                ref = {c.index: gen(c) for c in runs.of(base)}
                same = [gen(c) == ref[c.index] for c in calls]
                ident = "yes" if all(same) else f"NO ({sum(same)}/{len(same)})"
                bad |= not all(same)
            rows.append([name, f"{runs.rate(name, tokens):.1f}", runs.speed_cell(name, base, tokens), f"{tau:.2f}",
                         alpha, ceil_s, pct, split, ident])
        lines += [f"### {label}, batch {bs}", "",
                  *md_table(["method", "tok/s", "speedup (range)", "tau", "alpha", "ceiling", "% ceiling",
                             "split target / drafter / verify / rest (ms per step)", "identical"], rows), ""]
    report("\n".join(lines), a.out, heading)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
