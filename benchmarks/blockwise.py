"""Blockwise parallel drafts with lattice rescoring on SmolLM2-135M-Instruct: τ and speed of plain heads,
heads + n-gram rescoring and heads + neural rescoring, beside the EAGLE-3 head and the baselines.

Run from the repository root::

    python -m benchmarks.blockwise --pack --ngram-weight 1.0 --out benchmarks/RESULTS.md --plots benchmarks
                                                                    # full run (~13 min on 2 cores)
    python -m benchmarks.blockwise --quick                          # smoke run

One interleaved run over the held-out chat prompts of ``benchmarks.smollm2`` (batch 1, greedy, EOS on):
every method runs on every prompt, in an order rotated from prompt to prompt; every output is checked token
for token against plain AR's.

Glossary:
    heads       the shipped blockwise heads (``mmspec train-drafter --kind heads``): 4 heads on the target's
                final hidden state, lattice of the top ``--top-k`` tokens per head
    p           candidates (lattice paths) verified per step as one tree; every blockwise row at one p verifies
                the same number of candidates, so τ differences are the rescoring's
    n-gram      trigram Witten-Bell model of local text (the answers the heads were trained on, shipped as their
                folder's token table, ``load_smollm2_ngram``; never the benchmark's prompts) mixed 1:1 with one of
                the row's own context, weight ``--ngram-weight``
    neural      the distilled 2-layer SmolLM2 drafter (the standalone drafter of issue 13) scoring the beams,
                weight ``--neural-weight``; one drafter forward per lattice column
    τ           tokens emitted per target forward; "vs plain" is τ / τ of the plain heads at the same p
    nodes       tree nodes verified per step (the candidates' trie; the same p can share prefixes)
    split       time per step: target forward (incl. the tree), drafter (heads + search + rescorer), verification
"""

from __future__ import annotations

import time
from pathlib import Path

from ._harness import Fresh, arg_parser, begin, interleave, md_table, pool_stats, provenance, report
from .smollm2 import PROMPTS, chat_model

SECTION = "## Blockwise parallel drafts with lattice rescoring on SmolLM2 (issue 16)"


