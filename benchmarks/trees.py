"""Draft trees against chains with the same drafter, and MuLo-SD on the cached loop.

Run from the repository root::

    python -m benchmarks.trees --out benchmarks/RESULTS.md     # ~10 min on 2 cores
    python -m benchmarks.trees --quick                          # smoke run, writes nothing

Three pairs, each one interleaved run (every repeat runs every method once per prompt, the order
rotated per round), greedy unless said otherwise:

* text: the trained byte-level Llama pair of ``benchmarks.text`` (target 4 × 256, drafter 1 × 128);
* VLM: the zoo LLaVA pair, the drafter seeing 25 % of the visual tokens (verifier-guided pruning);
* image: the zoo AR image target and drafter (exact SD, the zoo's evaluated sampling: CFG 1.5,
  T = 1, top-k 16), plus MuLo-SD (low-resolution drafter, τ = 0.3, l = 1) on the cached loop.

Glossary:
    chain       k drafted tokens in a row (the drafter's top choice at temperature 0)
    static      Medusa-style tree: ``branching[d]`` top-k children per node at depth d + 1
    dynamic     EAGLE-2 tree: expand the top_k frontier by path log-probability, keep the best nodes
    tau         tokens emitted per verification step (per row)
    fwd/seq     target forwards per sequence (verification steps; for MuLo-SD also the batched
                island-resampling forwards), the prefill excluded
    speedup     wall-clock ratio to the method's baseline in the same interleaved run (plain AR of the
                same target through the same loop; for trees also against the chain)
"""

from __future__ import annotations

import time

import mmspec
from mmspec.drafters.tree import DynamicTree, StaticTree

from ._harness import arg_parser, begin, interleave, md_table, provenance, report

HEADING = "## Draft trees vs chains, and MuLo-SD on the cached loop (issue 12)"


def run_interleaved(methods: dict, prompts: list, repeats: int) -> dict:
    """name -> dict(seconds, stats list, outputs list): one interleaved run (``benchmarks._harness``), every
    method ``fn(prompt) -> (output, stats)``."""
    runs = interleave({n: (lambda p, seed, f=f: f(p)) for n, f in methods.items()}, prompts, repeats=repeats,
                      label="trees")
    return {n: {"seconds": runs.total(n), "stats": [st for _, st in runs.results(n)],
                "outputs": [out for out, _ in runs.results(n)]} for n in methods}


def summarise(res: dict, base: str, chain: str | None, tokens_of) -> list[list[str]]:
    rows = []
    ref = res[base]["outputs"]
    for n, r in res.items():
        stats = r["stats"]
        steps = sum(s.row_steps for s in stats)
        emitted = sum(s.emitted_tokens for s in stats)
        fwd = sum(tokens_of(s) for s in stats) / max(len(stats), 1)
        tau = emitted / steps if steps else 0.0
        same = "yes" if r["outputs"] == ref else "no"
        n_steps = sum(s.steps for s in stats) or 1
        target_ms = 1000 * sum(s.target_time for s in stats) / n_steps
        drafter_ms = 1000 * sum(s.drafter_time - s.drafter_prefill_time for s in stats) / n_steps
        row = [n, f"{tau:.2f}", f"{fwd:.1f}", f"{target_ms:.1f}", f"{drafter_ms:.1f}",
               f"x{res[base]['seconds'] / r['seconds']:.2f}",
               "–" if chain is None or n == base else f"x{res[chain]['seconds'] / r['seconds']:.2f}", same]
        rows.append(row)
    return rows


def text_part(args) -> str:
    from ._text_models import load_or_train

    target, drafter, prompts = load_or_train(quick=args.quick)
    prompts = prompts[: args.prompts]
    n = args.max_new_tokens

    def via(d, **kw):
        def run(p):
            out = mmspec.generate(target, p.unsqueeze(0), drafter=d, max_new_tokens=n, eos_token_id=[], **kw)
            return out.sequences[0, -n:].tolist(), out.stats
        return run

    methods = {
        "plain AR (same loop, no drafter)": via(None),
        f"chain k={args.k}": via(drafter, num_draft_tokens=args.k),
        "static tree (3, 2, 2, 1)": via(mmspec.TreeDrafter(drafter, StaticTree((3, 2, 2, 1)))),
        "dynamic tree (depth 5, top-4, 16 nodes)": via(mmspec.TreeDrafter(drafter, DynamicTree(5, 4, 16))),
    }
    res = run_interleaved(methods, prompts, args.repeats)
    rows = summarise(res, "plain AR (same loop, no drafter)", f"chain k={args.k}", lambda s: s.steps)
    return (f"### Text: byte-level pair of `benchmarks.text`, {len(prompts)} prompts × {n} tokens, greedy, "
            f"{args.repeats} interleaved repeats\n\n" + "\n".join(md_table(HEAD, rows)))


