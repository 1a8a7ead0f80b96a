"""Image-generation benchmark: plain AR vs exact SD, SJD, LANTERN, LANTERN++ and MuLo-SD, one interleaved run.

Run from the repository root::

    python -m benchmarks.image_gen                  # the zoo models (full run)
    python -m benchmarks.image_gen --quick          # smoke run
    python -m benchmarks.image_gen --out benchmarks/RESULTS.md --plots benchmarks

Models: the zoo's text-conditioned AR target over a 16x16 token grid (codebook 256), its AR drafter
(exact SD, LANTERN, LANTERN++), its 8x8 low-resolution model (MuLo-SD's drafter) and the scene
classifier (Fréchet distance), prompted with captions of held-out scenes.  ``--synthetic`` uses
instead a random class-conditional pair with controlled agreement (later layers damped by ``--damp``).

Glossary:
    images/s      images generated per second (median over repeats)
    fwd/image     target forward passes per image (AR: H*W; fewer is the point of SD)
    tau           tokens emitted per target forward per image
    faithful      fraction of images whose parsed scene has exactly the prompt's objects (zoo only)
    FD to AR      Fréchet distance between the method's images and plain AR's images of the same
                  prompts in the scene classifier's features (zoo only; the "plain AR, other seed" row
                  is the noise floor of two lossless samples)
    TV to AR      total-variation distance between codebook-usage histograms (same noise-floor row)
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

from ._report import pool_accepted_lengths, write_section

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


def zoo_setup(num_prompts: int):
    from mmspec.zoo import load_default_image_models
    from mmspec.zoo.data import heldout_scenes

    models = load_default_image_models()
    prompts = [sc.caption() for sc in heldout_scenes()[:num_prompts]]
    return models, prompts


def main(argv: list[str] | None = None) -> int:
    import mmspec.image_gen as ig
    from mmspec.image_gen.neighbours import build_latent_neighbours

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", action="store_true", help="random class-conditional models instead of the zoo")
    ap.add_argument("--grid", type=int, default=16, help="--synthetic only")
    ap.add_argument("--codebook", type=int, default=256, help="--synthetic only")
    ap.add_argument("--layers", type=int, default=6, help="--synthetic only")
    ap.add_argument("--hidden", type=int, default=256, help="--synthetic only")
    ap.add_argument("--damp", type=float, default=0.3, help="--synthetic only")
    ap.add_argument("--images", type=int, default=16, help="images per call (one batch; one per prompt)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the zoo's sampling (1.5)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the zoo's sampling (1.0)")
    ap.add_argument("--top-k", type=int, default=None, help="default: the zoo's sampling (16)")
    ap.add_argument("--k", type=int, default=8, help="draft length of exact SD / LANTERN / LANTERN++")
    ap.add_argument("--sjd-window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mulo", action="store_true", help="skip the (slow, cache-free) MuLo-SD row")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plots", type=Path, default=None, help="directory for the speed-quality and histogram PNGs")
    args = ap.parse_args(argv)
    from mmspec.zoo.evaluate import IMAGE_SAMPLING

    sampling = dict(IMAGE_SAMPLING)
    for key, val in (("cfg_scale", args.cfg_scale), ("temperature", args.temperature), ("top_k", args.top_k)):
        if val is not None:
            sampling[key] = val
    if args.quick:
        args.grid, args.codebook, args.layers, args.hidden, args.images, args.repeats = 8, 64, 2, 64, 2, 1
    torch.set_num_threads(2)
    classifier = None
    if args.synthetic:
        target, drafter = build_pair(args.grid, args.codebook, args.layers, args.hidden, args.damp)
        tokenizer = ig.tiny_vq_tokenizer(image_size=4 * args.grid, num_vq_embeddings=args.codebook)
        low = build_low_res(target)
        conditions = [i % target.config.num_classes for i in range(args.images)]
        what = (f"synthetic class-conditional AR model, {args.grid}x{args.grid} tokens, codebook {args.codebook}, "
                f"{args.layers} layers x {args.hidden} (damp {args.damp}); drafter = its first layer")
    else:
        models, conditions = zoo_setup(args.images)
        target, drafter, low, tokenizer, classifier = (models.target, models.drafter, models.lowres,
                                                       models.tokenizer, models.classifier)
        cfg_t, cfg_d = target.config, drafter.config
        what = (f"zoo text-conditioned AR target ({cfg_t.num_layers} layers x {cfg_t.hidden_size}), drafter "
                f"({cfg_d.num_layers} x {cfg_d.hidden_size}), low-res {low.config.grid_size}x{low.config.grid_size} "
                f"model; {cfg_t.grid_size}x{cfg_t.grid_size} tokens, codebook {cfg_t.codebook_size}; prompts = "
                f"captions of {len(conditions)} held-out scenes")
    codebook = tokenizer.vocab_size
    table = build_latent_neighbours(tokenizer.codebook, 8)
    methods = {
        "plain AR": dict(method="ar"),
        "plain AR, other seed (noise floor)": dict(method="ar", seed_offset=10_000),
        f"exact SD (drafter, k={args.k})": dict(method="exact", drafter=drafter, num_draft_tokens=args.k),
        f"SJD (window {args.sjd_window})": dict(method="sjd", num_draft_tokens=args.sjd_window),
    }
    for delta in (0.05, 0.1, 0.2):
        methods[f"LANTERN δ={delta} (k=8 neighbours)"] = dict(method="lantern", drafter=drafter, num_draft_tokens=args.k,
                                                              neighbours=table, lantern_delta=delta)
    methods["LANTERN++ λ=2 (k=8 neighbours)"] = dict(method="lantern++", drafter=drafter, num_draft_tokens=args.k,
                                                     neighbours=table, lantern_lambda=2.0)
    if not args.no_mulo:
        methods["MuLo-SD τ=0.3, l=1, scale 2 (reference loop)"] = dict(method="mulo", drafter=low, neighbours=table,
                                                                      mulo_tau=0.3, mulo_l=1)
    names = list(methods)
    times = {n: [] for n in names}
    stats = {n: [] for n in names}
    images = {n: [] for n in names}
    hist = {n: torch.zeros(codebook) for n in names}

    def run(n, seed):
        kw = dict(methods[n])
        off = kw.pop("seed_offset", 0)
        return ig.generate(target, tokenizer, condition=conditions, generator=torch.Generator().manual_seed(seed + off),
                           **sampling, **kw)

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
                images[n].extend(out.images)
                hist[n] += torch.bincount(out.tokens.flatten(), minlength=codebook).float()
    ar = names[0]
    prompts_all = [c for _ in range(args.repeats) for c in conditions]
    feats = {}
    if classifier is not None:
        from mmspec.zoo.quality import images_to_tensor

        with torch.no_grad():
            feats = {n: classifier.features(images_to_tensor(images[n])) for n in names}
    rows, summary = [], {}
    for n in names:
        ips = [len(conditions) / t for t in times[n]]
        speed = statistics.median(a / t for t, a in zip(times[n], times[ar]))
        st = stats[n]
        fwd = statistics.mean(s.target_forwards_per_image for s in st)
        tau = statistics.mean(s.tokens_per_forward for s in st)
        plain = methods[n]["method"] == "ar"
        alpha = statistics.mean(s.acceptance_rate for s in st) if not plain else float("nan")
        tv = 0.5 * (hist[n] / hist[n].sum() - hist[ar] / hist[ar].sum()).abs().sum().item()
        faithful = fd = None
        if classifier is not None:
            from mmspec.zoo.quality import frechet_distance, prompt_faithfulness

            faithful = prompt_faithfulness(images[n], prompts_all)
            fd = frechet_distance(feats[n], feats[ar]) if n != ar else None
        counts = pool_accepted_lengths(st)
        summary[n] = dict(speedup=speed, fwd=fwd, tau=tau, faithful=faithful, fd=fd, tv=tv, counts=counts,
                          method=methods[n]["method"])
        rows.append(f"| {n} | {statistics.median(ips):.2f} | x{speed:.2f} | {fwd:.1f} | {tau:.2f} | "
                    f"{'–' if plain else f'{alpha:.2f}'} | {'–' if faithful is None else f'{faithful:.2f}'} | "
                    f"{'–' if fd is None else f'{fd:.3f}'} | {'–' if n == ar else f'{tv:.3f}'} |")
    cmd = "python -m benchmarks.image_gen " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = [
        SECTION, "",
        f"Command: `{cmd.strip()}` — {_dt.date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}. {what}; {len(conditions)} images per call; CFG {sampling['cfg_scale']}; "
        f"temperature {sampling['temperature']}, top-k {sampling['top_k']}; median of {args.repeats} interleaved "
        "repeats (quality columns pool the images of all repeats). AR, exact SD and SJD are lossless; LANTERN, "
        "LANTERN++ and MuLo-SD are relaxed (latent neighbours: 8 nearest codebook entries).", "",
        "| method | images/s | speedup vs AR | target fwd/image | tau (tokens/fwd) | alpha | faithful | FD to AR | "
        "TV to AR (codebook usage) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out is not None:
        write_section(args.out, SECTION, text)
    if args.plots is not None:
        from ._plots import plot_accept_histogram, plot_speed_quality

        args.plots.mkdir(parents=True, exist_ok=True)
        plot_speed_quality(summary, args.plots / "image_speed_quality.png")
        plot_accept_histogram({n: v["counts"] for n, v in summary.items() if v["method"] != "ar"},
                              args.plots / "acceptance_histogram.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
