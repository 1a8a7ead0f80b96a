"""SmolLM2 split over pipeline stages, one process and one thread each: single-process AR, pipelined AR, naive
pipelined speculative decoding and FlowSpec, in one interleaved run (issue 18).

    python -m benchmarks.pipeline --out benchmarks/RESULTS.md --plots benchmarks
    python -m benchmarks.pipeline --quick                      # smoke run (2 prompts, 16 tokens)

The command measures per-layer, head and drafter costs in one process (one thread), derives a cost-balanced
two-stage plan from them, then launches ``torchrun --nproc-per-node 2 -m benchmarks.pipeline --worker``. In the
group, rank 0 also holds a whole copy of the target for the single-process row, and every method runs on every
prompt, in rotated order.

Glossary:
    naive        one draft tree (EAGLE-2 dynamic tree from the same drafter) travels the whole pipeline before the
                 next is drafted: the one loop with a :class:`~mmspec.pipeline.session.PipelineSession`
    FlowSpec     :mod:`mmspec.pipeline.flowspec`: score-ordered segments in flight back to back, step-wise
                 verification, in-flight pruning, expansion while busy
    bubble       per stage, the share of the run's wall time it was not computing (rank 0: waiting for the last
                 stage; later stages: waiting for their predecessor); "mean" over the stages
    pruned       tokens the later stages dropped from queued segments because rank 0 had pruned them in flight
    tokens/round tokens emitted per verification round (naive: per step; FlowSpec: per round, i.e. per token the
                 target produced that was not in the tree)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mmspec.truncate import truncated_copy

from ._harness import CachedForward, arg_parser, begin, interleave, md_table, median_seconds, provenance, report

SECTION_HEADING = "## Pipelined speculative decoding (FlowSpec) on SmolLM2 (issue 18)"
DRAFT_LAYERS = 2


# -- costs, measured in one process ------------------------------------------------------------------------------
def measure_costs(target: torch.nn.Module, draft: torch.nn.Module, widths=(1, 4, 8), context: int = 200) -> dict:
    """Median seconds, with a ``context``-token cache (one thread), of one decoder layer (the body's forward over
    the number of layers), the LM head, and one drafter forward, at each width."""
    num_layers = len(target.model.layers)
    out = {"layer": {}, "head": {}, "draft": {}}
    ids = torch.randint(0, 1000, (1, context))
    for w in widths:
        new = torch.randint(0, 1000, (1, w))
        for key, model in (("layer", target.model), ("draft", draft)):
            step = CachedForward(model, {"input_ids": ids}, {"input_ids": new})
            out[key][w] = step.median(reps=7, warmup=1) / (num_layers if key == "layer" else 1)
        h = torch.randn(1, w, target.config.hidden_size)
        with torch.no_grad():
            out["head"][w] = median_seconds(lambda: target.lm_head(h), reps=7, warmup=1)
    return out


def balanced_plan(num_layers: int, costs: dict, width: int) -> tuple[int, ...]:
    """Two stages: rank 0 carries the drafter (one forward per segment) besides its layers; the last stage the
    LM head; both in units of one layer at the segment width."""
    from mmspec.pipeline.plan import plan_stages

    unit = costs["layer"][width]
    plan = plan_stages(num_layers, 2, first_extra=costs["draft"][width] / unit, last_extra=costs["head"][width] / unit)
    return plan.boundaries


# -- the worker, under torchrun -----------------------------------------------------------------------------------
def _link_latency(rank: int, d: int, vocab: int, widths=(1, 8), reps: int = 20) -> dict:
    """Median one-way seconds rank 0 -> 1 for a segment's hidden states and 1 -> 0 for its logits (half a round
    trip of each)."""
    import torch.distributed as dist

    out = {}
    for w in widths:
        for name, shape in (("hidden", (1, w, d)), ("logits", (1, w, vocab))):
            buf = torch.zeros(shape)

            def round_trip(buf=buf):
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                elif rank == 1:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)

            out[f"{name}@{w}"] = median_seconds(round_trip, reps, warmup=0) / 2
    return out


class StageMeter:
    """A meter for the interleaved run on rank 0: resets the stages' counters before a call; after it, the seconds
    rank 0 spent blocked in receives on ``transport`` and the stages' counters (``collect_stage_stats``)."""

    def __init__(self, transport):
        self.transport, self.wait0 = transport, 0.0

    def start(self) -> None:
        from mmspec.pipeline.session import collect_stage_stats

        collect_stage_stats(transport=self.transport)
        self.wait0 = self.transport.recv_wait_s

    def stop(self) -> tuple[float, list]:
        from mmspec.pipeline.session import collect_stage_stats

        wait = self.transport.recv_wait_s - self.wait0
        return wait, collect_stage_stats(transport=self.transport)