def plot_tau_and_speed(rows: dict[str, tuple[float, float]], path: Path) -> None:
    """Two bar charts: τ and speedup vs AR per method (``rows``: name -> (τ, speedup))."""
    from ._plots import _pyplot

    plt = _pyplot()
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, idx, label in ((axes[0], 0, "τ (tokens per target forward)"), (axes[1], 1, "speedup vs plain AR")):
        colors = ["C2" if "n-gram" in n else "C1" if "neural" in n else "C0" if n.startswith("heads") else "grey"
                  for n in names]
        ax.barh(range(len(names)), [rows[n][idx] for n in names], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Blockwise parallel drafts on SmolLM2-135M (greedy, batch 1, 2-core CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def rows_from_results(results: Path, section: str = SECTION) -> dict[str, tuple[float, float]]:
    """(τ, speedup) per method, read back from the section's table in RESULTS.md."""
    text = results.read_text()
    part = text[text.index(section):]
    end = part.find("\n## ", 1)
    out = {}
    for line in (part if end < 0 else part[:end]).splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 4 and cells[1].startswith("x"):
            out[cells[0]] = (float(cells[3]), float(cells[1][1:]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("blockwise", __doc__, prompts=8, max_new_tokens=128, section=SECTION,
                    plots="blockwise_tau_speed.png", quick={"prompts": 2, "max_new_tokens": 24})
    ap.add_argument("--top-k", type=int, default=8, help="lattice: top tokens per head")
    ap.add_argument("--candidates", default="1,4", help="comma-separated p values")
    ap.add_argument("--depth", type=int, default=None, help="heads used per block (default: all)")
    ap.add_argument("--pack", action="store_true", help="pre-pack the target's and the drafter LM's linear weights "
                                                          "for oneDNN first (mmspec.cpu_packing)")
    ap.add_argument("--ngram-weight", type=float, default=0.5, help="weight of the n-gram rescorer")
    ap.add_argument("--neural-weight", type=float, default=0.5, help="weight of the neural rescorer")
    ap.add_argument("--k-head", type=int, default=3, help="EAGLE-3 head chain length")
    ap.add_argument("--only", default="", help="comma-separated substrings of method names to run (plus AR)")
    a = ap.parse_args(argv)
    load_before = begin(2)
    from mmspec import engine
    from mmspec.drafters.blockwise import Lattice
    from mmspec.drafters.lattice_rescoring import NeuralRescorer, NGramRescorer
    from mmspec.pretrained import chat_inputs
    from mmspec.zoo.smollm2 import load_smollm2_drafter, load_smollm2_ngram

    target, tok, eos = chat_model()
    small = load_smollm2_drafter("model", target)
    if a.pack:
        from mmspec.cpu_packing import pack_linear_weights

        pack_linear_weights(target)
        pack_linear_weights(small)
    t0 = time.perf_counter()
    ngram = load_smollm2_ngram(order=3)
    ngram_tokens = sum(ngram.totals[0].values())
    ngram_build = time.perf_counter() - t0
    ps = [int(x) for x in a.candidates.split(",") if x.strip()]

    def run(enc, seed, drafter):
        return engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=drafter,
                               max_new_tokens=a.max_new_tokens, eos_token_id=eos,
                               **({"num_draft_tokens": 10} if isinstance(drafter, str) else {}))

    def heads(p: int, rescorer=None):
        return Fresh(lambda: load_smollm2_drafter("heads", target, lattice=Lattice(top_k=a.top_k, num_candidates=p,
                                                                                   depth=a.depth),
                                                  rescorer=rescorer() if rescorer else None), run)

    methods = {"AR": Fresh(lambda: None, run), "prompt lookup": Fresh(lambda: "prompt_lookup", run),
               f"EAGLE-3 head, chain k={a.k_head}": Fresh(lambda: load_smollm2_drafter("head", target,
                                                                                       draft_length=a.k_head), run)}
    for p in ps:
        methods[f"heads, p={p}"] = heads(p)
        methods[f"heads + n-gram, p={p}"] = heads(p, lambda: NGramRescorer(ngram, weight=a.ngram_weight))
        methods[f"heads + neural, p={p}"] = heads(p, lambda: NeuralRescorer(small, weight=a.neural_weight))
    if a.only:
        keep = [s.strip() for s in a.only.split(",") if s.strip()]
        methods = {n: f for n, f in methods.items() if n == "AR" or any(s in n for s in keep)}
    names = list(methods)
    encs = [chat_inputs(tok, [prompt]) for prompt in PROMPTS[: a.prompts]]
    runs = interleave(methods, encs, label="blockwise")
    acc = {}
    for n in names:
        st = pool_stats(out.stats for out in runs.results(n))
        acc[n] = dict(time=runs.total(n), tokens=st.emitted_tokens, steps=st.row_steps, target=st.target_time,
                      draft=st.drafter_time, verify=st.verify_time, nodes=st.drafted_tokens)
    outputs = {n: [c.result.sequences[0, encs[c.index]["input_ids"].shape[1]:].tolist() for c in runs.of(n)]
               for n in names}
    identical = all(outputs[n] == outputs["AR"] for n in names)

    def tau(n: str) -> float:
        return acc[n]["tokens"] / max(acc[n]["steps"], 1)

    rows = []
    for n in names:
        r = acc[n]
        steps = max(r["steps"], 1)
        plain = next((f"heads, p={p}" for p in ps if n.endswith(f"p={p}") and n.startswith("heads")), None)
        vs = f"{tau(n) / tau(plain) - 1:+.1%}" if plain in acc and plain != n else "–"
        split = "/".join(f"{1000 * r[k] / steps:.0f}" for k in ("target", "draft", "verify"))
        nodes = f"{r['nodes'] / steps:.1f}" if n != "AR" else "–"
        rows.append([n, f"x{acc['AR']['time'] / r['time']:.2f}", f"{r['tokens'] / r['time']:.1f}", f"{tau(n):.2f}", vs,
                     nodes, split])
    text = "\n".join([
        a.section, "",
        f"{provenance('blockwise', argv, load_before)} {a.prompts} held-out chat prompts × {a.max_new_tokens} "
        f"new tokens, batch 1, greedy; lattice top-{a.top_k} per head, depth {a.depth or 'all heads'}"
        f"{'; linear weights pre-packed' if a.pack else ''}; outputs identical to plain AR: {identical}. "
        f"Global n-gram: trigrams of the heads' {ngram_tokens} training-answer tokens (built in {ngram_build:.1f} s); "
        f"weights: n-gram {a.ngram_weight}, neural {a.neural_weight} (chosen on 4 other prompts).", "",
        *md_table(["method", "speedup vs AR", "tok/s", "τ", "τ vs plain heads (same p)", "nodes/step",
                   "split target/draft/verify (ms per step)"], rows), ""])
    report(text, a.out, a.section)
    if a.plots is not None:
        plot_tau_and_speed({n: (tau(n), acc["AR"]["time"] / acc[n]["time"]) for n in names},
                           a.plots / "blockwise_tau_speed.png")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
