"""``mmspec pipeline``, launched as ``torchrun --nproc-per-node N -m mmspec pipeline ...``: the target split over
N stage processes (gloo), rank 0 decoding (plain pipelined AR, naive pipelined speculative decoding with a drafter
on rank 0, or FlowSpec) (:mod:`mmspec.pipeline`).

Glossary:
    rank      every process parses the same arguments and builds the same target; rank 0 keeps stage 0, the
              drafter and the decoding loop, ranks 1 .. N-1 serve their stage until rank 0 stops them
    target    SmolLM2-135M-Instruct on a chat prompt, or ``--example``: a tiny random Llama (:func:`_example_target`,
              the same on every rank and in the tests) on ``--prompt-ids``
    drafter   ``--drafter``: none (pipelined AR), prompt-lookup, truncated (chains) or truncated-tree (an EAGLE-2
              dynamic tree of 8 nodes) drafted by ``--draft-model``: the target's first ``--draft-layers`` layers,
              SmolLM2's shipped distilled drafter, or an EAGLE-3 head (:func:`_head`)
    result    rank 0 prints one JSON line (with the text when there is a tokenizer) and writes it to ``--out``
    failures  a plan that does not fit the model or the processes: ``EXIT_BAD_INPUT``; a stage that dies or stops
              answering within ``--timeout``: ``EXIT_STAGE``, one line from every process that notices
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from mmspec.cpu_packing import pack_linear_weights
from mmspec.drafters.feature import FeatureDrafter
from mmspec.drafters.model import ModelDrafter
from mmspec.drafters.tree import DynamicTree
from mmspec.errors import MMSpecError
from mmspec.heads.eagle3 import Eagle3Config, Eagle3Head
from mmspec.pretrained import chat_inputs, load_causal_lm

from .common import (CHAT_PROMPT, EXIT_BAD_INPUT, EXIT_OK, EXIT_STAGE, add_pack_flag, add_sampling_flags,
                     add_subcommand, check_sampling, toy_llama)

DRAFTERS = ("none", "prompt-lookup", "truncated", "truncated-tree")


def _errors() -> tuple:
    """A dead or silent stage has its own code; a bad plan (and any other library error) is bad input."""
    from mmspec.pipeline import PipelineStageError

    return (PipelineStageError, EXIT_STAGE), (MMSpecError, EXIT_BAD_INPUT)


def _close_group() -> None:
    """Leave the process group (after the error line, if any, is printed)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer can make the teardown itself fail
            pass


def comma_separated_ints(text: str) -> tuple[int, ...]:
    """``"0,10,30"`` -> ``(0, 10, 30)`` (ValueError, an argparse usage error, otherwise)."""
    return tuple(int(x) for x in text.split(","))


