"""Image-generation benchmark: plain AR vs exact speculative decoding vs SJD, one interleaved run.

Run from the repository root::

    python -m benchmarks.image_gen                  # full run
    python -m benchmarks.image_gen --quick          # smoke run
    python -m benchmarks.image_gen --out benchmarks/RESULTS.md

Models: a class-conditional :class:`~mmspec.image_gen.ARImageModel` over a 16x16 token grid
(codebook 256) and, for exact SD, a drafter made of its first decoder layer. No trained image
models exist yet (issue P5 trains them), so the pair is synthetic with controlled agreement: the
target's later layers have their output projections scaled by ``--damp``. Acceptance therefore
reflects that construction, not a trained drafter; the cost side (target forwards per image,
overhead) is what carries over.

Glossary:
    images/s      images generated per second (median over repeats)
    fwd/image     target forward passes per image (AR: H*W; fewer is the point of SD)
    tau           tokens emitted per target forward per image
    TV to AR      quality figure: total-variation distance between the method's codebook-usage histogram
                  and plain AR's over the images of the run (lossless methods only show sampling
                  noise; the "plain AR, other seed" row is that noise floor); prompt faithfulness comes
                  with the trained models of issue P5
    MuLo-SD       runs a cache-free reference loop (full forwards with attention holes), so its wall time
                  is not comparable; its target-forward count is
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ._report import write_section

SECTION = "## Image generation (issue: image generation)"


def build_pair(grid: int, codebook: int, layers: int, hidden: int, damp: float, seed: int = 0):
    from mmspec.image_gen import ARImageConfig, ARImageModel

    torch.manual_seed(seed)
    cfg = ARImageConfig(codebook_size=codebook, grid_size=grid, num_classes=10, hidden_size=hidden,
                        num_layers=layers, num_heads=4, num_kv_heads=2, intermediate_size=2 * hidden, init_range=0.1)
    target = ARImageModel(cfg).eval()
    with torch.no_grad():
        for layer in target.backbone.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    drafter = ARImageModel(dataclasses.replace(cfg, num_layers=1))
    drafter.load_state_dict({k: v for k, v in target.state_dict().items()
                             if ".layers." not in k or ".layers.0." in k})
    return target, drafter.eval()


def build_low_res(target, seed: int = 1):
    """A 1/2-resolution model of the same kind (same codebook and classes) for MuLo-SD's drafter."""
    from mmspec.image_gen import ARImageModel

    torch.manual_seed(seed)
    cfg = dataclasses.replace(target.config, grid_size=target.config.grid_size // 2, num_layers=1)
    return ARImageModel(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    import mmspec.image_gen as ig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--damp", type=float, default=0.3)
    ap.add_argument("--images", type=int, default=4, help="images per call (one batch)")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--sjd-window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mulo", action="store_true", help="skip the (slow, cache-free) MuLo-SD row")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.grid, args.codebook, args.layers, args.hidden, args.images, args.repeats = 8, 64, 2, 64, 2, 1
    torch.set_num_threads(2)
    target, drafter = build_pair(args.grid, args.codebook, args.layers, args.hidden, args.damp)
    common = dict(condition=list(range(args.images)), cfg_scale=args.cfg_scale, temperature=args.temperature,
                  top_k=args.top_k)
    from mmspec.image_gen import tiny_vq_tokenizer
    from mmspec.image_gen.neighbours import build_latent_neighbours

    tokenizer = tiny_vq_tokenizer(image_size=4 * args.grid, num_vq_embeddings=args.codebook)
    table = build_latent_neighbours(tokenizer.codebook, 8)
    low = build_low_res(target)
    methods = {
        "plain AR": dict(method="ar"),
        "plain AR, other seed (noise floor)": dict(method="ar", seed_offset=10_000),
        f"exact SD (1-layer drafter, k={args.k})": dict(method="exact", drafter=drafter, num_draft_tokens=args.k),
        f"SJD (window {args.sjd_window})": dict(method="sjd", num_draft_tokens=args.sjd_window),
    }
    for delta in (0.05, 0.1, 0.2):
        methods[f"LANTERN δ={delta} (k=8)"] = dict(method="lantern", drafter=drafter, num_draft_tokens=args.k,
                                                  neighbours=table, lantern_delta=delta)
    methods["LANTERN++ λ=2 (k=8)"] = dict(method="lantern++", drafter=drafter, num_draft_tokens=args.k,
                                          neighbours=table, lantern_lambda=2.0)
    if not args.no_mulo:
        methods["MuLo-SD τ=0.3, l=1, scale 2 (reference loop)"] = dict(
            method="mulo", drafter=low, neighbours=table, mulo_tau=0.3, mulo_l=1, tokenizer=tokenizer)
    names = list(methods)
    times = {n: [] for n in names}
    stats = {n: [] for n in names}
    hist = {n: torch.zeros(args.codebook) for n in names}

    def run(n, seed):
        kw = dict(methods[n])
        off = kw.pop("seed_offset", 0)
        tok = kw.pop("tokenizer", None)
        return ig.generate(target, tok, generator=torch.Generator().manual_seed(seed + off), **common, **kw)

    with torch.no_grad():
        for n in names:  # warm-up
            run(n, 0)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            if r % 2:
                order.reverse()
            for n in order:
                t0 = time.perf_counter()
                out = run(n, 100 + r)
                times[n].append(time.perf_counter() - t0)
                stats[n].append(out.stats)
                hist[n] += torch.bincount(out.tokens.flatten(), minlength=args.codebook).float()
    ar = names[0]
    rows = []
    for n in names:
        ips = [args.images / t for t in times[n]]
        speed = statistics.median(a / t for t, a in zip(times[n], times[ar]))
        st = stats[n]
        fwd = statistics.mean(s.target_forwards_per_image for s in st)
        tau = statistics.mean(s.tokens_per_forward for s in st)
        plain = methods[n]["method"] == "ar"
        alpha = statistics.mean(s.acceptance_rate for s in st) if not plain else float("nan")
        tv = 0.5 * (hist[n] / hist[n].sum() - hist[ar] / hist[ar].sum()).abs().sum().item()
        rows.append(f"| {n} | {statistics.median(ips):.2f} | x{speed:.2f} | {fwd:.1f} | {tau:.2f} | "
                    f"{'–' if plain else f'{alpha:.2f}'} | {'–' if n == ar else f'{tv:.3f}'} |")
    cmd = "python -m benchmarks.image_gen " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = [
        SECTION, "",
        f"Command: `{cmd.strip()}` — {_dt.date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}. Class-conditional AR image model, {args.grid}x{args.grid} tokens, codebook "
        f"{args.codebook}, {args.layers} layers x {args.hidden} (synthetic, damp {args.damp}); {args.images} images per "
        f"call; CFG {args.cfg_scale}; temperature {args.temperature}, top-k {args.top_k}; median of {args.repeats} "
        "interleaved repeats. AR, exact SD and SJD are lossless; LANTERN, LANTERN++ and MuLo-SD are relaxed "
        "(their synthetic neighbour table comes from a random VQ codebook).", "",
        "| method | images/s | speedup vs AR | target fwd/image | tau (tokens/fwd) | alpha | TV to AR (codebook usage) |",
        "|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.out is not None:
        write_section(args.out, SECTION, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