def worker(a) -> int:
    from mmspec import generate as mm_generate
    from mmspec.cpu_packing import pack_linear_weights
    from mmspec.drafters.model import ModelDrafter
    from mmspec.drafters.tree import DynamicTree
    from mmspec.pipeline import flowspec, run
    from mmspec.pipeline.session import stop_stages
    from mmspec.pipeline.transport import GlooTransport
    from mmspec.pipeline.plan import StagePlan
    from mmspec.pretrained import chat_inputs, load_causal_lm

    from .smollm2 import PROMPTS

    rank, world = run.init_group(120.0)
    target, tok = load_causal_lm()
    vocab, d = int(target.config.vocab_size), int(target.config.hidden_size)
    eos = target.generation_config.eos_token_id
    full = draft = head = None
    if rank == 0:
        full = copy.deepcopy(target)
        draft = truncated_copy(target, DRAFT_LAYERS)
        if "head" in a.drafters:
            from mmspec.zoo.smollm2 import load_smollm2_drafter

            head = load_smollm2_drafter("head", full).head  # attached to the whole copy (embedding, head rows)
    stage = run.stage_for_rank(target, rank, world, StagePlan(tuple(int(x) for x in a.plan.split(","))))
    for m in (full, draft, stage):
        if m is not None and a.pack:
            pack_linear_weights(m)
    link = _link_latency(rank, d, vocab)
    if rank > 0:
        run.serve_stage(stage, rank, world)
        return 0
    transport = GlooTransport()  # rank 0's one transport to the stages: its receive waits are the bubble
    prompts = list(PROMPTS[: a.prompts])
    config = flowspec.FlowSpecConfig(segment_size=a.segment_size, top_k=a.top_k, max_nodes=a.max_nodes,
                                     max_depth=a.max_depth)
    gated_config = flowspec.FlowSpecConfig(segment_size=a.segment_size, top_k=a.top_k, max_nodes=a.max_nodes,
                                           max_depth=a.max_depth, min_path_prob=a.gate or 0.0)
    tree = DynamicTree(depth=a.naive_depth, top_k=a.naive_top_k, num_nodes=a.naive_nodes)
    from mmspec.drafters.feature import FeatureDrafter

    gated = f", gated (p >= {a.gate:g})"
    labels = {"truncated": f"{DRAFT_LAYERS}-layer", "head": "EAGLE-3 head"}
    methods = ["single-process AR", "pipelined AR"]
    for kind in a.drafters.split(","):
        methods += [f"naive pipelined SD ({labels[kind]})", f"FlowSpec ({labels[kind]})"]
        methods += [f"FlowSpec{gated} ({labels[kind]})"] if a.gate else []

    def make_drafter(m: str, tree_shape=None):
        if "EAGLE" in m:
            return FeatureDrafter(head, tree=tree_shape) if tree_shape is not None else FeatureDrafter(head, 4)
        return ModelDrafter(draft, tree=tree_shape) if tree_shape is not None else draft

    def method(m: str):
        def one(enc, seed):
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if m == "single-process AR":
                out = mm_generate(full, ids, drafter=None, attention_mask=mask, max_new_tokens=a.max_new_tokens,
                                  eos_token_id=eos)
                return dict(new=out.sequences[0, ids.shape[1]:].tolist(), rounds=out.stats.steps, accepted=0, split={})
            if m == "pipelined AR" or m.startswith("naive"):
                drafter = None if m == "pipelined AR" else make_drafter(m, tree)
                out = run.generate(stage, ids, transport=transport, vocab_size=vocab, drafter=drafter,
                                   max_new_tokens=a.max_new_tokens, eos_token_id=eos, attention_mask=mask)
                st = out.stats
                return dict(new=out.sequences[0, ids.shape[1]:].tolist(), rounds=st.steps, accepted=st.accepted_tokens,
                            split={"target": st.target_time, "draft": st.drafter_time, "verify": st.verify_time})
            out = flowspec.generate(stage, ids, transport=transport, vocab_size=vocab, drafter=make_drafter(m),
                                    config=gated_config if "gated" in m else config,
                                    max_new_tokens=a.max_new_tokens, eos_token_id=eos, attention_mask=mask)
            st = out.stats
            return dict(new=out.sequences[0, ids.shape[1]:].tolist(), rounds=st.rounds, accepted=st.accepted_tokens,
                        split=dict(st.time_split), killed=st.killed_in_flight, sent=st.nodes_sent)
        return one

    encs = [chat_inputs(tok, [prompt]) for prompt in prompts]
    runs = interleave({m: method(m) for m in methods}, encs, meter=StageMeter(transport), label="pipeline rank 0")
    rows = {}
    for m in methods:
        r = rows[m] = {"tokens": 0, "seconds": 0.0, "rounds": 0, "accepted": 0, "wait": 0.0, "busy1": 0.0,
                       "wall1": 0.0, "pruned": 0, "killed": 0, "sent": 0, "identical": [], "split": {}}
        for call in runs.of(m):
            res, (wait, stats) = call.result, call.meter
            r["tokens"] += len(res["new"])
            r["seconds"] += call.seconds
            r["rounds"] += res["rounds"]
            r["accepted"] += res["accepted"]
            r["killed"] += res.get("killed", 0)
            r["sent"] += res.get("sent", 0)
            r["wait"] += wait
            if stats:
                r["busy1"] += stats[0][1]
                r["wall1"] += call.seconds
                r["pruned"] += int(stats[0][4])
            for k, v in res["split"].items():
                r["split"][k] = r["split"].get(k, 0.0) + v
    ref = {c.index: c.result["new"] for c in runs.of("single-process AR")}
    for m in methods:
        rows[m]["identical"] = [c.result["new"] == ref[c.index] for c in runs.of(m)]
    stop_stages(transport=transport)
    result = {"rows": rows, "link": link, "plan": a.plan, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
              "config": {"segment_size": a.segment_size, "top_k": a.top_k, "max_nodes": a.max_nodes,
                         "max_depth": a.max_depth, "gate": a.gate, "naive": [a.naive_depth, a.naive_top_k, a.naive_nodes]}}
    Path(a.json).write_text(json.dumps(result))
    return 0