def add_parser(subparsers) -> None:
    p = add_subcommand(subparsers, "pipeline", run, errors=_errors, cleanup=_close_group,
                       help="the target split over torchrun processes (pipelined SD, FlowSpec): "
                            "torchrun --nproc-per-node N -m mmspec pipeline ...",
                       description="The target split over N processes (gloo), rank 0 decoding: plain pipelined AR, "
                                   "naive pipelined speculative decoding or FlowSpec. Launch every process with "
                                   "torchrun --nproc-per-node N -m mmspec pipeline ...")
    p.add_argument("--example", action="store_true", help="a tiny random Llama (tests) instead of SmolLM2")
    p.add_argument("--example-layers", type=int, default=4)
    p.add_argument("--plan", type=comma_separated_ints, default=None,
                   help="stage boundaries, e.g. 0,10,30 (default: even split)")
    p.add_argument("--drafter", default="none", choices=DRAFTERS, type=lambda s: s.replace("_", "-"),
                   help="none: pipelined AR; truncated: the target's first layer as a drafter on rank 0 (chains, or "
                        "an EAGLE-2 dynamic tree of 8 nodes); prompt_lookup is accepted for prompt-lookup")
    p.add_argument("--draft-layers", type=int, default=1, help="layers of the truncated drafter")
    p.add_argument("--flowspec", action="store_true",
                   help="FlowSpec: stream score-ordered segments of a growing draft tree through the stages "
                        "(the truncated drafter; batch 1)")
    p.add_argument("--segment-size", type=int, default=4)
    p.add_argument("--max-in-flight", type=int, default=None, help="segments in flight (default: one per stage)")
    p.add_argument("--top-k", dest="tree_top_k", metavar="N", type=int, default=3,
                   help="FlowSpec: children per expanded node of the draft tree (not a sampling cut)")
    p.add_argument("--max-nodes", type=int, default=64, help="FlowSpec: nodes per draft tree")
    p.add_argument("--draft-model", default="truncated", choices=["truncated", "distilled", "head"],
                   help="the target's first --draft-layers layers; SmolLM2's shipped distilled 2-layer drafter; or an "
                        "EAGLE-3 head reading the target's hidden states (SmolLM2: the shipped head; --example: a "
                        "random one)")
    add_pack_flag(p, default=False)
    p.add_argument("--draws", type=int, default=1, help="FlowSpec: generations with seeds seed, seed + 1, ... "
                   "(sampling tests; all_tokens in the result)")
    p.add_argument("--prompt-ids", type=comma_separated_ints, default="5,17,33,9,41,12",
                   help="--example: comma-separated ids")
    p.add_argument("--prompt", default=CHAT_PROMPT, help="the chat turn (SmolLM2)")
    p.add_argument("--batch", type=int, default=1, help="--example: rows of the same prompt (sampling tests)")
    add_sampling_flags(p, max_new_tokens=32, k=4, temperature=0.0, seed=0)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds any stage waits for another (default: mmspec.pipeline.run.DEFAULT_TIMEOUT_S)")
    p.add_argument("--die-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: rank 1 exits after n forwards
    p.add_argument("--out", default=None, help="also write the result (JSON) to this file (rank 0)")


def _example_target(seed: int, layers: int) -> torch.nn.Module:
    """A tiny random Llama (the same on every rank: built from the seed)."""
    return toy_llama(seed, vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     initializer_range=0.2, max_position_embeddings=512)


def _head(target: torch.nn.Module, example: bool) -> FeatureDrafter:
    """An EAGLE-3 feature drafter: SmolLM2's shipped head, or (``--example``) a random head (seeded, so the
    same on every run) over the tiny target."""
    if not example:
        from mmspec.zoo.smollm2 import load_smollm2_drafter

        return load_smollm2_drafter("head", target, draft_length=4)
    torch.manual_seed(1)
    vocab = int(target.config.vocab_size)
    d2t = torch.randperm(vocab)[:64].sort().values  # [64] draft-vocabulary ids -> target ids
    head = Eagle3Head(Eagle3Config.from_target(target, d2t.numel()), d2t=d2t).eval()
    head.init_from_target(target)
    return FeatureDrafter(head.attach(target), 4)


def _target(a: argparse.Namespace):
    """(target, tokenizer or None, input_ids [batch, n], attention_mask [batch, n] or None), the same on every rank."""
    if a.example:
        target = _example_target(0, a.example_layers)  # the same weights on every rank and in the tests
        return target, None, torch.tensor([a.prompt_ids]).expand(a.batch, -1).contiguous(), None
    target, tokenizer = load_causal_lm()
    enc = chat_inputs(tokenizer, [a.prompt])
    return target, tokenizer, enc["input_ids"], enc["attention_mask"]


def _drafter(a: argparse.Namespace, target: torch.nn.Module) -> Any:
    """Rank 0's drafter (None: pipelined AR), built before the target is cut to stage 0."""
    if a.drafter == "prompt-lookup" and not a.flowspec:
        return "prompt_lookup"
    if a.drafter not in ("truncated", "truncated-tree") and not a.flowspec:
        return None
    if a.draft_model == "head":
        draft_model = _head(target, a.example)
    else:
        if a.draft_model == "distilled" and not a.example:
            from mmspec.zoo.smollm2 import load_smollm2_drafter

            draft_model = load_smollm2_drafter("model", target)
        else:
            from mmspec.truncate import truncated_copy

            draft_model = truncated_copy(target, a.draft_layers)
        if a.pack:
            pack_linear_weights(draft_model)
    if a.drafter == "truncated-tree" and not a.flowspec:
        tree = DynamicTree(depth=3, top_k=3, num_nodes=8)
        return FeatureDrafter(draft_model.head, tree=tree) if a.draft_model == "head" else \
            ModelDrafter(draft_model, tree=tree)
    return draft_model


def run(a: argparse.Namespace) -> int:
    from mmspec.pipeline import StagePlan
    from mmspec.pipeline.run import DEFAULT_TIMEOUT_S, init_group, serve_stage, stage_for_rank

    check_sampling(a)
    rank, world = init_group(DEFAULT_TIMEOUT_S if a.timeout is None else a.timeout)
    target, tokenizer, input_ids, attention_mask = _target(a)
    vocab = int(target.config.vocab_size)
    drafter = _drafter(a, target) if rank == 0 else None
    eos = target.generation_config.eos_token_id
    stage = stage_for_rank(target, rank, world, StagePlan(a.plan) if a.plan else None)
    if a.pack:
        pack_linear_weights(stage)
    if rank > 0:
        if a.die_after and rank == 1:
            _die_after(stage, a.die_after)
        serve_stage(stage, rank, world)
        return EXIT_OK
    decode = _flowspec if a.flowspec else _pipelined
    result, new = decode(a, stage, input_ids, attention_mask, world, vocab, drafter, eos)
    if tokenizer is not None:
        result["text"] = tokenizer.decode(new, skip_special_tokens=True)
    print(json.dumps(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f)
    return EXIT_OK


def _pipelined(a, stage, input_ids, attention_mask, world, vocab, drafter, eos) -> tuple[dict, list[int]]:
    """Rank 0: pipelined AR / naive pipelined speculative decoding; (result, rank 0's new tokens)."""
    from mmspec.pipeline.run import generate
    from mmspec.pipeline.session import stop_stages

    t0 = time.perf_counter()
    out = generate(stage, input_ids, world_size=world, vocab_size=vocab, drafter=drafter,
                   max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                   num_draft_tokens=a.k, eos_token_id=eos, attention_mask=attention_mask)
    seconds = time.perf_counter() - t0
    stop_stages(world)
    new = out.sequences[0, input_ids.shape[1]:].tolist()
    return {"tokens": new, "seconds": seconds,
            "all_tokens": out.sequences[:, input_ids.shape[1]:].tolist() if a.batch > 1 else None, "stages": world,
            "steps": out.stats.steps, "accepted": out.stats.accepted_tokens,
            "drafted": out.stats.drafted_tokens}, new


def _flowspec(a, stage, input_ids, attention_mask, world, vocab, drafter, eos) -> tuple[dict, list[int]]:
    """Rank 0: FlowSpec, ``--draws`` times (seeds seed, seed + 1, ...); (result, the first draw's new tokens)."""
    from mmspec.pipeline.flowspec import FlowSpecConfig, generate
    from mmspec.pipeline.session import stop_stages

    config = FlowSpecConfig(segment_size=a.segment_size, max_in_flight=a.max_in_flight, top_k=a.tree_top_k,
                            max_nodes=a.max_nodes)
    t0 = time.perf_counter()
    draws = []
    for i in range(max(1, a.draws)):
        out = generate(stage, input_ids[:1], world_size=world, vocab_size=vocab, drafter=drafter, config=config,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed + i,
                       eos_token_id=eos, attention_mask=None if attention_mask is None else attention_mask[:1],
                       collect_stage_stats=i == a.draws - 1 or a.draws <= 1)
        draws.append(out.sequences[0, input_ids.shape[1]:].tolist())
    seconds = time.perf_counter() - t0
    stop_stages(world)
    st = out.stats
    return {"tokens": draws[0], "all_tokens": draws if a.draws > 1 else None, "seconds": seconds, "stages": world,
            "rounds": st.rounds, "segments": st.segments, "accepted": st.accepted_tokens,
            "nodes_sent": st.nodes_sent, "killed_in_flight": st.killed_in_flight,
            "pruned_in_flight": st.pruned_in_flight, "time_split": st.time_split, "stage_stats": st.stages}, draws[0]


def _die_after(stage: torch.nn.Module, forwards: int) -> None:
    """Tests: make this process exit (as if killed) after ``forwards`` forwards."""
    count = {"n": 0}
    original = stage.forward

    def forward(*args, **kwargs):
        count["n"] += 1
        if count["n"] > forwards:
            os._exit(9)
        return original(*args, **kwargs)

    stage.forward = forward
