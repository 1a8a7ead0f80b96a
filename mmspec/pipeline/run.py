"""Launching the pipeline: process group, stage models, stage servers, and generation on rank 0.

Paper: FlowSpec (arXiv 2507.02620) runs one stage per device; here one per process (torchrun) or per thread.

Glossary:
    launch       ``torchrun --nproc-per-node N [--nnodes M ...] -m mmspec pipeline ...``: torchrun sets RANK,
                 WORLD_SIZE, MASTER_ADDR and MASTER_PORT; every process builds the same target, keeps its
                 stage (:func:`~mmspec.pipeline.stage.build_stage_model`) and joins a gloo group (NCCL is not
                 used: activations travel as CPU tensors); ranks >= 1 then :func:`serve_stage`
    in process   :class:`InProcessPipeline`: every stage in this process, ranks >= 1 as threads talking over an
                 :class:`~mmspec.pipeline.transport.InProcessGroup` (tests, debugging): the same protocol, stage
                 servers, timeouts and errors as the gloo launch
    generate     rank 0 runs the one decoding loop (:func:`mmspec.engine.decode`) with a
                 :class:`~mmspec.pipeline.session.PipelineSession` as the target and any drafter; the stages are
                 reached through ``transport`` (or, the torchrun form, ``world_size`` > 1: the default group)
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any, Sequence

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
from .server import StageServer
from .session import PipelineSession, stop_stages
from .stage import build_stage_model, stage_layers
from .transport import (DEFAULT_TIMEOUT_S, GlooTransport, InProcessGroup, PipelineStageError, Transport,
                        open_transport)


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


def _checked_plan(model: torch.nn.Module, world_size: int, plan: StagePlan | None) -> StagePlan:
    """``plan`` (default: layers split evenly over the world size), checked against the model and world size."""
    num_layers = len(stage_layers(model))
    plan = plan if plan is not None else plan_stages(num_layers, world_size)
    plan.check(num_layers, world_size)
    return plan


def stage_for_rank(model: torch.nn.Module, rank: int, world_size: int, plan: StagePlan | None = None) -> torch.nn.Module:
    """This rank's stage model, cut from ``model`` in place (``plan`` default: layers split evenly)."""
    return build_stage_model(model, _checked_plan(model, world_size, plan), rank, in_place=True)


def serve_stage(stage_model: torch.nn.Module, rank: int, world_size: int) -> int:
    """The torchrun form of a stage (rank >= 1): serve over the default gloo group until rank 0 stops the
    stages; the number of forwards run."""
    transport = GlooTransport()
    if (transport.rank, transport.world_size) != (rank, world_size):
        raise PipelineConfigError(f"rank {rank} of {world_size} asked, but this process is rank {transport.rank} of "
                                  f"{transport.world_size}")
    return StageServer(stage_model, transport).serve()


class InProcessPipeline:
    """Every stage in this process: rank 0 is the caller, ranks >= 1 are threads serving ``stages[1:]`` over an
    :class:`~mmspec.pipeline.transport.InProcessGroup`::

        with InProcessPipeline.split(model, 3) as pipe:
            out = generate(pipe.stage0, input_ids, transport=pipe.transport, vocab_size=V, ...)

    Leaving the block stops the stages (after an error: ends them) and joins their threads; a stage thread that
    raised makes rank 0's receives raise :class:`~mmspec.pipeline.transport.PipelineStageError` naming it."""

    def __init__(self, stages: Sequence[torch.nn.Module], *, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.stages = list(stages)
        self.group = InProcessGroup(len(self.stages), timeout_s)
        self.transport: Transport = self.group.transport(0)
        self.forwards: dict[int, int] = {}  # rank -> forwards run, once its server returned
        self.threads = [threading.Thread(target=self._serve, args=(rank,), name=f"mmspec-stage-{rank}", daemon=True)
                        for rank in range(1, len(self.stages))]

    @classmethod
    def split(cls, model: torch.nn.Module, world_size: int, plan: StagePlan | None = None, *,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> InProcessPipeline:
        """``model`` cut into ``world_size`` stages (copies: ``model`` stays whole)."""
        plan = _checked_plan(model, world_size, plan)
        return cls([build_stage_model(model, plan, s) for s in range(world_size)], timeout_s=timeout_s)

    @property
    def stage0(self) -> torch.nn.Module:
        return self.stages[0]

    def _serve(self, rank: int) -> None:
        try:
            self.forwards[rank] = StageServer(self.stages[rank], self.group.transport(rank)).serve()
        except BaseException as exc:  # noqa: BLE001 - recorded: every receive in the group then raises
            self.group.fail(rank, f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> InProcessPipeline:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is None:
                stop_stages(transport=self.transport)
        except PipelineStageError as stop_error:  # a stage died after its last answer
            exc = stop_error
            raise
        finally:
            if exc is not None:  # every stage thread's receive now raises: they end
                self.group.fail(0, f"{type(exc).__name__}: {exc}")
            for t in self.threads:
                t.join(timeout=self.group.timeout_s)


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
def generate(stage_model: torch.nn.Module, input_ids: torch.Tensor, *, vocab_size: int, world_size: int = 1,
             transport: Transport | None = None, drafter: Any = None, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, num_draft_tokens: int | None = 4, seed: int | list[int] | None = None,
             generator: torch.Generator | None = None, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generation_config: Any = None) -> GenerationOutput:
    """Rank 0: speculative decoding with the pipelined target (arguments as :func:`mmspec.generate`;
    ``drafter=None``: plain pipelined AR). The stages: ``transport``'s ranks >= 1, or (torchrun) ``world_size``
    > 1 ranks of the default gloo group; neither: ``stage_model`` is the whole target."""
    request = prepare_request(stage_model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, generator=generator, seed=seed, eos_token_id=eos_token_id,
                              attention_mask=attention_mask, num_draft_tokens=num_draft_tokens, vocab_size=None)
    drafter = prepare_drafter(drafter, request, num_draft_tokens=num_draft_tokens)
    session = PipelineSession(stage_model, request.batch_size, request.device, vocab_size=vocab_size,
                              transport=open_transport(world_size, transport))

    def stream():
        stats = GenerationStats()
        prefill_pipeline(session, drafter, request.input_ids, request.attention_mask, request.sampling, request.rng)
        yield from decode(session, drafter, request.input_ids[:, -1:], max_new_tokens=request.budgets,
                          sampling=request.sampling, rule=default_rule(request.sampling), rng=request.rng,
                          eos=request.eos, stats=stats)

    out = collect_output(stream(), request.input_ids, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         generation_config=generation_config)
    session.close()
    return out


__all__ = ["DEFAULT_TIMEOUT_S", "InProcessPipeline", "generate", "init_group", "model_vocab_size", "serve_stage",
           "stage_for_rank"]