# -- the report ---------------------------------------------------------------------------------------------------
def section(res: dict, costs: dict, load_before, argv: list[str] | None, pack: bool) -> str:
    rows = res["rows"]
    base = rows["single-process AR"]

    def tps(r):
        return r["tokens"] / r["seconds"]

    def naive_of(name: str):
        kind = name[name.rfind("("):] if name.endswith(")") else None
        match = [r for n, r in rows.items() if n.startswith("naive") and kind and n.endswith(kind)]
        return match[0] if match else None

    lines = [SECTION_HEADING, "",
             f"{provenance('pipeline', argv, load_before)} SmolLM2-135M-Instruct (float32{', linear weights pre-packed' if pack else ''}) over 2 stages "
             f"(torchrun, gloo on loopback, **one thread per process**; plan {res['plan']}"
             f"{', given' if res.get('plan_given') else ', balanced from the measured costs below'}), {res['prompts']} held-out chat prompts x at most {res['max_new_tokens']} new tokens, greedy, "
             f"batch 1, one interleaved run (every method on every prompt, rotated order). Drafters, on rank 0: "
             f"the target's first {DRAFT_LAYERS} layers with its LM head (early exit), and the shipped EAGLE-3 head "
             f"(it reads the target's hidden states 3, 15 and 28, which the stages return with the logits). Naive: "
             f"EAGLE-2 dynamic "
             f"tree depth {res['config']['naive'][0]}, top-{res['config']['naive'][1]}, {res['config']['naive'][2]} "
             f"nodes. FlowSpec: segments of {res['config']['segment_size']}, top-{res['config']['top_k']}, at most "
             f"{res['config']['max_nodes']} nodes and depth {res['config']['max_depth']} per round, at most one segment "
             f"in flight per stage; the gated row sends a round's later segments only if their best node's path "
             f"probability (the drafter's) is at least {res['config']['gate']:g}.", ""]
    table = []
    for name, r in rows.items():
        single = name == "single-process AR"
        bubble0 = "" if single else f"{r['wait'] / r['seconds']:.0%}"
        bubble1 = "" if single or not r["wall1"] else f"{1 - r['busy1'] / r['wall1']:.0%}"
        split = ", ".join(f"{k} {v:.1f}" for k, v in r["split"].items())
        pruned = (f"{r['pruned']} (of {r['killed']} nodes pruned while sent; {r['sent']} sent)"
                  if name.startswith("FlowSpec") else "")
        naive = naive_of(name)
        vs_naive = f"{tps(r) / tps(naive):.2f}x" if naive is not None else ""
        table.append([name, f"{tps(r):.2f}", f"{tps(r) / tps(base):.2f}x", vs_naive,
                      f"{r['tokens'] / max(1, r['rounds']):.2f}", f"{bubble0}{' / ' + bubble1 if bubble1 else ''}",
                      pruned, split, "yes" if all(r["identical"]) else "NO"])
    lw = costs["layer"]
    lines += [*md_table(["method", "tok/s", "vs single-process AR", "vs naive pipelined SD (same drafter)",
                         "tokens/round", "bubble rank 0 / stage 1", "pruned in flight (tokens)",
                         "time split on rank 0 (s)", "identical"], table), "", "Measured inputs (one thread, 200-token context; ms): decoder layer " +
              ", ".join(f"w={w}: {v * 1e3:.2f}" for w, v in lw.items()) + "; final norm + LM head " +
              ", ".join(f"w={w}: {v * 1e3:.2f}" for w, v in costs["head"].items()) + f"; {DRAFT_LAYERS}-layer drafter "
              "forward " + ", ".join(f"w={w}: {v * 1e3:.2f}" for w, v in costs["draft"].items()) +
              "; one-way loopback transfer " + ", ".join(f"{k}: {v * 1e3:.2f}" for k, v in res["link"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    names = list(rows)
    tps = [rows[n]["tokens"] / rows[n]["seconds"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    colors = ["#4c72b0" if n == "single-process AR" else "#dd8452" if n == "pipelined AR" else "#8c8c8c"
              if n.startswith("naive") else "#55a868" for n in names]
    bars = ax.barh(names[::-1], tps[::-1], color=colors[::-1])
    for b, v in zip(bars, tps[::-1]):
        ax.text(v, b.get_y() + b.get_height() / 2, f" {v:.2f}", va="center")
    ax.set_xlabel("tokens / s (SmolLM2, 2 stages, one thread each)")
    ax.set_title("Pipelined speculative decoding on a 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("pipeline", __doc__, prompts=8, max_new_tokens=64, plots="pipeline_speed.png",
                    quick={"prompts": 2, "max_new_tokens": 16})
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan", default=None, help="stage boundaries, e.g. 0,19,30 (default: balanced from measured costs)")
    ap.add_argument("--segment-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--drafters", default="truncated,head",
                    help="comma-separated: truncated (the target's first 2 layers, early exit), head (the shipped "
                         "EAGLE-3 head, fed with the stages' hidden states)")
    ap.add_argument("--gate", type=float, default=0.5,
                    help="a second FlowSpec row sending a round's later segments only if their best path probability "
                         "reaches this (0: no second row)")
    ap.add_argument("--naive-depth", type=int, default=4)
    ap.add_argument("--naive-top-k", type=int, default=3)
    ap.add_argument("--naive-nodes", type=int, default=8)
    ap.add_argument("--no-pack", dest="pack", action="store_false", help="plain BLAS linear layers")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    load_before = begin(1)
    from mmspec.cpu_packing import pack_linear_weights
    from mmspec.pretrained import load_causal_lm

    target, _ = load_causal_lm()
    draft = truncated_copy(target, DRAFT_LAYERS)
    if a.pack:
        pack_linear_weights(target)
        pack_linear_weights(draft)
    costs = measure_costs(target, draft, widths=(1, a.segment_size, 8) if a.segment_size != 8 else (1, 8))
    plan = a.plan or ",".join(str(b) for b in balanced_plan(len(target.model.layers), costs, a.segment_size))
    del target, draft
    print(f"costs measured; plan {plan}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "pipeline.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "benchmarks.pipeline", "--worker", "--json", str(out_json),
               "--plan", plan, "--prompts", str(a.prompts), "--max-new-tokens", str(a.max_new_tokens),
               "--segment-size", str(a.segment_size), "--top-k", str(a.top_k), "--max-nodes", str(a.max_nodes),
               "--max-depth", str(a.max_depth), "--gate", str(a.gate), "--drafters", a.drafters, "--naive-depth", str(a.naive_depth), "--naive-top-k",
               str(a.naive_top_k), "--naive-nodes", str(a.naive_nodes)] + ([] if a.pack else ["--no-pack"])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not out_json.exists():
            print(f"error: the pipeline run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        res = json.loads(out_json.read_text())
        res["plan_given"] = bool(a.plan)
    text = section(res, {k: {int(w): v for w, v in d.items()} for k, d in costs.items()}, load_before, argv,
                   a.pack)
    report(text, a.out, SECTION_HEADING)
    if a.plots is not None:
        plot(res, a.plots / "pipeline_speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
