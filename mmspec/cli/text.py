"""``mmspec text``: speculative decoding of a causal LM with a drafter or prompt lookup, checked against plain
AR decoding (HF ``generate``) when greedy.

Glossary:
    default       no ``--target``: the real SmolLM2-135M-Instruct (installed from its wheel,
                  :mod:`mmspec.pretrained`) answering a chat prompt, drafted by the EAGLE-3 head this repository
                  trained for it (:mod:`mmspec.zoo.smollm2`) or by ``--drafter`` / ``--prompt-lookup``
    --example     the small self-contained toy pair: a random Llama target whose later layers are damped (their
                  output projections scaled by 0.2) and a drafter made of its first layer (acceptance around
                  0.4); the prompt is read as byte ids
    checkpoints   ``--target``/``--drafter``/``--tokenizer``: HF checkpoints (``from_pretrained``: local folders,
                  or hub names when online); a drafter must share the target's tokenizer
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import mmspec
from mmspec.drafters.feature import FeatureDrafter
from mmspec.pretrained import ModelNotFoundError, chat_inputs, load_causal_lm
from mmspec.truncate import truncated_copy

from .common import (CHAT_PROMPT, EXIT_BAD_INPUT, EXIT_NOT_IDENTICAL, EXIT_OK, CLIError, add_sampling_flags,
                     add_subcommand, check_model_path, check_prompt, check_sampling, hf_causal_lm, hf_tokenizer, load,
                     one_line, toy_llama)

EXAMPLE_PROMPT = "speculative decoding drafts, the target verifies; speculative decoding drafts, the target verifies"


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "text", run, help="speculative decoding of a causal LM with a drafter or prompt "
                                                     "lookup (default: SmolLM2-135M-Instruct with its shipped EAGLE-3 "
                                                     "head)")
    p.add_argument("--target", help="HF checkpoint of the target (default: SmolLM2-135M-Instruct, chat prompt)")
    p.add_argument("--example", action="store_true", help="the built-in toy pair instead (random Llama, byte ids)")
    p.add_argument("--drafter", help="HF checkpoint of the drafter (same vocabulary as the target)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the target's)")
    p.add_argument("--prompt-lookup", action="store_true", help="draft by prompt lookup instead of a model")
    p.add_argument("--prompt", default=None, help="the prompt (a chat turn for SmolLM2)")
    add_sampling_flags(p, max_new_tokens=64, k=None, temperature=0.0, top_k=None, top_p=None, seed=0,
                       helps={"k": "drafted tokens per verification step (default: SmolLM2's head in the shape the "
                                   "calibration measures fastest here, cached, or prompt lookup with a cost-aware k where it "
                                   "expects the head not to pay; 3 for other drafters)"})


def example_models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(target, drafter): the ``--example`` toy pair (a 4-layer random Llama over 256 byte ids with its later
    layers damped, and a 1-layer Llama holding the target's first layer, embeddings, final norm and head)."""
    target = toy_llama(seed, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       initializer_range=0.15)
    with torch.no_grad():  # damp the later layers so that the first layer alone predicts the target often
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    drafter = truncated_copy(target, 1)
    return target, drafter


def _check(args: argparse.Namespace) -> None:
    if args.example:
        for flag, value in (("--target", args.target), ("--drafter", args.drafter), ("--tokenizer", args.tokenizer)):
            if value is not None:
                raise CLIError(EXIT_BAD_INPUT, f"{flag} cannot be combined with --example (the built-in toy pair)")
    if args.target is None and not args.example and args.tokenizer is not None:
        raise CLIError(EXIT_BAD_INPUT, "--tokenizer needs --target (the default SmolLM2 brings its own)")
    if args.drafter is not None and args.prompt_lookup:
        raise CLIError(EXIT_BAD_INPUT, "give --drafter or --prompt-lookup, not both")
    for flag, path in (("--target", args.target), ("--drafter", args.drafter), ("--tokenizer", args.tokenizer)):
        check_model_path(flag, path)
    check_sampling(args)
    check_prompt(args)


