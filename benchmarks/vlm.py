"""VLM benchmark: plain AR vs HF assisted generation vs mmspec with a pruned drafter.

Run from the repository root::

    python -m benchmarks.vlm                 # full run
    python -m benchmarks.vlm --quick         # smoke run
    python -m benchmarks.vlm --out benchmarks/RESULTS.md

One interleaved run (method order rotated every repeat) on a LLaVA-architecture pair with a long
visual context (``--image-size 64`` -> 256 visual tokens). No pretrained weights exist on the
development machines, so the pair is synthetic with *controlled agreement*: the target's decoder
layers after the first have their output projections scaled by ``--damp``, and the drafter is
the target's vision tower + projector + first decoder layer. Acceptance therefore measures how
well one layer predicts the damped stack, not a trained drafter; what the table shows reliably is
the cost side (drafter prefill with fewer visual tokens, per-step cost, overhead). Trained models
come with the zoo (issue P5).

Glossary:
    tau        mean accepted length (tokens emitted per verification step)
    prefill_d  drafter prefill seconds (vision tower + pruned decoder prefill), mean per request
    speedup    tokens/s of the row / tokens/s of plain AR in the same repeats (median)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ._report import write_section

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


def main(argv: list[str] | None = None) -> int:
    import mmspec.vision as mv

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--damp", type=float, default=0.3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="append/replace the VLM section of this markdown file")
    args = ap.parse_args(argv)
    if args.quick:
        args.image_size, args.layers, args.hidden, args.max_new_tokens, args.repeats, args.prompts = 32, 2, 64, 8, 1, 1
    torch.set_num_threads(2)
    target, drafter = build_pair(args.image_size, args.layers, args.hidden, args.damp)
    prompts = [make_inputs(args.image_size, s) for s in range(args.prompts)]
    n_visual = int((prompts[0]["input_ids"] == 500).sum())

    def ar(inp):
        out = target.generate(**inp, do_sample=False, max_new_tokens=args.max_new_tokens)
        return out[0, inp["input_ids"].shape[1]:].tolist(), None

    def assisted(inp):
        out = target.generate(**inp, do_sample=False, max_new_tokens=args.max_new_tokens, assistant_model=drafter)
        return out[0, inp["input_ids"].shape[1]:].tolist(), None

    def spec(strategy, ratio):
        def run(inp):
            out = mv.generate(target, drafter, inp, pruning=strategy, keep_ratio=ratio,
                              max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k)
            return out.sequences[0, inp["input_ids"].shape[1]:].tolist(), out.stats
        return run

    methods = {"plain AR (HF generate)": ar, "HF assisted (full-token drafter)": assisted,
               "mmspec none (full tokens)": spec("none", 1.0)}
    for strategy in ("verifier", "cls", "diversity", "uniform"):
        for ratio in (0.1, 0.25, 0.5):
            methods[f"mmspec {strategy} keep {ratio}"] = spec(strategy, ratio)
    names = list(methods)
    times = {n: [] for n in names}
    stats = {n: [] for n in names}
    outputs: dict[str, list] = {}
    failed: dict[str, str] = {}
    with torch.no_grad():
        for n in names:  # warm-up (and failure detection) outside the timed repeats
            try:
                methods[n](prompts[0])
            except Exception as exc:  # HF assisted generation may refuse VLM pairs
                failed[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        for r in range(args.repeats):
            order = [n for n in names if n not in failed]
            order = order[r % len(order):] + order[: r % len(order)]
            if r % 2:
                order.reverse()
            for n in order:
                t0 = time.perf_counter()
                outs = [methods[n](p) for p in prompts]
                times[n].append(time.perf_counter() - t0)
                outputs[n] = [o for o, _ in outs]
                stats[n].extend(s for _, s in outs if s is not None)
    tokens = args.max_new_tokens * len(prompts)
    ar_name = names[0]
    ref = outputs[ar_name]
    rows = []
    for n in names:
        if n in failed:
            rows.append(f"| {n} | – | – | – | – | – | failed: {failed[n]} |")
            continue
        tps = [tokens / t for t in times[n]]
        speed = statistics.median(tokens / t / (tokens / a) for t, a in zip(times[n], times[ar_name]))
        st = stats[n]
        tau = f"{statistics.mean(s.mean_accepted_length for s in st):.2f}" if st else "–"
        kept = f"{st[0].extra.get('drafter_visual_tokens', ['–'])[0]}" if st else f"{n_visual}"
        pre = f"{1000 * statistics.mean(s.drafter_prefill_time for s in st):.1f}" if st else "–"
        same = "yes" if outputs[n] == ref else "NO"
        rows.append(f"| {n} | {statistics.median(tps):.1f} | x{speed:.2f} | {tau} | {kept} | {pre} | {same} |")
    cmd = "python -m benchmarks.vlm " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = [
        SECTION, "",
        f"Command: `{cmd.strip()}` — {_dt.date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}. LLaVA-architecture synthetic pair: target {args.layers} decoder layers × "
        f"{args.hidden}, drafter = its first layer; {n_visual} visual tokens; k = {args.k}; "
        f"{args.max_new_tokens} new tokens × {len(prompts)} prompts; median of {args.repeats} interleaved repeats.", "",
        "| method | tokens/s | speedup vs AR | tau | drafter visual tokens | drafter prefill ms | identical to AR |",
        "|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.out is not None:
        write_section(args.out, SECTION, table)
    return 0 if all(outputs[n] == ref for n in outputs) else 1


if __name__ == "__main__":
    sys.exit(main())
