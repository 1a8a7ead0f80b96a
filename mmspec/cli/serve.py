"""``mmspec serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, ``/metrics``) with speculative decoding, for a causal LM given as ``smollm2``, a HF
folder or a ``.gguf`` file (issue 30, in progress; requests join the running batch between verification steps
with prompt lookup or no drafter), and with ``--images zoo`` ``/v1/images/generations`` on the zoo's image
models."""

from __future__ import annotations

import argparse

from .common import EXIT_BAD_INPUT, EXIT_OK, CLIError, add_subcommand, check_number, one_line

DRAFTERS = ("lookup", "head", "none")


def _errors() -> tuple:
    from mmspec.errors import MMSpecError
    from mmspec.pretrained import ModelNotFoundError

    return (((MMSpecError, ModelNotFoundError, OSError), EXIT_BAD_INPUT),)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "serve", run, errors=_errors,
                       help="an OpenAI-compatible server with speculative decoding (chat and completions)")
    p.add_argument("--target", default="smollm2", help="smollm2 (the packaged SmolLM2-135M-Instruct), a HF folder or "
                                                       "a .gguf file")
    p.add_argument("--drafter", default="lookup", choices=DRAFTERS,
                   help="prompt lookup with a cost-aware draft length (default; measured at start), the packaged "
                        "EAGLE-3 head (smollm2 only), or none (plain decoding)")
    p.add_argument("--name", default=None, help="the model name clients send (default: the target's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-rows", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond which the server answers 429")
    p.add_argument("--max-tokens", type=int, default=256, help="the default max_tokens of a request")
    p.add_argument("--images", default="none", choices=["none", "zoo"],
                   help="also serve POST /v1/images/generations with the zoo's AR image models (default: none)")
    p.add_argument("--max-images", type=int, default=4, help="the largest n of an image request")


def run(args: argparse.Namespace) -> int:
    check_number(args, "port", lo=0, hi=65535, integer=True)
    check_number(args, "max_rows", lo=1, integer=True)
    check_number(args, "max_queue", lo=1, integer=True)
    check_number(args, "max_tokens", lo=1, integer=True)
    check_number(args, "max_images", lo=1, integer=True)
    if args.drafter == "head" and args.target != "smollm2":
        raise CLIError(EXIT_BAD_INPUT, "--drafter head is packaged for --target smollm2 only; use lookup or none")
    import uvicorn

    from mmspec.pretrained import load_causal_lm
    from mmspec.serve.app import create_app
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
    name = args.name or ("smollm2" if args.target == "smollm2" else str(args.target).rstrip("/").split("/")[-1])
    worker = Worker(target, tokenizer, model_name=name, drafter=drafter, max_rows=args.max_rows,
                    max_queue=args.max_queue, default_max_tokens=args.max_tokens)
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
