"""Collaborative decoding via speculation (CoS) on SmolLM2-135M-Instruct and its domain models: standard
collaborative decoding against CoS with a fixed proposer and with alternate proposals.

Run from the repository root::

    python -m benchmarks.collaborative --pack --out benchmarks/RESULTS.md --plots benchmarks   # full run
    python -m benchmarks.collaborative --quick                                          # smoke run

One interleaved run (batch 1, 2 threads): every configuration runs every method on every prompt, in an order
rotated from prompt to prompt; greedy outputs are checked token for token against standard collaborative
decoding of the same combination.

Glossary:
    general      SmolLM2-135M-Instruct
    code         SmolLM2 with the shipped LoRA adapter trained here on Python standard-library sources
                 (``python -m mmspec.distill.train_domain --domain code``); ``german``: on German man pages
    standard     collaborative decoding without speculation: every model runs one forward per token
    fixed        CoS with one proposer (model 0, ``--fixed-gamma`` drafts) verified against r
    alternate    CoS's alternate proposals (``--alt-gamma`` per model): a scoring model's bonus distribution
                 becomes the next proposal
    accept       drafted tokens accepted / drafted
    fwd/tok      model forwards per generated token (all models; standard: the number of models)
    ceiling      standard forwards per token / this method's: the speedup if forwards were all that cost
"""

from __future__ import annotations

from pathlib import Path

from ._harness import Fresh, arg_parser, begin, interleave, md_table, pool_stats, provenance, report
from .smollm2 import chat_model

SECTION = "## Collaborative decoding via speculation (CoS) on SmolLM2 (issue 17)"

#: chat prompts where a general and a code model both have something to say
PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "How do I read a CSV file in Python and print each row?",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "Explain what a Python decorator is, with a short example.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "How can I count how often each word appears in a text with Python?",
)


