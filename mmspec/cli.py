"""Command-line entry point: ``mmspec run`` (the main job on the zoo models), ``mmspec text``,
``mmspec vlm``, ``mmspec imagegen``.

Glossary: ``mmspec text`` without ``--target`` builds a small self-contained text example (the zoo
has no text pair): a random Llama target whose later layers are damped (their output projections
scaled by 0.2) and a drafter made of its first layer, a synthetic pair whose agreement is
controlled (acceptance around 0.4); with ``--target``/``--drafter`` it loads HF checkpoints
(``from_pretrained``, local paths or hub names when online).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _example_models(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # damp the later layers so that the first layer alone predicts the target often
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    draft_cfg = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})
    drafter = LlamaForCausalLM(draft_cfg).eval()
    # the drafter is the target's first layer with its embeddings, final norm and head
    state = {k: v for k, v in target.state_dict().items() if "layers." not in k or k.startswith("model.layers.0.")}
    drafter.load_state_dict(state)
    for m in (target, drafter):
        m.generation_config.eos_token_id = None
    return target, drafter


def _run_text(args: argparse.Namespace) -> int:
    import mmspec

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = None
    if args.target:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = AutoModelForCausalLM.from_pretrained(args.target).eval()
        drafter = "prompt_lookup" if args.prompt_lookup or not args.drafter else \
            AutoModelForCausalLM.from_pretrained(args.drafter).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
        if not isinstance(drafter, str):
            try:
                mmspec.check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(args.drafter))
            except mmspec.MMSpecError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        if not args.prompt.strip():
            print("error: --prompt is empty", file=sys.stderr)
            return 2
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        target, drafter = _example_models(args.seed)
        if args.prompt_lookup:
            drafter = "prompt_lookup"
        data = args.prompt.encode("utf-8")
        if not data:
            print("error: --prompt is empty", file=sys.stderr)
            return 2
        input_ids = torch.tensor([list(data)], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p)
    try:
        t0 = time.perf_counter()
        out = mmspec.generate(target, input_ids, drafter=drafter, num_draft_tokens=args.k, generator=gen, **common)
        t_spec = time.perf_counter() - t0
    except mmspec.MMSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    new = out.sequences[0, input_ids.shape[1]:]
    print("generated tokens:", new.tolist())
    if tokenizer is not None:
        print("generated text:", tokenizer.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("acceptance per draft position:", [round(a, 3) for a in out.stats.acceptance_per_position])
    if args.temperature == 0.0:
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=args.max_new_tokens,
                                  pad_token_id=target.generation_config.pad_token_id or 0)
        t_ar = time.perf_counter() - t0
        same = torch.equal(ref, out.sequences)
        print(f"plain AR (HF generate): {t_ar:.2f}s; speculative: {t_spec:.2f}s; "
              f"speedup x{t_ar / t_spec:.2f}; identical to AR: {same}")
        if not same:
            return 1
    return 0


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")  # grayscale / RGBA / palette images become RGB
    except (FileNotFoundError, IsADirectoryError):
        raise SystemExit(f"error: image file not found: {path}")
    except (UnidentifiedImageError, OSError) as exc:
        raise SystemExit(f"error: cannot read image {path!r}: {exc}")


def _run_vlm(args: argparse.Namespace) -> int:
    import mmspec
    import mmspec.vision as mv
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = _load_image(args.image)
    if not args.prompt.strip():
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    processor = AutoProcessor.from_pretrained(args.processor or args.target)
    target = AutoModelForImageTextToText.from_pretrained(args.target).eval()
    drafter = AutoModelForImageTextToText.from_pretrained(args.drafter).eval() if args.drafter else target
    image_token = getattr(processor, "image_token", "<image>")
    prompt = args.prompt if image_token in args.prompt else f"{image_token} {args.prompt}"
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
    except Exception as exc:  # the processor's own message names the problem
        print(f"error: the processor cannot prepare this image/prompt: {exc}", file=sys.stderr)
        return 2
    dtype = next(target.parameters()).dtype
    inputs = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    try:
        out = mv.generate(target, drafter, inputs, pruning=args.pruning, keep_ratio=args.keep_ratio,
                          max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k,
                          temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
    except mmspec.MMSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    print("generated text:", processor.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("visual tokens: target", out.stats.extra.get("visual_tokens"), "drafter",
          out.stats.extra.get("drafter_visual_tokens"))
    if args.check and args.temperature == 0.0:
        with torch.no_grad():
            ref = target.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
        same = torch.equal(ref, out.sequences)
        print("identical to target.generate:", same)
        return 0 if same else 1
    return 0


def heatmap_image(accepted_map: torch.Tensor, cell: int = 24):
    """[H, W] in [0, 1] -> PIL heat-map (dark blue = target-sampled, yellow = drafted and accepted)."""
    from PIL import Image

    m = accepted_map.clamp(0, 1).float()
    lo, hi = torch.tensor([30.0, 30.0, 110.0]), torch.tensor([250.0, 220.0, 40.0])
    rgb = (lo + (hi - lo) * m.unsqueeze(-1)).round().to(torch.uint8)  # [H, W, 3]
    img = Image.fromarray(rgb.numpy(), "RGB")
    return img.resize((img.width * cell, img.height * cell), Image.NEAREST)


def _run_imagegen(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import mmspec
    import mmspec.image_gen as ig

    try:
        target = ig.ARImageModel.from_pretrained(args.model)
        tokenizer = ig.VQTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        drafter = ig.ARImageModel.from_pretrained(args.drafter) if args.drafter else None
        if args.prompt is not None and args.class_ids:
            raise mmspec.MMSpecError("give --class or --prompt, not both")
        condition = args.prompt if args.prompt is not None else (args.class_ids or None)
        if condition is None:
            raise mmspec.MMSpecError("give a condition: --class ID (class-conditional) or --prompt TEXT")
        out = ig.generate(target, tokenizer, condition=condition, drafter=drafter, method=args.method,
                          cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule, num_draft_tokens=args.k,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          generator=torch.Generator().manual_seed(args.seed), num_images=args.num_images,
                          lantern_k=args.lantern_k, lantern_delta=args.lantern_delta,
                          lantern_lambda=args.lantern_lambda, mulo_tau=args.mulo_tau, mulo_l=args.mulo_l,
                          mulo_k=args.lantern_k, mulo_scale=args.mulo_scale, progress=True)
    except (mmspec.MMSpecError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, cond in enumerate(out.conditions):
        if out.images is not None:
            name = f"image_{i:03d}.png"
            out.images[i].save(outdir / name)
            files.append(name)
    heatmap_image(out.stats.accepted_map).save(outdir / "acceptance_heatmap.png")
    stats = out.stats.as_dict()
    stats.update(method=args.method, conditions=out.conditions, images=files, seed=args.seed,
                 tokens=out.tokens.tolist())
    (outdir / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"{len(out.conditions)} image(s) -> {outdir}: {out.stats.summary()}; "
          f"target forwards per image {out.stats.target_forwards_per_image:.1f}")
    return 0


def imagegen_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mmspec-imagegen`` (same as ``mmspec imagegen``)."""
    return main(["imagegen", *(sys.argv[1:] if argv is None else argv)])


