"""``mmspec serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, ``/metrics``) with speculative decoding, for a causal LM given as ``smollm2``, a HF
folder or a ``.gguf`` file (requests join the running batch between verification steps with prompt lookup or no
drafter), a vision-language model (``smollm2-vlm`` or a HF VLM folder: chats with ``image_url`` parts), and with
``--images zoo`` ``/v1/images/generations`` on the zoo's image models."""

from __future__ import annotations

import argparse

from .common import EXIT_BAD_INPUT, EXIT_OK, CLIError, add_subcommand, check_number, one_line

DRAFTERS = ("lookup", "head", "model", "none")
#: the packaged vision-language model (SmolLM2-LLaVA on scenes); a HF folder whose config has a vision_config is
#: served as a VLM too
PACKAGED_VLM = "smollm2-vlm"


def _errors() -> tuple:
    from mmspec.errors import MMSpecError
    from mmspec.pretrained import ModelNotFoundError

    return (((MMSpecError, ModelNotFoundError, OSError), EXIT_BAD_INPUT),)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "serve", run, errors=_errors,
                       help="an OpenAI-compatible server with speculative decoding (chat and completions)")
    p.add_argument("--target", default="smollm2",
                   help="smollm2 (the packaged SmolLM2-135M-Instruct), smollm2-vlm (the packaged scene VLM: chats "
                        "with image_url parts), a HF folder (a VLM when its config has a vision_config) or a .gguf "
                        "file")
    p.add_argument("--drafter", default="lookup", choices=DRAFTERS,
                   help="text: prompt lookup with a cost-aware draft length (default; measured at start), the packaged "
                        "EAGLE-3 head (smollm2 only), or none (plain decoding). VLMs: the EAGLE-3 head (smollm2-vlm's "
                        "default) or the small VLM (model), each seeing a pruned share of the visual tokens; a HF VLM "
                        "folder drafts with itself, pruned")
    p.add_argument("--keep-ratio", type=float, default=0.25, help="VLMs: the share of visual tokens the drafter sees")
    p.add_argument("--name", default=None, help="the model name clients send (default: the target's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond which the server answers 429")
    p.add_argument("--max-tokens", type=int, default=256, help="the default max_tokens of a request")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled before a step where rows join (at least one request; the rest join "
                        "at the next steps: a burst's first answers start sooner); 0: no limit")
    p.add_argument("--images", default="none", choices=["none", "zoo"],
                   help="also serve POST /v1/images/generations with the zoo's AR image models (default: none)")
    p.add_argument("--max-images", type=int, default=4, help="the largest n of an image request")


def run(args: argparse.Namespace) -> int:
    check_number(args, "port", lo=0, hi=65535, integer=True)
    check_number(args, "max_rows", lo=1, integer=True)
    check_number(args, "max_queue", lo=1, integer=True)
    check_number(args, "max_tokens", lo=1, integer=True)
    check_number(args, "max_images", lo=1, integer=True)
    check_number(args, "prefill_budget", lo=0, integer=True)
    check_number(args, "keep_ratio", lo=0, hi=1)
    vlm = args.target == PACKAGED_VLM or _is_vlm_folder(args.target)
    if args.drafter == "head" and args.target not in ("smollm2", PACKAGED_VLM):
        raise CLIError(EXIT_BAD_INPUT, f"--drafter head is packaged for --target smollm2 and {PACKAGED_VLM} only; "
                                       "use lookup or none")
    if args.drafter == "model" and args.target != PACKAGED_VLM:
        raise CLIError(EXIT_BAD_INPUT, f"--drafter model is the small VLM packaged with --target {PACKAGED_VLM}")
    if vlm and args.drafter == "none":
        raise CLIError(EXIT_BAD_INPUT, "a VLM is served with a pruned drafter; --drafter none is for text models")
    import uvicorn

    from mmspec.serve.app import create_app

    name = args.name or (args.target if args.target in ("smollm2", PACKAGED_VLM) else
                         str(args.target).rstrip("/").split("/")[-1])
    common = dict(model_name=name, max_rows=args.max_rows, max_queue=args.max_queue,
                  default_max_tokens=args.max_tokens, prefill_budget=args.prefill_budget or None)
    if vlm:
        worker = _vlm_worker(args, common)
    else:
        worker = _text_worker(args, common)
    images = None
    if args.images == "zoo":
        from mmspec.serve.images import ImageService
        from mmspec.zoo import load_default_image_models

        images = ImageService(load_default_image_models(), max_n=args.max_images)
    also = f" and images ({images.name}, {images.size})" if images else ""
    print(f"mmspec serve: {name} ({args.drafter} drafter){also} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(create_app(worker, images=images), host=args.host, port=args.port, log_level="info")
    except OSError as exc:
        raise CLIError(EXIT_BAD_INPUT, f"cannot listen on {args.host}:{args.port}: {one_line(exc)}") from None
    finally:
        worker.close()
    return EXIT_OK


def _is_vlm_folder(target: str) -> bool:
    import json
    from pathlib import Path

    cfg = Path(target).expanduser() / "config.json"
    try:
        return cfg.is_file() and "vision_config" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def _vlm_worker(args: argparse.Namespace, common: dict):
    from mmspec.serve.worker import VLMWorker

    if args.target == PACKAGED_VLM:
        from mmspec.zoo.smollm2_llava import load_smollm2_vlm

        pack = load_smollm2_vlm()
        target, processor = pack.target, pack.processor
        drafter = pack.drafter if args.drafter == "model" else pack.head
    else:
        from .vlm import _processor, _vlm

        target, processor = _vlm(args.target), _processor(args.target)
        drafter = target  # drafts for itself, seeing a pruned share of the visual tokens
    if getattr(processor, "chat_template", None) is None:
        raise CLIError(EXIT_BAD_INPUT, f"the processor of {args.target} has no chat template to render chats with")
    return VLMWorker(target, processor, drafter=drafter, keep_ratio=args.keep_ratio, **common)


def _text_worker(args: argparse.Namespace, common: dict):
    from mmspec.pretrained import load_causal_lm
    from mmspec.serve.worker import Worker

    target, tokenizer = load_causal_lm(args.target)
    if args.drafter == "head":
        from mmspec.zoo.smollm2 import load_smollm2_drafter

        head = load_smollm2_drafter("head", target).head
        drafter = lambda: head  # noqa: E731  (a fresh FeatureDrafter per batch)
    elif args.drafter == "lookup":
        from mmspec.serve.worker import cost_aware_lookup

        drafter = cost_aware_lookup(target)
    else:
        drafter = lambda: None  # noqa: E731
    return Worker(target, tokenizer, drafter=drafter, **common)