def plot_speedups(rows: list[tuple[str, str, float]], path: Path) -> None:
    """Bars of speedup vs standard collaborative decoding, grouped by configuration."""
    from ._plots import _pyplot

    plt = _pyplot()
    configs = list(dict.fromkeys(c for c, _, _ in rows))
    methods = list(dict.fromkeys(m for _, m, _ in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + j * width for i, c in enumerate(configs)]
        ys = [next((s for c2, m2, s in rows if c2 == c and m2 == m), 0.0) for c in configs]
        ax.bar(xs, ys, width, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(configs))], configs, fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axhline(1.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("speedup vs standard collaborative decoding")
    ax.set_title("CoS on SmolLM2-135M + domain LoRA models (batch 1, 2-core CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("collaborative", __doc__, prompts=4, max_new_tokens=96, section=SECTION,
                    plots="collaborative_speedup.png", quick={"prompts": 1, "max_new_tokens": 16})
    ap.add_argument("--fixed-gamma", type=int, default=3, help="drafts per step of the fixed proposer")
    ap.add_argument("--alt-gamma", default="2,2", help="comma-separated proposal lengths of the 2-model runs")
    ap.add_argument("--alt-gamma3", default="2,2,2", help="of the 3-model runs")
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled ensemble configuration")
    ap.add_argument("--configs", default="ensemble,ensemble-sampled,contrastive,three",
                    help="comma-separated subset of ensemble,ensemble-sampled,contrastive,three")
    ap.add_argument("--pack", action="store_true", help="pre-pack every model's linear weights for oneDNN first "
                                                          "(mmspec.cpu_packing; all methods gain)")
    a = ap.parse_args(argv)
    load_before = begin(2)
    from mmspec import collaborative as co
    from mmspec.pretrained import chat_inputs
    from mmspec.zoo.smollm2 import load_smollm2_domain

    general, tok, eos = chat_model()
    wanted = [c.strip() for c in a.configs.split(",") if c.strip()]
    code = load_smollm2_domain("code")
    german = load_smollm2_domain("german") if "three" in wanted else None
    if a.pack:
        from mmspec.cpu_packing import pack_linear_weights

        for model in (general, code, german):
            if model is not None:
                pack_linear_weights(model)
    alt2 = co.AlternateProposals(tuple(int(x) for x in a.alt_gamma.split(",")))
    alt3 = co.AlternateProposals(tuple(int(x) for x in a.alt_gamma3.split(",")))
    configs = {
        "ensemble": dict(models=[general, code], combine=co.WeightedEnsemble((0.5, 0.5)), temperature=0.0,
                         label="general + code, ensemble 0.5/0.5, greedy", alt=alt2),
        "ensemble-sampled": dict(models=[general, code], combine=co.WeightedEnsemble((0.5, 0.5)),
                                 temperature=a.temperature, label=f"general + code, ensemble 0.5/0.5, T={a.temperature:g}",
                                 alt=alt2),
        "contrastive": dict(models=[code, general], combine=co.ContrastiveDecoding(alpha=0.1, plausibility=0.1),
                            temperature=0.0, label="code − 0.1 × general, contrastive (β = 0.1), greedy", alt=alt2),
        "three": dict(models=[general, code, german], combine=co.WeightedEnsemble.uniform(3), temperature=0.0,
                      label="general + code + german, ensemble 1/3 each, greedy", alt=alt3),
    }
    configs = {k: v for k, v in configs.items() if k in wanted}
    methods = {"standard": lambda cfg: None, "fixed": lambda cfg: co.FixedProposer(0, a.fixed_gamma),
               "alternate": lambda cfg: cfg["alt"]}

    def method(c: str, m: str):
        cfg = configs[c]
        return Fresh(lambda: methods[m](cfg), lambda enc, seed, proposal: co.generate(
            cfg["models"], enc["input_ids"], attention_mask=enc["attention_mask"], combine=cfg["combine"],
            proposal=proposal, max_new_tokens=a.max_new_tokens, temperature=cfg["temperature"], seed=seed,
            eos_token_id=eos))

    encs = [chat_inputs(tok, [prompt]) for prompt in PROMPTS[: a.prompts]]
    runs = interleave({f"{c} / {m}": method(c, m) for c in configs for m in methods}, encs, label="collaborative")
    acc, outputs = {}, {}
    for c, cfg in configs.items():
        for m in methods:
            calls = runs.of(f"{c} / {m}")
            st = pool_stats(call.result.stats for call in calls)
            seconds = runs.total(f"{c} / {m}")
            acc[(c, m)] = dict(time=seconds, tokens=st.emitted_tokens, steps=st.row_steps,
                               accepted=st.accepted_tokens, drafted=st.drafted_tokens,
                               # model forwards without the prefills
                               calls=sum(sum(call.result.stats.extra["calls_per_model"]) - len(cfg["models"])
                                         for call in calls),
                               verify=st.target_time, draft=st.drafter_time,
                               rest=seconds - st.target_time - st.drafter_time)
            outputs[(c, m)] = [call.result.sequences[0, encs[call.index]["input_ids"].shape[1]:].tolist()
                               for call in calls]
    lines, plot_rows, identical_all = [], [], True
    for c, cfg in configs.items():
        base = acc[(c, "standard")]
        for m in methods:
            r = acc[(c, m)]
            same = "–" if cfg["temperature"] else str(outputs[(c, m)] == outputs[(c, "standard")])
            identical_all &= same != "False"
            speed = base["time"] / r["time"] * r["tokens"] / max(base["tokens"], 1)  # tokens/s ratio
            gam = {"standard": "–", "fixed": f"model 0, γ={a.fixed_gamma}",
                   "alternate": "γ=" + "/".join(str(g) for g in cfg["alt"].num_draft_tokens)}[m]
            acc_rate = f"{r['accepted'] / r['drafted']:.2f}" if r["drafted"] else "–"
            fpt = r["calls"] / max(r["tokens"], 1)
            ceiling = (base["calls"] / max(base["tokens"], 1)) / fpt  # speedup if every forward cost the same
            split = "/".join(f"{1000 * r[k] / max(r['tokens'], 1):.0f}" for k in ("verify", "draft", "rest"))
            lines.append([cfg["label"], f"{m} ({gam})", f"x{speed:.2f}", f"{r['tokens'] / r['time']:.1f}", acc_rate,
                          f"{r['tokens'] / max(r['steps'], 1):.2f}", f"{fpt:.2f}", f"x{ceiling:.2f}", split, same])
            if m != "standard":
                plot_rows.append((cfg["label"].split(",")[0] + ("" if not cfg["temperature"] else " (sampled)")
                                  + (" CD" if "contrastive" in cfg["label"] else ""), m, speed))
    text = "\n".join([
        a.section, "",
        f"{provenance('collaborative', argv, load_before)} {a.prompts} chat prompts about Python × "
        f"{a.max_new_tokens} new tokens, batch 1, EOS on. Models: SmolLM2-135M-Instruct (general) and SmolLM2 with "
        f"the shipped LoRA adapters for Python code and German (merged; the same size and cost as SmolLM2)"
        f"{'; linear weights pre-packed' if a.pack else ''}. Speedup: tokens/s over "
        f"standard collaborative decoding of the same combination, measured in one interleaved run.", "",
        *md_table(["combination", "method", "speedup", "tok/s", "accept", "tokens/step", "forwards/token",
                   "forward ceiling", "ms/token verify/draft/rest", "identical (greedy)"], lines), "",
        "forward ceiling: the speedup if every model forward cost the same and nothing else took time (standard "
        "forwards per token / this row's). ms/token: the verification step's forwards (all scoring models; standard: "
        "every forward), the proposals (drafting forwards of the proposer, cache lookups), and the rest (prefill, "
        "combination, verification, bookkeeping).", ""])
    report(text, a.out, a.section)
    if a.plots is not None:
        plot_speedups(plot_rows, a.plots / "collaborative_speedup.png")
    return 0 if identical_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