def _run_main_job(args: argparse.Namespace) -> int:
    import mmspec
    from mmspec.main_job import MainJobConfig, run_main_job

    if args.prompt is not None and not args.prompt.strip():
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    cfg = MainJobConfig(pruning=args.pruning, keep_ratio=args.keep_ratio, prompt=args.prompt,
                        image_method=args.method, num_images=args.num_images, seed=args.seed)
    try:
        report = run_main_job(args.out, cfg)
    except mmspec.MMSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if report["vlm"]["identical_to_hf_generate"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmspec", description="Speculative decoding for multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job on the embedded zoo models: caption a scene with the VLM pair "
                                     "(pruned drafter) and draw images (AR vs a relaxed method)")
    run.add_argument("--out", default="mmspec_out", help="directory for the images, heat-map and report.json")
    run.add_argument("--prompt", default=None, help="image prompt (default: a held-out scene's caption)")
    run.add_argument("--method", default="lantern", choices=["exact", "sjd", "lantern", "lantern++", "mulo"])
    run.add_argument("--pruning", default="verifier", choices=["verifier", "cls", "diversity", "uniform", "none"])
    run.add_argument("--keep-ratio", type=float, default=0.25)
    run.add_argument("--num-images", type=int, default=4)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_run_main_job)
    text = sub.add_parser("text", help="speculative decoding of a causal LM with a drafter or prompt lookup")
    text.add_argument("--target", help="HF checkpoint of the target (default: built-in example models)")
    text.add_argument("--drafter", help="HF checkpoint of the drafter (same vocabulary as the target)")
    text.add_argument("--tokenizer", help="tokenizer path (default: the target's)")
    text.add_argument("--prompt-lookup", action="store_true", help="draft by prompt lookup instead of a model")
    text.add_argument("--prompt", default="speculative decoding drafts, the target verifies; "
                                          "speculative decoding drafts, the target verifies")
    text.add_argument("--max-new-tokens", type=int, default=64)
    text.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=3)
    text.add_argument("--temperature", type=float, default=0.0)
    text.add_argument("--top-k", type=int, default=None)
    text.add_argument("--top-p", type=float, default=None)
    text.add_argument("--seed", type=int, default=0)
    text.set_defaults(func=_run_text)

    vlm = sub.add_parser("vlm", help="VLM speculative decoding with a pruned drafter (HF checkpoints)")
    vlm.add_argument("--target", required=True, help="HF VLM checkpoint (LLaVA, LLaVA-NeXT, Qwen2-VL, ...)")
    vlm.add_argument("--drafter", help="smaller VLM of the same family (default: the target itself)")
    vlm.add_argument("--processor", help="processor path (default: the target's)")
    vlm.add_argument("--image", required=True)
    vlm.add_argument("--prompt", required=True)
    vlm.add_argument("--pruning", default="verifier", choices=["verifier", "cls", "diversity", "uniform", "none"])
    vlm.add_argument("--keep-ratio", type=float, default=0.25)
    vlm.add_argument("--max-new-tokens", type=int, default=64)
    vlm.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=4)
    vlm.add_argument("--temperature", type=float, default=0.0)
    vlm.add_argument("--seed", type=int, default=0)
    vlm.add_argument("--check", action="store_true", help="also run target.generate and compare (greedy)")
    vlm.set_defaults(func=_run_vlm)

    img = sub.add_parser("imagegen", help="generate images with an AR image model (AR, exact SD, SJD)")
    img.add_argument("--model", required=True, help="AR image model directory (ARImageModel.save_pretrained)")
    img.add_argument("--tokenizer", help="VQ tokenizer directory (to write PNGs)")
    img.add_argument("--drafter", help="smaller AR image model (exact, lantern); low-resolution model (mulo)")
    img.add_argument("--class", dest="class_ids", type=int, action="append", default=[], help="class id (repeatable)")
    img.add_argument("--prompt", help="prompt for a text-conditional model")
    img.add_argument("--method", default="sjd", choices=["ar", "exact", "sjd", "lantern", "lantern++", "mulo"])
    img.add_argument("--mulo-tau", type=float, default=0.3, help="MuLo-SD pooled-probability threshold")
    img.add_argument("--mulo-l", type=int, default=1, help="MuLo-SD resampling neighbourhood radius")
    img.add_argument("--mulo-scale", type=int, default=None,
                     help="MuLo-SD resolution ratio (checked against the drafter's grid)")
    img.add_argument("--lantern-k", type=int, default=8, help="latent neighbours per codebook entry (LANTERN)")
    img.add_argument("--lantern-delta", type=float, default=0.1, help="LANTERN total-variation budget")
    img.add_argument("--lantern-lambda", type=float, default=2.0, help="LANTERN++ multiplicative cap")
    img.add_argument("--cfg-scale", type=float, default=4.0)
    img.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    img.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=4)
    img.add_argument("--temperature", type=float, default=1.0)
    img.add_argument("--top-k", type=int, default=None)
    img.add_argument("--top-p", type=float, default=None)
    img.add_argument("--seed", type=int, default=0)
    img.add_argument("--num-images", type=int, default=1)
    img.add_argument("--out", default="out/images")
    img.set_defaults(func=_run_imagegen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