def vlm_part(args) -> str:
    import mmspec.vision as mv

    from .vlm import zoo_setup

    target, drafter, prompts, _, eos = zoo_setup(args.prompts)
    n = args.max_new_tokens

    def via(tree=None, k=None, plain=False):
        def run(inp):
            if plain:
                out = mv.generate(target, mmspec.drafters.base.NoDrafter(), inp, max_new_tokens=n, eos_token_id=eos)
            else:
                out = mv.generate(target, drafter, inp, pruning="verifier", keep_ratio=0.25, max_new_tokens=n,
                                  num_draft_tokens=k or args.k, tree=tree, eos_token_id=eos)
            return out.sequences[0, inp["input_ids"].shape[1]:].tolist(), out.stats
        return run

    methods = {
        "plain AR (same loop, no drafter)": via(plain=True),
        f"chain k={args.k}, verifier keep 0.25": via(),
        "static tree (3, 2, 2, 1), verifier keep 0.25": via(tree=StaticTree((3, 2, 2, 1))),
        "dynamic tree (depth 5, top-4, 16 nodes), keep 0.25": via(tree=DynamicTree(5, 4, 16)),
    }
    res = run_interleaved(methods, prompts, args.repeats)
    rows = summarise(res, "plain AR (same loop, no drafter)", f"chain k={args.k}, verifier keep 0.25",
                     lambda s: s.steps)
    return (f"### VLM: zoo LLaVA pair, {len(prompts)} held-out scene captions (≤ {n} tokens, EOS), greedy, "
            f"{args.repeats} interleaved repeats\n\n" + "\n".join(md_table(HEAD, rows)))


def image_part(args) -> str:
    import mmspec.image_gen as ig

    from mmspec.zoo import load_default_image_models
    from mmspec.zoo.data import heldout_scenes
    from mmspec.zoo.evaluate import IMAGE_SAMPLING

    models = load_default_image_models()
    prompts = [(s.caption(), 1000 + i) for i, s in enumerate(heldout_scenes()[: args.prompts])]

    def via(method, **kw):
        def run(p):
            prompt, seed = p
            out = ig.generate(models.target, models.tokenizer, condition=[prompt] * args.images, method=method,
                              seed=[seed + j for j in range(args.images)], **IMAGE_SAMPLING, **kw)
            return out.tokens.tolist(), out.stats
        return run

    d = models.drafter
    methods = {
        "plain AR (same loop, no drafter)": via("ar"),
        f"exact SD, chain k={args.k}": via("exact", drafter=d, num_draft_tokens=args.k),
        "exact SD, static tree (3, 2, 2, 1)": via("exact", drafter=ig.ARDrafter(d, tree=StaticTree((3, 2, 2, 1)))),
        "exact SD, dynamic tree (depth 5, top-4, 16)": via("exact", drafter=ig.ARDrafter(d, tree=DynamicTree(5, 4, 16))),
        "MuLo-SD τ=0.3, l=1 (cached loop)": via("mulo", drafter=models.lowres, mulo_tau=0.3, mulo_l=1,
                                                 mulo_redraw="local"),
    }
    res = run_interleaved(methods, prompts, args.repeats)

    rows = summarise(res, "plain AR (same loop, no drafter)", f"exact SD, chain k={args.k}",
                     lambda s: s.target_forwards_per_image)
    for r in rows:  # sampled: identity to AR is not expected
        r[-1] = "n/a (sampled)"
    return (f"### Image: zoo AR models, {len(prompts)} held-out prompts × {args.images} images, CFG 1.5, T=1, "
            f"top-k 16, {args.repeats} interleaved repeats (fwd/seq here: target forwards each image took part "
            f"in, prefill and MuLo-SD's resampling forwards included)\n\n" + "\n".join(md_table(HEAD, rows)))


HEAD = ["method", "τ", "fwd/seq", "target ms/step", "drafter ms/step", "speedup vs AR", "speedup vs chain",
        "identical to AR"]


def main(argv: list[str] | None = None) -> int:
    ap = arg_parser("trees", __doc__, prompts=4, max_new_tokens=64,
                    quick={"prompts": 1, "repeats": 1, "max_new_tokens": 16, "images": 1})
    ap.add_argument("--only", default="text,vlm,image", help="comma-separated pairs: text, vlm, image")
    ap.add_argument("--k", type=int, default=4, help="draft length of the chains")
    ap.add_argument("--images", type=int, default=2, help="images per prompt (image pair)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    load_before = begin(args.threads)
    parts = [p.strip() for p in args.only.split(",")]
    sections = []
    t0 = time.perf_counter()
    if "text" in parts:  # may train the byte-level pair first (outside no_grad)
        sections.append(text_part(args))
    if "vlm" in parts:
        sections.append(vlm_part(args))
    if "image" in parts:
        sections.append(image_part(args))
    head = (f"{HEADING}\n\n- {provenance('trees', argv, load_before)} ({time.perf_counter() - t0:.0f} s)\n"
            f"- columns: τ = tokens "
            f"emitted per verification step; fwd/seq = target verification forwards per sequence; target / "
            f"drafter ms/step = the loop's time split per verification step (target: the verification forward, "
            f"for trees with the tree verification; drafter: proposing and observing, its prefill excluded); "
            f"speedups are wall-clock ratios in the same interleaved run\n\n")
    text = head + "\n\n".join(sections) + "\n"  # hand-written notes after <!-- notes --> in the file are kept
    report(text, args.out, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
