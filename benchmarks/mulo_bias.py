"""Where MuLo-SD's distribution shift comes from (issue 29): each stage measured on its own against plain AR.

Run from the repository root::

    python -m benchmarks.mulo_bias --out benchmarks/RESULTS.md

Every row is 4 held-out prompts × 32 images (zoo image models, the zoo's sampling), compared with plain AR's
images of the same prompts by every attribute of the scene world (:mod:`mmspec.zoo.distribution`: a two-sample
test stratified by prompt; "within" = no attribute rejects at p < 0.01):

* the drafter alone: the 8 × 8 low-res model sampled by itself, decoded at low resolution; then the same tokens
  through the learned up-sampler U_r, decoded at full resolution (U_r's own shift);
* the paper's test (pooled mass over 2 neighbours >= 0.95) with local redraws (the old default);
* every token redrawn (τ > 1): the island machinery alone;
* the bounded test at δ = 0 with local redraws: the pooled test replaced by one that is exact per token given
  its context, but tokens outside a rejection's radius kept, as the paper does;
* the bounded test at δ = 0 (and δ = 0.3) with chain-rule redraws (the new default): nothing after a rejection
  is kept.
"""

from __future__ import annotations

import sys

import torch

from ._harness import arg_parser, begin, md_table, provenance, report

SECTION = "## Image generation: where MuLo-SD's shift comes from (issue 29)"


def main(argv: list[str] | None = None) -> int:
    import mmspec.image_gen as ig
    from mmspec.zoo import image_neighbours, load_default_image_models
    from mmspec.zoo.distribution import Comparison, compare, distribution_prompts, generate_sample, sample
    from mmspec.zoo.evaluate import IMAGE_SAMPLING

    ap = arg_parser("mulo_bias", __doc__, prompts=4, section=SECTION, quick={"prompts": 2, "images": 4})
    ap.add_argument("--images", type=int, default=32, help="images per prompt and row")
    args = ap.parse_args(argv)
    load_before = begin(2)
    m = load_default_image_models()
    prompts = distribution_prompts(args.prompts)
    n, vocab = args.images, m.tokenizer.vocab_size
    ref = generate_sample(m, prompts, n, method="ar")
    rows = []

    def row(name: str, s, note: str = "") -> None:
        fwd = f"{s.target_forwards / s.size:.1f}" if s.target_forwards else "–"
        rows.append([name, *compare(ref, s, vocab=vocab).table_cells(), fwd, note])

    row("plain AR, other seeds (floor)", generate_sample(m, prompts, n, seed_offset=50_000, method="ar"))
    # the drafter alone, before and after the up-sampler
    low_tok = m.tokenizer.resized(m.tokenizer.image_size // (m.target.config.grid_size // m.lowres.config.grid_size))
    lo_images, up_images, conds, lo_tokens, up_tokens = [], [], [], [], []
    for p in prompts:
        out = ig.generate(m.lowres, None, condition=[p] * n, seed=list(range(50_000, 50_000 + n)), method="ar",
                          **IMAGE_SAMPLING)
        up = m.resampler.upsample(out.tokens)
        lo_images += low_tok.decode(out.tokens)
        up_images += m.tokenizer.decode(up)
        lo_tokens.append(out.tokens)
        up_tokens.append(up)
        conds += [p] * n
    lo = sample([im.resize((m.tokenizer.image_size,) * 2, 0) for im in lo_images], conds, None, m.classifier)
    row("the low-res drafter alone (decoded at low resolution)", lo, "codebook TV n/a (another grid)")
    up = sample(up_images, conds, torch.cat(up_tokens), m.classifier)
    row("the low-res drafter alone, through the learned U_r", up)
    mulo = dict(method="mulo", drafter=m.lowres, mulo_resampler=m.resampler)
    t2, t8 = image_neighbours(m, 2), image_neighbours(m, 8)
    for name, kw in [
        ("MuLo-SD, the paper's test τ 0.95 / 2 nbrs, local redraws (the old default)",
         dict(neighbours=t2, mulo_tau=0.95, mulo_redraw="local")),
        ("MuLo-SD, every draft rejected (τ 1.1): the island redraws alone", dict(neighbours=t2, mulo_tau=1.1,
                                                                                 mulo_redraw="local")),
        ("MuLo-SD, bounded test δ 0, local redraws", dict(neighbours=t8, mulo_delta=0.0, mulo_redraw="local")),
        ("MuLo-SD, bounded test δ 0, chain redraws (the new default)", dict(neighbours=t8, mulo_delta=0.0,
                                                                            mulo_redraw="rest")),
        ("MuLo-SD, bounded test δ 0.3, chain redraws", dict(neighbours=t8, mulo_delta=0.3, mulo_redraw="rest")),
    ]:
        row(name, generate_sample(m, prompts, n, seed_offset=50_000, **mulo, **kw))
    text = "\n".join([
        args.section, "",
        f"{provenance('mulo_bias', argv, load_before)} Zoo image models, CFG {IMAGE_SAMPLING['cfg_scale']}, "
        f"temperature {IMAGE_SAMPLING['temperature']}, top-k {IMAGE_SAMPLING['top_k']}; {args.prompts} held-out "
        f"prompts × {n} images per row against plain AR's (seeds 0 ...; every row seeds 50 000 ...). Cells: TV to "
        "plain AR (mean over prompts) and the stratified two-sample p-value. Target forwards: per image, batched "
        "calls of 32 images counted once.", "",
        *md_table(["row", *Comparison.TABLE_HEADERS, "target calls / image", "note"], rows), "",
    ]) + "\n"
    report(text, args.out, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