def _smollm2(args: argparse.Namespace):
    """(target, drafter, tokenizer, input_ids [1, n], attention_mask [1, n]): SmolLM2 on the chat prompt."""
    from mmspec.zoo.smollm2 import load_smollm2_drafter

    try:
        target, tokenizer = load_causal_lm()
    except ModelNotFoundError as exc:
        raise CLIError(EXIT_BAD_INPUT, f"{one_line(exc)} (or use --example for the built-in toy pair)") from None
    if args.prompt_lookup:
        drafter = "prompt_lookup"
    elif args.drafter:
        drafter = load("drafter model", args.drafter, hf_causal_lm)
    else:
        drafter = load_smollm2_drafter("head", target)
    enc = chat_inputs(tokenizer, [args.prompt or CHAT_PROMPT])
    return target, drafter, tokenizer, enc["input_ids"], enc["attention_mask"]


def _checkpoints(args: argparse.Namespace):
    """(target, drafter, tokenizer, input_ids [1, n], None): the HF checkpoints on a plain prompt."""
    target = load("target model", args.target, hf_causal_lm)
    drafter = "prompt_lookup" if args.prompt_lookup or not args.drafter else \
        load("drafter model", args.drafter, hf_causal_lm)
    tokenizer = load("tokenizer", args.tokenizer or args.target, hf_tokenizer)
    if not isinstance(drafter, str):
        mmspec.check_same_tokenizer(tokenizer, load("drafter tokenizer", args.drafter, hf_tokenizer))
    return target, drafter, tokenizer, tokenizer(args.prompt or "Once upon a time", return_tensors="pt").input_ids, None


def _example(args: argparse.Namespace):
    """(target, drafter, None, input_ids [1, n] byte ids, None): the toy pair."""
    target, drafter = example_models(args.seed)
    input_ids = torch.tensor([list((args.prompt or EXAMPLE_PROMPT).encode("utf-8"))], dtype=torch.long)
    return target, "prompt_lookup" if args.prompt_lookup else drafter, None, input_ids, None


def run(args: argparse.Namespace) -> int:
    _check(args)
    models = _example if args.example else _checkpoints if args.target else _smollm2
    target, drafter, tokenizer, input_ids, attention_mask = models(args)
    k = args.k
    if k is None and isinstance(drafter, FeatureDrafter):  # SmolLM2's shipped head: the calibrated shape
        from mmspec.zoo.smollm2 import calibrated_head_drafter, calibration_line

        drafter, k, cal = calibrated_head_drafter(target, tokenizer, drafter.head,
                                                  log=lambda m: print(m, file=sys.stderr, flush=True))
        print(calibration_line(cal))
    elif k is None:
        k = 3
    t0 = time.perf_counter()
    out = mmspec.generate(target, input_ids, attention_mask=attention_mask, drafter=drafter, num_draft_tokens=k,
                          generator=torch.Generator().manual_seed(args.seed), max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t_spec = time.perf_counter() - t0
    new = out.sequences[0, input_ids.shape[1]:]  # [new tokens]
    print("generated tokens:", new.tolist())
    if tokenizer is not None:
        print("generated text:", tokenizer.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("acceptance per draft position:", [round(a, 3) for a in out.stats.acceptance_per_position])
    if args.temperature != 0.0:
        return EXIT_OK
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = target.generate(input_ids, attention_mask=torch.ones_like(input_ids) if attention_mask is None
                              else attention_mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                              pad_token_id=target.generation_config.pad_token_id or 0)  # [1, n + new]
    t_ar = time.perf_counter() - t0
    same = ref.shape[1] <= out.sequences.shape[1] and torch.equal(ref, out.sequences[:, : ref.shape[1]])
    print(f"plain AR (HF generate): {t_ar:.2f}s; speculative: {t_spec:.2f}s; "
          f"speedup x{t_ar / t_spec:.2f}; identical to AR: {same}")
    return EXIT_OK if same else EXIT_NOT_IDENTICAL
