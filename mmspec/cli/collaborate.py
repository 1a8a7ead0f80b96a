"""``mmspec collaborate``: collaborative decoding of several models sharing one tokenizer (a weighted ensemble or
contrastive decoding), sped up losslessly by speculation (CoS, :mod:`mmspec.collaborative`).

Glossary:
    models    ``--models``: HF checkpoints sharing one tokenizer, or names of models shipped for SmolLM2
              (:data:`mmspec.zoo.smollm2.SMOLLM2_MODELS`)
    combine   how the models' next-token distributions become one: ``ensemble`` (weights summing to 1) or
              ``contrastive`` (expert minus alpha x amateur)
    proposal  who drafts: ``alternate`` (each model in turn, ``--gamma`` tokens each), ``fixed`` (``--proposer``
              only) or ``none`` (standard collaborative decoding, no speculation)
    compare   also run standard collaborative decoding: the speedup, and identity when greedy
              (``EXIT_NOT_IDENTICAL`` otherwise)
"""

from __future__ import annotations

import argparse
import time

import torch

import mmspec
from mmspec.cpu_packing import pack_linear_weights
from mmspec.errors import MMSpecError
from mmspec.pretrained import ModelNotFoundError, chat_inputs

from .common import (CHAT_PROMPT, EXIT_BAD_INPUT, EXIT_NOT_IDENTICAL, EXIT_OK, CLIError, add_pack_flag,
                     add_sampling_flags, add_subcommand, check_model_path, check_prompt, check_sampling, hf_causal_lm,
                     hf_tokenizer, load)


def _errors() -> tuple:
    """Library errors, and SmolLM2 not installed: bad input."""
    return (((MMSpecError, ModelNotFoundError), EXIT_BAD_INPUT),)


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "collaborate", run, errors=_errors,
                       help="collaborative decoding of several models (weighted ensemble or contrastive decoding), "
                            "sped up losslessly by speculation (CoS)")
    p.add_argument("--models", nargs="+", default=["smollm2", "smollm2-code"],
                   help="HF checkpoints sharing one tokenizer, or the shipped smollm2, smollm2-code, smollm2-german, "
                        "smollm2-drafter (default: smollm2 smollm2-code, a general and a code model)")
    p.add_argument("--combine", default="ensemble", choices=["ensemble", "contrastive"])
    p.add_argument("--weights", nargs="+", type=float, help="ensemble weights, one per model, sum 1 (default equal)")
    p.add_argument("--alpha", type=float, default=0.1, help="contrastive: expert (model 1) - alpha x amateur (model 2)")
    p.add_argument("--plausibility", type=float, default=None,
                   help="contrastive: keep tokens the expert gives >= this x its top probability (default: no cut)")
    p.add_argument("--proposal", default="alternate", choices=["alternate", "fixed", "none"],
                   help="alternate proposals (default), one fixed proposer, or none (standard collaborative decoding)")
    p.add_argument("--gamma", nargs="+", type=int,
                   help="proposal lengths, one per model (default: 2 each, the fastest measured for models of one "
                        "size; give a cheap model a longer one)")
    p.add_argument("--proposer", type=int, default=None, help="--proposal fixed: index of the proposer (default: 0)")
    p.add_argument("--prompt", default=None, help="the prompt (one chat turn)")
    add_sampling_flags(p, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=0)
    add_pack_flag(p, default=True)
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the standard collaborative decoding run (speedup, and identity when greedy)")


def _combine_and_proposal(args: argparse.Namespace):
    """(combine, proposal or None) from the flags, checked against the number of models before any is loaded."""
    from mmspec import collaborative as co

    n = len(args.models)
    if args.combine == "ensemble":
        combine = co.WeightedEnsemble(tuple(args.weights) if args.weights else tuple([1.0 / n] * n))
    else:
        combine = co.ContrastiveDecoding(alpha=args.alpha, plausibility=args.plausibility)
    gammas = tuple(args.gamma) if args.gamma else None
    if args.proposal == "none":
        proposal = None
    elif args.proposal == "fixed":
        proposer = args.proposer if args.proposer is not None else 0
        if gammas is not None and len(gammas) != n:
            raise CLIError(EXIT_BAD_INPUT, f"--gamma gives {len(gammas)} proposal lengths for {n} models")
        proposal = co.FixedProposer(proposer, gammas[proposer] if gammas and proposer < n else 3)
    else:
        proposal = co.AlternateProposals(gammas or tuple([2] * n))
    combine.check_models(n)
    if proposal is not None:
        proposal.gammas(n)
    return combine, proposal


def load_models(paths: list[str]) -> tuple[list[torch.nn.Module], object]:
    """(models, tokenizer) for ``--models``: HF checkpoints and the names shipped for SmolLM2
    (:func:`mmspec.zoo.smollm2.load_smollm2_models`); one tokenizer checked against every model's."""
    from mmspec.zoo.smollm2 import SMOLLM2_MODELS, load_smollm2_models

    for path in paths:
        if path not in SMOLLM2_MODELS:
            check_model_path("--models", path)
    names = [path for path in paths if path in SMOLLM2_MODELS]
    shipped, smollm2_tokenizer = load_smollm2_models(names) if names else ([], None)
    shipped = iter(shipped)
    models, tokenizers = [], []
    for path in paths:
        if path in SMOLLM2_MODELS:
            models.append(next(shipped))
            tokenizers.append(smollm2_tokenizer)
        else:
            models.append(load("model", path, hf_causal_lm))
            tokenizers.append(load("tokenizer", path, hf_tokenizer))
    for tok in tokenizers[1:]:
        mmspec.check_same_tokenizer(tokenizers[0], tok)
    return models, tokenizers[0]


def run(args: argparse.Namespace) -> int:
    from mmspec import collaborative as co

    check_sampling(args)
    check_prompt(args)
    if len(args.models) < 2:
        raise CLIError(EXIT_BAD_INPUT, f"--models needs at least 2 models, got {len(args.models)}")
    combine, proposal = _combine_and_proposal(args)
    models, tokenizer = load_models(args.models)
    if args.pack:  # multi-token forwards (verification) cost about one single-token forward once packed
        for model in {id(m): m for m in models}.values():
            pack_linear_weights(model)
    enc = chat_inputs(tokenizer, [args.prompt or CHAT_PROMPT])
    common = dict(combine=combine, attention_mask=enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    out = co.generate(models, enc["input_ids"], proposal=proposal, **common)
    t_spec = time.perf_counter() - t0
    new = out.sequences[0, enc["input_ids"].shape[1]:]  # [new tokens]
    print("generated text:", tokenizer.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("forwards per model:", out.stats.extra.get("calls_per_model"))
    if proposal is None or not args.compare:
        return EXIT_OK
    t0 = time.perf_counter()
    ref = co.generate(models, enc["input_ids"], proposal=None, **common)
    t_std = time.perf_counter() - t0
    line = f"standard collaborative decoding: {t_std:.2f}s; CoS ({args.proposal}): {t_spec:.2f}s; " \
           f"speedup x{t_std / t_spec:.2f}"
    if args.temperature != 0.0:
        print(line)
        return EXIT_OK
    same = torch.equal(ref.sequences, out.sequences)
    print(f"{line}; identical: {same}")
    return EXIT_OK if same else EXIT_NOT_IDENTICAL
