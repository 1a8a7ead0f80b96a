"""Pipelined speculative decoding across processes and machines (torch.distributed, gloo): the target's
layers split into stages, one process each; rank 0 decodes with the one loop.

Paper: FlowSpec (arXiv 2507.02620). This package holds the pipeline itself, the naive pipelined speculative
decoding baseline (each draft travels the whole pipeline before the next is drafted) and FlowSpec
(:mod:`~mmspec.pipeline.flowspec`: streamed, pruned and growing draft trees).

    torchrun --nproc-per-node 2 -m mmspec pipeline --drafter truncated-tree     # naive, SmolLM2 over 2 stages
    torchrun --nproc-per-node 2 -m mmspec pipeline --flowspec --draft-model head   # FlowSpec with the EAGLE head
"""

from .plan import PipelineConfigError, StagePlan, plan_stages
from .run import generate, init_group, stage_for_rank
from .flowspec import FlowSpecConfig, FlowSpecOutput, FlowSpecStats
from .session import PipelineSession, PipelineStageError, serve_stage
from .stage import build_stage_model

__all__ = ["FlowSpecConfig", "FlowSpecOutput", "FlowSpecStats", "PipelineConfigError", "PipelineSession",
           "PipelineStageError", "StagePlan", "build_stage_model",
           "generate", "init_group", "plan_stages", "serve_stage", "stage_for_rank"]
