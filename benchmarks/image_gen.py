"""Image-generation benchmark: plain AR vs exact SD, SJD, GSD, LANTERN, LANTERN++ and MuLo-SD on the zoo models.

Run from the repository root::

    python -m benchmarks.image_gen                  # full run (about 25 min here)
    python -m benchmarks.image_gen --quick          # smoke run
    python -m benchmarks.image_gen --out benchmarks/RESULTS.md --plots benchmarks

Three parts, one after the other:

* **costs**: milliseconds of one cached forward of N tokens (batch 1 under CFG, i.e. two rows) for
  the target, the AR drafter and the low-res model, N = 1 .. 64; c = drafter / target at N = 1.
* **speed** (the paper's setting: batch 1): every method generates the same ``--speed-prompts``
  images one at a time, methods interleaved prompt by prompt in rotating order, ``--repeats`` times;
  the speedup is AR's total time over the method's, with target forwards per image, tokens per
  target forward (τ), acceptance and the time split (target forwards, drafting, verification and
  repair) per image.
* **quality**: ``--quality-images`` (≥ 128) held-out prompts per method, in batches (an image depends
  only on its prompt and its row seed, not on its batch); prompt faithfulness overall and by object
  count, Fréchet distance to plain AR's images of the same prompts in the scene classifier's
  features, and the total-variation distance of the codebook usage. The row "plain AR, other seeds"
  is the noise floor: two lossless samples of the same prompts.
* **distributions**: ``--dist-images`` images of each of ``--dist-prompts`` held-out prompts per method; each
  attribute the scene world has (background, object count, colour, shape, cell, size) against plain AR, with
  a two-sample test stratified by prompt, the AR-vs-AR floor, codebook TV, precision and recall
  (:mod:`mmspec.zoo.distribution`). A relaxed method is within the floor only if every attribute is.

Glossary:
    exact SD    the AR drafter (2 × 64) drafts k tokens; lossless rejection sampling
    EAGLE head  a one-layer EAGLE-3 feature head over the target's hidden states (both CFG halves) drafts
                instead of the AR drafter (LANTERN's and MuLo-SD's own baseline is EAGLE-2 on LlamaGen);
                "tree d/k/n": EAGLE-2's dynamic tree (depth d, top-k k, n nodes kept), lossless tree rule
    SJD         Speculative Jacobi Decoding: the target refines its own guesses (lossless)
    LANTERN     relaxed acceptance over the k nearest codebook entries of the drafted code, TV budget δ
    LANTERN++   the drafted code's probability raised by its neighbours' mass up to λ p(x)
    GSD         SJD's drafts accepted against a dynamic group of latent neighbours (grouped acceptance)
    MuLo-SD     the 8 × 8 low-res model (same architecture as the target) drafts whole low-res rows,
                U_r up-samples them to two high-res rows (learned token net, or decode -> resize ->
                re-encode); the bounded test (δ) with chain-rule redraws, or the paper's pooled test at τ
                with local island resampling (l = 1)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from mmspec.zoo.distribution import ALPHA

from ._harness import (arg_parser, begin, interleave, md_table, median_seconds, pool_accepted_lengths, provenance,
                       report, session_seconds)

SECTION = "## Image generation (issue: image generation)"

# the MuLo-SD paper's LlamaGen-XL rows (512 px, A100, batch 1; docs/design/mulo_sd.md §4)
PAPER_ROWS = [("EAGLE-2", "0.96×", "37.1", "56.2"), ("LANTERN", "1.59×", "36.3", "55.4"),
              ("MuLo-SD r=2", "1.40×", "36.1", "54.3")]


def _objects(prompt: str) -> int:
    return prompt.count(" and ") + 1


def build_methods(models, k: int, sjd_window: int, taus: tuple[float, ...] = (0.1, 0.3),
                  draft_lengths: tuple[int, ...] | None = None, deltas: tuple[float, ...] = (0.3,),
                  lambdas: tuple[float, ...] = (3.0,), mulo_deltas: tuple[float, ...] = (0.0,),
                  gsd_ks: tuple[int, ...] = (16,)) -> dict[str, dict]:
    from mmspec.zoo import image_neighbours

    table = image_neighbours(models, 8)  # 8 latent neighbours among the tokenizer's live codes
    drafters = {"drafter": models.drafter}
    if getattr(models, "head", None) is not None:
        drafters["EAGLE head"] = models.head
    methods = {"plain AR": dict(method="ar")}
    lengths = draft_lengths or (k, 2 * k)
    for name, d in drafters.items():
        for kk in lengths:
            methods[f"exact SD ({name}, k={kk})"] = dict(method="exact", drafter=d, num_draft_tokens=kk)
    if "EAGLE head" in drafters:  # EAGLE-2: a dynamic tree from the head, verified in one guided forward
        from mmspec.drafters.feature import FeatureDrafter
        from mmspec.drafters.tree import DynamicTree

        tree = DynamicTree(depth=6, top_k=4, num_nodes=24)
        methods[f"exact SD (EAGLE head, tree {tree.depth}/{tree.top_k}/{tree.num_nodes})"] = dict(
            method="exact", drafter=FeatureDrafter(drafters["EAGLE head"], tree=tree))
    methods[f"SJD (window {sjd_window})"] = dict(method="sjd", num_draft_tokens=sjd_window)
    for gk in gsd_ks:
        methods[f"GSD (window {sjd_window}, {gk} nbrs)"] = dict(method="gsd", num_draft_tokens=sjd_window,
                                                               neighbours=image_neighbours(models, gk))
    for name, d in drafters.items():
        tag = "" if name == "drafter" else f"{name}, "
        for kk in lengths:
            for delta in deltas:
                methods[f"LANTERN δ={delta} ({tag}k={kk})"] = dict(method="lantern", drafter=d, num_draft_tokens=kk,
                                                                  neighbours=table, lantern_delta=delta)
            for lam in lambdas:
                methods[f"LANTERN++ λ={lam:g} ({tag}k={kk})"] = dict(
                    method="lantern++", drafter=d, num_draft_tokens=kk, neighbours=table, lantern_lambda=lam)
    if models.resampler is not None:
        for d in mulo_deltas:  # the bounded test with chain-rule redraws (the method's default)
            methods[f"MuLo-SD δ={d:g}, chain redraws, learned U_r"] = dict(
                method="mulo", drafter=models.lowres, neighbours=table, mulo_delta=d, mulo_redraw="rest",
                mulo_resampler=models.resampler)
        for spec in taus:  # the paper's threshold test with local redraws: τ, or (τ, neighbours)
            tau, nk = spec if isinstance(spec, tuple) else (spec, 8)
            methods[f"MuLo-SD (paper) τ={tau}, {nk} nbrs, local redraws, learned U_r"] = dict(
                method="mulo", drafter=models.lowres, neighbours=table if nk == 8 else image_neighbours(models, nk),
                mulo_tau=tau, mulo_l=1, mulo_redraw="local", mulo_resampler=models.resampler)
    if taus:
        methods["MuLo-SD (paper) τ=0.3, local redraws, pixel U_r"] = dict(
            method="mulo", drafter=models.lowres, neighbours=table, mulo_tau=0.3, mulo_l=1, mulo_redraw="local")
    return methods


@torch.no_grad()
def measure_costs(models, widths: tuple[int, ...], repeats: int) -> list[str]:
    """ms of one cached forward of N tokens at batch 1 under CFG (two rows), after a 64-token context (32 for
    the 8 x 8 low-res model)."""
    from mmspec.guidance import Guidance, open_session

    rows = []
    cond = "a red circle at the top left"
    base = {}
    for name, model in (("target", models.target), ("drafter", models.drafter), ("low-res model", models.lowres)):
        ids = torch.tensor([model.prefix_ids(cond)])
        g = Guidance(uncond=[model.prefix_ids(cond, unconditional=True)], scale=1.5, schedule="constant",
                     num_tokens=model.config.num_image_tokens)
        session = open_session(model, ids, torch.ones_like(ids), guidance=g)
        ctx = min(64, model.config.num_image_tokens // 2)  # the low-res model has 64 tokens in all
        session.extend(torch.cat([ids[:, -1:], torch.zeros((1, ctx - 1), dtype=torch.long)], dim=1))
        ms = {}
        for w in widths:
            if ctx + w > model.config.num_image_tokens:
                continue
            ms[w] = 1000 * median_seconds(lambda: session.extend(torch.zeros((1, w), dtype=torch.long)), repeats,
                                          undo=lambda: session.rollback(torch.tensor([w])))
        base[name] = ms[1]
        cfg = model.config
        rows.append([f"{name} ({cfg.num_layers} × {cfg.hidden_size}, {cfg.grid_size}×{cfg.grid_size})",
                     *(f"{ms[w]:.1f}" if w in ms else "–" for w in widths), f"{ms[1] / base['target']:.2f}"])
    if getattr(models, "head", None) is not None:  # one head forward over both halves, as in drafting
        head, d = models.head, models.head.config.hidden_size
        ms = {w: 1000 * session_seconds(head, torch.zeros((2, 64), dtype=torch.long),
                                        torch.zeros((2, w), dtype=torch.long),
                                        features=(torch.zeros((2, 64, d)), torch.zeros((2, w, d))),
                                        num_logits=None, reps=repeats) for w in widths}
        rows.append([f"EAGLE head (1 layer × {d}, on the target's features)", *(f"{ms[w]:.1f}" for w in widths),
                     f"{ms[1] / base['target']:.2f}"])
    return md_table(["model", *(f"N={w}" for w in widths), "c (1-token forward / target's)"], rows)


@torch.no_grad()
def measure_resamplers(models, num_scenes: int) -> list[str]:
    """How often U_r / D_r give the tokens of the same held-out scene encoded at the other size (one FSQ
    pass each), and ms per 16 x 16 grid: the learned token nets against decode -> resize -> re-encode."""
    from mmspec.image_gen.token_resampler import PixelResampler, resize_images

    from mmspec.zoo.data import heldout_scenes, render_batch

    tok = models.tokenizer
    hi_tok, lo_tok = tok.resized(tok.image_size), tok.resized(tok.image_size // 2)
    x = render_batch(list(heldout_scenes(num_scenes)))
    hi, lo = hi_tok.encode(x), lo_tok.encode(resize_images(x, lo_tok.image_size))
    rows = []
    cands = [("decode → bicubic → re-encode", PixelResampler(tok, 2))]
    if models.resampler is not None:
        cands.insert(0, ("learned token nets", models.resampler))
    for name, r in cands:
        t0 = time.perf_counter()
        up, down = r.upsample(lo), r.downsample(hi)
        ms = 1000 * (time.perf_counter() - t0) / len(x)
        rows.append([name, f"{float((up == hi).float().mean()):.3f}", f"{float((down == lo).float().mean()):.3f}",
                     f"{ms:.1f}"])
    return md_table(["U_r / D_r", "up-sampled tokens = 64 px encoding", "down-sampled tokens = 32 px encoding",
                     "ms per grid (up + down)"], rows)


@torch.no_grad()
def measure_disagreements(models, table: torch.Tensor, num_prompts: int) -> list[str]:
    """Where a drafter's top token differs from the target's (teacher-forced on plain-AR samples of held-out
    prompts, conditional logits): is it a latent neighbour of the target's top token, and how much target mass
    do the drafted token and its neighbours hold? The EAGLE head is scored one step ahead of real features
    (the first token of a draft; later ones read its own hidden states)."""
    import mmspec.image_gen as ig

    from mmspec.zoo.data import heldout_scenes
    from mmspec.zoo.evaluate import IMAGE_SAMPLING

    prompts = [s.caption() for s in heldout_scenes(num_prompts)]
    out = ig.generate(models.target, models.tokenizer, condition=prompts, seed=list(range(num_prompts)), method="ar",
                      **IMAGE_SAMPLING)
    toks = out.tokens.flatten(1)
    n_img = toks.shape[1]

    def drafter_top(ids: torch.Tensor, p: int) -> torch.Tensor:  # [N] the AR drafter's top per image token
        return models.drafter(input_ids=ids, use_cache=False).logits[0, p - 1:].argmax(-1)

    def head_top(ids: torch.Tensor, p: int) -> torch.Tensor:  # pair t (feature t, token t+1) predicts token t+2
        head = models.head
        hs = models.target(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        feats = head.fuse(torch.cat([hs[i] for i in head.config.feature_layers], dim=-1))
        logits = head(ids[:, 1:], feats[:, :-1]).logits[0, p - 2: p - 2 + n_img]
        return head.d2t[logits.argmax(-1)]

    tops = {"AR drafter": drafter_top}
    if getattr(models, "head", None) is not None:
        tops["EAGLE head"] = head_top
    rows = []
    med = statistics.median
    for name, top in tops.items():
        mis = nbr = 0
        p_draft, p_top, pooled = [], [], []
        for b, prompt in enumerate(prompts):
            pre = models.target.prefix_ids(prompt)
            ids = torch.tensor([pre + toks[b, :-1].tolist()])
            pt = models.target(input_ids=ids, use_cache=False).logits[0, len(pre) - 1:].softmax(-1)  # [N, V]
            d = top(ids, len(pre))
            t = pt.argmax(-1)
            m = d != t
            mis += int(m.sum())
            nbr += int(((table[t] == d.unsqueeze(1)).any(1) & m).sum())
            p_draft += pt.gather(1, d.unsqueeze(1))[m, 0].tolist()
            p_top += pt.gather(1, t.unsqueeze(1))[m, 0].tolist()
            pooled += pt.gather(1, torch.cat([d.unsqueeze(1), table[d]], 1)).sum(1)[m].tolist()
        rows.append([name, toks.numel(), f"{mis} ({mis / toks.numel():.3f})", f"{nbr} ({nbr / max(mis, 1):.2f})",
                     *(f"{med(v):.3f}" if v else "–" for v in (p_draft, p_top, pooled))])
    return md_table(["drafter", "positions", "drafter top ≠ target top",
                     "…of which a latent neighbour of the target's top", "median p(drafted)", "median p(target's top)",
                     "median p(drafted + its 8 neighbours)"], rows)


def main(argv: list[str] | None = None) -> int:
    import mmspec.image_gen as ig

    from mmspec.zoo import image_neighbours, load_default_image_models
    from mmspec.zoo.data import heldout_scenes
    from mmspec.zoo.evaluate import IMAGE_SAMPLING
    from mmspec.zoo.quality import frechet_distance, images_to_tensor, prompt_faithfulness

    ap = arg_parser("image_gen", __doc__, section=SECTION, plots="the speed-quality and histogram PNGs",
                    quick={"speed_prompts": 1, "repeats": 1, "quality_images": 4, "quality_batch": 4,
                            "dist_prompts": 2, "dist_images": 4},
                    quick_also="smaller cost, resampler and disagreement measurements")
    ap.add_argument("--speed-prompts", type=int, default=8, help="images per method in the batch-1 speed run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the speed run")
    ap.add_argument("--quality-images", type=int, default=128, help="images per method for the quality columns")
    ap.add_argument("--quality-batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=4, help="draft length of exact SD / LANTERN / LANTERN++")
    ap.add_argument("--sjd-window", type=int, default=8)
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the matching methods")
    ap.add_argument("--mulo-taus", default="0.95/2",
                    help="comma-separated MuLo-SD rows (learned U_r): τ, or τ/k for k latent neighbours (default 8)")
    ap.add_argument("--draft-lengths", default=None, help="comma-separated k of the exact SD / LANTERN rows (default k, 2k)")
    ap.add_argument("--lantern-deltas", default="0.3", help="comma-separated δ of the LANTERN rows")
    ap.add_argument("--lantern-lambdas", default="3", help="comma-separated λ of the LANTERN++ rows")
    ap.add_argument("--mulo-deltas", default="0", help="comma-separated δ of the MuLo-SD rows with the bounded test")
    ap.add_argument("--gsd-ks", default="16", help="comma-separated latent-neighbour candidates of the GSD rows")
    ap.add_argument("--dist-prompts", type=int, default=4, help="held-out prompts of the attribute-distribution part")
    ap.add_argument("--dist-images", type=int, default=32, help="images per prompt and method in that part")
    args = ap.parse_args(argv)
    load_before = begin(2)
    sampling = dict(IMAGE_SAMPLING)
    models = load_default_image_models()
    taus = tuple((float(t.split("/")[0]), int(t.split("/")[1])) if "/" in t else float(t)
                 for t in args.mulo_taus.split(",") if t.strip())
    floats = lambda text: tuple(float(t) for t in text.split(",") if t.strip())  # noqa: E731
    lengths = tuple(int(t) for t in args.draft_lengths.split(",")) if args.draft_lengths else None
    methods = build_methods(models, args.k, args.sjd_window, taus, lengths, floats(args.lantern_deltas),
                            floats(args.lantern_lambdas), floats(args.mulo_deltas),
                            tuple(int(t) for t in args.gsd_ks.split(",") if t.strip()))
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        methods = {n: m for n, m in methods.items() if n == "plain AR" or any(s in n for s in keep)}
    names = list(methods)

    # -- costs -----------------------------------------------------------------------------------
    widths = (1, 2, 4, 8) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    cost_rows = measure_costs(models, widths, 3 if args.quick else 15)
    resampler_rows = measure_resamplers(models, 8 if args.quick else 256)
    disagreement_rows = measure_disagreements(models, image_neighbours(models, 8), 4 if args.quick else 32)

    # -- speed: batch 1, interleaved ------------------------------------------------------------------
    prompts = [s.caption() for s in heldout_scenes(max(args.speed_prompts, 1))[: args.speed_prompts]]

    def one(n: str):
        return lambda prompt, seed: ig.generate(models.target, models.tokenizer, condition=[prompt], seed=[seed],
                                                **sampling, **methods[n]).stats

    runs = interleave({n: one(n) for n in names}, prompts, repeats=args.repeats, label="image speed")
    times = {n: runs.total(n) for n in names}
    stats = {n: runs.results(n) for n in names}

    # -- quality: >= 128 images per method, batched -------------------------------------------------------
    q_prompts = [s.caption() for s in heldout_scenes(max(args.quality_images, 1))[: args.quality_images]]
    q_names = names[:1] + ["plain AR, other seeds"] + names[1:]
    images = {n: [] for n in q_names}
    hist = {n: torch.zeros(models.tokenizer.vocab_size) for n in q_names}
    for n in q_names:
        kw = methods["plain AR" if n == "plain AR, other seeds" else n]
        off = 50_000 if n == "plain AR, other seeds" else 0
        for s in range(0, len(q_prompts), args.quality_batch):
            batch = q_prompts[s: s + args.quality_batch]
            out = ig.generate(models.target, models.tokenizer, condition=batch,
                              seed=[off + 10_000 + s + j for j in range(len(batch))], **sampling, **kw)
            images[n] += out.images
            hist[n] += torch.bincount(out.tokens.flatten(), minlength=models.tokenizer.vocab_size).float()
    with torch.no_grad():
        feats = {n: models.classifier.features(images_to_tensor(images[n])) for n in q_names}
    by_count = {c: [i for i, p in enumerate(q_prompts) if _objects(p) == c] for c in (1, 2, 3)}

    def quality(n: str) -> dict:
        f = {c: prompt_faithfulness([images[n][i] for i in sel], [q_prompts[i] for i in sel])
             for c, sel in by_count.items() if sel}
        tv = 0.5 * (hist[n] / hist[n].sum() - hist["plain AR"] / hist["plain AR"].sum()).abs().sum().item()
        return dict(faithful=prompt_faithfulness(images[n], q_prompts), by=f,
                    fd=None if n == "plain AR" else frechet_distance(feats[n], feats["plain AR"]), tv=tv)

    qual = {n: quality(n) for n in q_names}

    # -- distributions: every attribute against plain AR, stratified by prompt, beside the floor -------------
    dist_rows, verdicts = distribution_part(models, methods, names, args.dist_prompts, args.dist_images,
                                            args.quality_batch)

    # -- table ------------------------------------------------------------------------------------------
    ar_time = times["plain AR"]
    rows, summary = [], {}
    for n in q_names:
        q = qual[n]
        fq = " / ".join(f"{q['by'][c]:.2f}" for c in sorted(q["by"]))
        fd = "–" if q["fd"] is None else f"{q['fd']:.2f}"
        tv = "–" if n == "plain AR" else f"{q['tv']:.3f}"
        qcells = [f"{q['faithful']:.2f} ({fq})", fd, tv]
        if n == "plain AR, other seeds":
            rows.append([f"{n} (noise floor)", "–", "–", "–", "–", "–", "–", *qcells])
            continue
        st = stats[n]
        imgs = len(st)
        fwd = sum(s.target_forwards for s in st) / imgs
        tau = sum(s.emitted_tokens for s in st) / max(sum(s.target_forwards for s in st), 1)
        plain = methods[n]["method"] == "ar"
        alpha = sum(s.accepted_tokens for s in st) / max(sum(s.drafted_tokens for s in st), 1)
        split = "/".join(f"{1000 * sum(getattr(s, a) for s in st) / imgs:.0f}"
                         for a in ("target_time", "drafter_time", "verify_time"))
        speed = ar_time / times[n]
        summary[n] = dict(speedup=speed, faithful=q["faithful"], fd=q["fd"], counts=pool_accepted_lengths(st),
                          method=methods[n]["method"])
        rows.append([n, f"{imgs / times[n]:.2f}", f"x{speed:.2f}", f"{fwd:.1f}", f"{tau:.2f}",
                     "–" if plain else f"{alpha:.2f}", split, *qcells])
    cfg_t = models.target.config
    text = "\n".join([
        args.section, "",
        f"{provenance('image_gen', argv, load_before)} Zoo models: FSQ tokenizer (codebook "
        f"{cfg_t.codebook_size}), text-conditioned AR target {cfg_t.num_layers} × {cfg_t.hidden_size} over "
        f"{cfg_t.grid_size}×{cfg_t.grid_size} tokens; CFG {sampling['cfg_scale']}, temperature "
        f"{sampling['temperature']}, top-k {sampling['top_k']}. AR, exact SD and SJD are lossless; LANTERN, "
        "LANTERN++, GSD and MuLo-SD are relaxed (8 latent neighbours unless a row says otherwise).", "",
        "### Forward cost (ms, batch 1 under CFG, after 64 context tokens (low-res: 32); median of repeats)", "",
        *cost_rows, "",
        "### MuLo-SD's resolution changes (256 held-out scenes)", "",
        *resampler_rows, "",
        "### Where the drafters and the target disagree (32 plain-AR images, teacher-forced)", "",
        *disagreement_rows, "",
        f"### Speed (batch 1, {args.speed_prompts} held-out prompts × {args.repeats} interleaved repeats) and quality "
        f"({args.quality_images} held-out prompts per row)", "",
        "Time split: ms per image in target forwards / drafting / verification + repair. Faithfulness: overall "
        "(1 / 2 / 3 objects). FD and TV: to plain AR's images of the same prompts.", "",
        *md_table(["method", "images/s", "speedup vs AR", "target fwd/image", "τ (tokens/target fwd)", "α",
                   "time split (ms)", "faithful", "FD to AR", "TV to AR"], rows), "",
        f"### What users see: attribute distributions ({args.dist_prompts} held-out prompts × {args.dist_images} "
        "images per method)", "",
        "Per attribute: total variation to plain AR's images of the same prompts (mean over prompts) and the p-value "
        "of the two-sample chi-square test stratified by prompt (mmspec.zoo.distribution). A row is within the floor "
        f"when no attribute's test rejects at p < {ALPHA:g}. Plain AR uses seeds 0 ...; every other row, the floor "
        "included, seeds 50 000 ... (independent samples). Precision / recall: Kynkäänniemi et al. (k = 3) in the "
        "scene classifier's features.", "",
        *dist_rows, "",
        "### Beside the MuLo-SD paper (LlamaGen-XL, 512 px, A100, batch 1; GenEval / FID on MS-COCO)", "",
        *md_table(["method", "paper speedup", "paper GenEval", "paper FID", "ours: speedup", "ours: faithful",
                   "ours: FD to AR"], [_paper_row(p, summary) for p in PAPER_ROWS]), "",
    ]) + "\n"
    report(text, args.out, args.section)
    if args.plots is not None:
        from ._plots import plot_accept_histogram, plot_speed_quality

        args.plots.mkdir(parents=True, exist_ok=True)
        plot_speed_quality(summary, args.plots / "image_speed_quality.png")
        plot_accept_histogram({n: v["counts"] for n, v in summary.items() if v["method"] != "ar"},
                              args.plots / "acceptance_histogram.png")
    return 0


def distribution_part(models, methods: dict, names: list[str], num_prompts: int, per_prompt: int,
                      batch: int) -> tuple[list[str], dict]:
    """The attribute table (markdown rows) and each method's verdict (within the floor or not)."""
    from mmspec.zoo.distribution import Comparison, compare, distribution_prompts, generate_sample

    prompts = distribution_prompts(num_prompts)
    vocab = models.tokenizer.vocab_size
    ref = generate_sample(models, prompts, per_prompt, method="ar", batch=batch)
    floor = compare(ref, generate_sample(models, prompts, per_prompt, seed_offset=50_000, method="ar", batch=batch),
                    vocab=vocab)
    rows, verdicts = [], {}
    for n in ["plain AR, other seeds (floor)"] + [n for n in names if methods[n]["method"] != "ar"]:
        c = floor if n.endswith("(floor)") else compare(
            ref, generate_sample(models, prompts, per_prompt, seed_offset=50_000, batch=batch, **methods[n]),
            vocab=vocab)
        verdicts[n] = c.within_floor()
        rows.append([n, *c.table_cells()])
    return md_table(["method", *Comparison.TABLE_HEADERS], rows), verdicts


def _paper_row(paper: tuple, summary: dict) -> list[str]:
    name, speed, geneval, fid = paper
    key = {"EAGLE-2": "exact SD (EAGLE head", "LANTERN": "LANTERN δ", "MuLo-SD r=2": "MuLo-SD"}[name]
    ours = [n for n in summary if n.startswith(key)]
    if not ours:
        return [name, speed, geneval, fid, "–", "–", "–"]
    best = max(ours, key=lambda n: summary[n]["speedup"])
    v = summary[best]
    fd = "–" if v["fd"] is None else f"{v['fd']:.2f}"
    return [name, speed, geneval, fid, f"x{v['speedup']:.2f} ({best})", f"{v['faithful']:.2f}", fd]


if __name__ == "__main__":
    sys.exit(main())
