"""VLM benchmark: plain AR vs HF assisted generation vs mmspec with a pruned drafter.

Run from the repository root::

    python -m benchmarks.vlm                 # full run
    python -m benchmarks.vlm --quick         # smoke run
    python -m benchmarks.vlm --out benchmarks/RESULTS.md
    python -m benchmarks.vlm --model smollm2 # the scene VLM on SmolLM2 (benchmarks/smollm2_vlm.py)

One interleaved run (method order rotated from prompt to prompt) on the zoo's trained LLaVA pair (256 visual
tokens, a drafter several times cheaper per token), captioning held-out scenes.  ``--synthetic``
uses instead a random LLaVA pair with *controlled agreement* (the target's later decoder layers
damped by ``--damp``, the drafter its first layer): useful for the cost side only.

Glossary:
    tau        mean accepted length (tokens emitted per verification step)
    prefill_d  drafter prefill seconds (vision tower + pruned decoder prefill), mean per request
    speedup    tokens/s of the row / tokens/s of plain AR in the same repeats (median)
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch

from ._harness import (arg_parser, begin, decode_step_seconds, interleave, md_table, pool_accepted_lengths, provenance,
                       report)

SECTION = "## VLM (issue: vision)"


def build_pair(image_size: int, layers: int, hidden: int, damp: float, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=image_size, patch_size=4, projection_dim=64, initializer_range=0.2)
    tc = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=4, initializer_range=0.2)
    target = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=500,
                                                       vision_feature_layer=-2)).eval()
    with torch.no_grad():
        for layer in target.model.language_model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    drafter = copy.deepcopy(target)
    drafter.model.language_model.layers = drafter.model.language_model.layers[:1]
    drafter.config.text_config.num_hidden_layers = 1
    for m in (target, drafter):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    return target, drafter


def make_inputs(image_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n_img = (image_size // 4) ** 2
    pre = torch.randint(3, 400, (4,), generator=g).tolist()
    post = torch.randint(3, 400, (8,), generator=g).tolist()
    ids = torch.tensor([[1] + pre + [500] * n_img + post])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(1, 3, image_size, image_size, generator=g))


def zoo_setup(num_prompts: int):
    from mmspec.zoo import load_default_vlm
    from mmspec.zoo.data import IMAGE_SIZE, heldout_scenes
    from mmspec.zoo.scenes import render
    from mmspec.zoo.train_vlm import caption_prompt

    pair = load_default_vlm()
    prompts = [caption_prompt(pair.processor, [render(s, IMAGE_SIZE)]) for s in heldout_scenes()[:num_prompts]]
    image_token = pair.target.config.image_token_id
    return pair.target, pair.drafter, prompts, image_token, pair.processor.tokenizer.eos_token_id


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:  # ``--model smollm2``: the scene VLM on the real SmolLM2 (benchmarks/smollm2_vlm.py)
        from . import smollm2_vlm

        return smollm2_vlm.main(argv)
    import mmspec.vision as mv

    ap = arg_parser("vlm", __doc__, prompts=8, max_new_tokens=32, plots="the acceptance-histogram PNG",
                    quick={"image_size": 32, "layers": 2, "hidden": 64, "max_new_tokens": 8, "repeats": 1,
                           "prompts": 1})
    ap.add_argument("--synthetic", action="store_true", help="the synthetic damped pair instead of the zoo models")
    ap.add_argument("--image-size", type=int, default=64, help="--synthetic only")
    ap.add_argument("--layers", type=int, default=6, help="--synthetic only")
    ap.add_argument("--hidden", type=int, default=256, help="--synthetic only")
    ap.add_argument("--damp", type=float, default=0.3, help="--synthetic only")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    load_before = begin(2)
    if args.synthetic:
        target, drafter = build_pair(args.image_size, args.layers, args.hidden, args.damp)
        prompts = [make_inputs(args.image_size, s) for s in range(args.prompts)]
        image_token, eos = 500, None
        what = (f"LLaVA-architecture synthetic pair: target {args.layers} decoder layers × {args.hidden}, drafter = "
                f"its first layer (damp {args.damp})")
    else:
        target, drafter, prompts, image_token, eos = zoo_setup(args.prompts)
        what = ("zoo LLaVA pair (`mmspec.zoo.load_default_vlm`): captions of held-out scenes, greedy, stops at EOS")
    n_visual = int((prompts[0]["input_ids"] == image_token).sum())

    def trim(seq):
        seq = seq.tolist()
        return seq[: seq.index(eos) + 1] if eos is not None and eos in seq else seq

    def ar(inp, seed):
        out = target.generate(**inp, do_sample=False, max_new_tokens=args.max_new_tokens)
        return trim(out[0, inp["input_ids"].shape[1]:]), None

    def assisted(inp, seed):
        out = target.generate(**inp, do_sample=False, max_new_tokens=args.max_new_tokens, assistant_model=drafter)
        return trim(out[0, inp["input_ids"].shape[1]:]), None

    def spec(strategy, ratio):
        def run(inp, seed):
            out = mv.generate(target, drafter, inp, pruning=strategy, keep_ratio=ratio,
                              max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k)
            return trim(out.sequences[0, inp["input_ids"].shape[1]:]), out.stats
        return run

    methods = {"plain AR (HF generate)": ar, "HF assisted (full-token drafter)": assisted,
               "mmspec none (full tokens)": spec("none", 1.0)}
    for strategy in ("verifier", "cls", "diversity", "uniform"):
        for ratio in (0.1, 0.25, 0.5):
            methods[f"mmspec {strategy} keep {ratio}"] = spec(strategy, ratio)
    t_target, t_drafter = (1000 * decode_step_seconds(m, prompts[0], reps=16) for m in (target, drafter))
    c = t_drafter / t_target
    with torch.no_grad():  # HF assisted generation may refuse VLM pairs: its row says failed
        runs = interleave(methods, prompts, repeats=args.repeats, catch=True, label="vlm")
    ar_name = runs.names[0]
    ref = {call.index: call.result[0] for call in runs.of(ar_name)}
    tokens = sum(len(o) for o in ref.values())
    rows, summary, all_same = [], {}, True
    for n in runs.names:
        if n in runs.failed:
            rows.append([n, "–", "–", "–", "–", "–", "–", "–", f"failed: {runs.failed[n]}"])
            continue
        times = runs.per_repeat(n)
        tps = [tokens / t for t in times]
        speed = statistics.median(a / t for t, a in zip(times, runs.per_repeat(ar_name)))
        st = [s for _, s in runs.results(n) if s is not None]
        tau_v = (sum(s.accepted_tokens + s.row_steps for s in st) / sum(s.row_steps for s in st)) if st else None
        tau = f"{tau_v:.2f}" if st else "–"
        theory = tau_v / (1 + c * args.k) if st else None
        frac = f"{speed / theory:.0%}" if st else "–"
        kept = f"{st[0].extra.get('drafter_visual_tokens', ['–'])[0]}" if st else f"{n_visual}"
        pre = f"{1000 * statistics.mean(s.drafter_prefill_time for s in st):.1f}" if st else "–"
        same = all(call.result[0] == ref[call.index] for call in runs.of(n))
        all_same &= same
        summary[n] = dict(speedup=speed, tau=tau_v, stats=st)
        rows.append([n, f"{statistics.median(tps):.1f}", f"x{speed:.2f}", tau,
                     "–" if theory is None else f"x{theory:.2f}", frac, kept, pre, "yes" if same else "NO"])
    header = [
        SECTION, "",
        f"{provenance('vlm', argv, load_before)} {what}; {n_visual} visual tokens; k = {args.k}; {len(prompts)} "
        f"prompts, {tokens} generated tokens per repeat; median of {args.repeats} interleaved repeats (a round per "
        f"prompt). One cached single-token forward: target {t_target:.2f} ms, drafter {t_drafter:.2f} ms → "
        f"c = {c:.2f}; theory = τ / (1 + c·k), the speedup if forwards were the only cost.", "",
    ]
    table = "\n".join(header + md_table(
        ["method", "tokens/s", "speedup vs AR", "τ (mean acc. len)", "theory", "% of theory", "drafter visual tokens",
         "drafter prefill ms", "identical to AR"], rows)) + "\n"
    report(table, args.out, SECTION)
    if args.plots is not None:
        from ._plots import plot_accept_histogram

        args.plots.mkdir(parents=True, exist_ok=True)
        counts = {n: pool_accepted_lengths(v["stats"]) for n, v in summary.items()
                  if v["stats"] and ("keep 0.25" in n or "none" in n)}
        plot_accept_histogram(counts, args.plots / "vlm_acceptance_histogram.png",
                              title="VLM: accepted drafted tokens per step (zoo pair)")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
