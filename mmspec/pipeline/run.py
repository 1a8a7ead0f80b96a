"""Launching the pipeline: process group, stage models, and generation on rank 0.

Glossary:
    launch       ``torchrun --nproc-per-node N [--nnodes M ...] -m mmspec pipeline ...``: torchrun sets RANK,
                 WORLD_SIZE, MASTER_ADDR and MASTER_PORT; every process builds the same target, keeps its
                 stage (:func:`~mmspec.pipeline.stage.build_stage_model`) and joins a gloo group (NCCL is not
                 used: activations travel as CPU tensors)
    generate     rank 0 runs the one decoding loop (:func:`mmspec.engine.decode`) with a
                 :class:`~mmspec.pipeline.session.PipelineSession` as the target and any drafter
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from ..config import SamplingParams
from ..drafters.model import model_vocab_size
from ..engine import GenerationOutput, collect_output, decode
from ..request import prepare_drafter, prepare_request
from ..rng import RowRandom
from ..stats import GenerationStats
from ..verify.chain import default_rule
from .plan import PipelineConfigError, StagePlan, plan_stages
from .session import PipelineSession, serve_stage
from .stage import build_stage_model, decoder_layers

DEFAULT_TIMEOUT_S = 60.0


def init_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the gloo process group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    (rank, world size). Every later receive waits at most ``timeout_s``."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise PipelineConfigError(f"not launched by torchrun: {', '.join(missing)} not set "
                                  "(run `torchrun --nproc-per-node N -m mmspec pipeline ...`)")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def stage_for_rank(model: torch.nn.Module, rank: int, world_size: int, plan: StagePlan | None = None) -> torch.nn.Module:
    """This rank's stage model (``plan`` default: layers split evenly over the world size)."""
    num_layers = len(decoder_layers(model))
    plan = plan if plan is not None else plan_stages(num_layers, world_size)
    plan.check(num_layers, world_size)
    return build_stage_model(model, plan, rank, in_place=True)


def prefill_pipeline(session: PipelineSession, drafter: Any, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, sampling: SamplingParams, rng: RowRandom) -> None:
    """The target's and the drafter's prefill; a feature drafter gets the prompt's hidden states."""
    layers = tuple(drafter.hidden_layers)
    if layers:
        session.set_features(layers)
    if input_ids.shape[1] > 1:
        session.extend(input_ids[:, :-1], attention_mask[:, :-1], num_logits=1, hidden_layers=layers)
    drafter.start(input_ids, attention_mask, sampling=sampling, rng=rng)
    if layers:
        drafter.observe_prefill(session.last_hidden if input_ids.shape[1] > 1 else None)


@torch.no_grad()
def generate(stage_model: torch.nn.Module, input_ids: torch.Tensor, *, world_size: int, vocab_size: int,
             drafter: Any = None, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, num_draft_tokens: int | None = 4, seed: int | list[int] | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generation_config: Any = None) -> GenerationOutput:
    """Rank 0: speculative decoding with the pipelined target (arguments as :func:`mmspec.generate`;
    ``drafter=None``: plain pipelined AR)."""
    request = prepare_request(stage_model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, generator=generator, seed=seed, eos_token_id=eos_token_id,
                              attention_mask=attention_mask, num_draft_tokens=num_draft_tokens, vocab_size=None)
    drafter = prepare_drafter(drafter, request, num_draft_tokens=num_draft_tokens)
    session = PipelineSession(stage_model, request.batch_size, request.device, world_size=world_size,
                              vocab_size=vocab_size)

    def stream():
        stats = GenerationStats()
        prefill_pipeline(session, drafter, request.input_ids, request.attention_mask, request.sampling, request.rng)
        yield from decode(session, drafter, request.input_ids[:, -1:], max_new_tokens=request.budgets,
                          sampling=request.sampling, rule=default_rule(request.sampling), rng=request.rng,
                          eos=request.eos, stats=stats)

    return collect_output(stream(), request.input_ids, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                          generation_config=generation_config)


__all__ = ["DEFAULT_TIMEOUT_S", "generate", "init_group", "model_vocab_size", "serve_stage", "stage_for_rank"]
