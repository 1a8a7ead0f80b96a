"""Pipelined speculative decoding across processes and machines (torch.distributed, gloo): the target's
layers split into stages, one process each; rank 0 decodes with the one loop.

Paper: FlowSpec (arXiv 2507.02620). This package holds the pipeline itself, the naive pipelined speculative
decoding baseline (each draft travels the whole pipeline before the next is drafted) and FlowSpec
(:mod:`~mmspec.pipeline.flowspec`: streamed, pruned and growing draft trees).

Glossary (one concept per module):
    plan         which layers each stage holds (:mod:`~mmspec.pipeline.plan`)
    stage model  one stage's share of the target (:mod:`~mmspec.pipeline.stage`)
    protocol     the messages between ranks, one dataclass per command and reply (:mod:`~mmspec.pipeline.protocol`)
    transport    how they travel: gloo between processes, or queues between threads of one process
                 (:mod:`~mmspec.pipeline.transport`)
    server       a stage rank's command loop (:mod:`~mmspec.pipeline.server`)
    session      rank 0's view of the stages as one target session (:mod:`~mmspec.pipeline.session`)
    run          launching, and generation on rank 0 (:mod:`~mmspec.pipeline.run`)

    torchrun --nproc-per-node 2 -m mmspec pipeline --drafter truncated-tree     # naive, SmolLM2 over 2 stages
    torchrun --nproc-per-node 2 -m mmspec pipeline --flowspec --draft-model head   # FlowSpec with the EAGLE head
"""

from .plan import PipelineConfigError, StagePlan, plan_stages
from .run import InProcessPipeline, generate, init_group, serve_stage, stage_for_rank
from .flowspec import FlowSpecConfig, FlowSpecOutput, FlowSpecStats
from .server import StageServer
from .session import PipelineSession, collect_stage_stats, stop_stages
from .stage import build_stage_model
from .transport import GlooTransport, InProcessGroup, PipelineStageError, Transport

__all__ = ["FlowSpecConfig", "FlowSpecOutput", "FlowSpecStats", "GlooTransport", "InProcessGroup",
           "InProcessPipeline", "PipelineConfigError", "PipelineSession", "PipelineStageError", "StagePlan",
           "StageServer", "Transport", "build_stage_model", "collect_stage_stats", "generate", "init_group",
           "plan_stages", "serve_stage", "stage_for_rank", "stop_stages"]
