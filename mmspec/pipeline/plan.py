"""Which target layers each pipeline stage holds.

Paper: FlowSpec (arXiv 2507.02620) splits the target into contiguous layer ranges, one per device.

Glossary:
    stage        one process holding a contiguous range of the target's decoder layers; stage 0 also holds
                 the token embedding (and the drafter), the last stage the final norm and the LM head
    plan         the layer ranges, as boundaries ``(0, b_1, .., b_{N-1}, L)``: stage s holds ``[b_s, b_{s+1})``
    cost-balanced  boundaries chosen so that the most expensive stage (sum of its layer costs, plus the
                 embedding on stage 0 and the head on the last) is as cheap as possible
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import MMSpecError


class PipelineConfigError(MMSpecError):
    """A launch the pipeline cannot run: more stages than layers, a world size that does not match the plan,
    a plan that does not cover the layers, a model family it cannot split."""


@dataclass(frozen=True)
class StagePlan:
    boundaries: tuple[int, ...]  # (0, b_1, .., L): stage s holds layers [boundaries[s], boundaries[s+1])

    def __post_init__(self) -> None:
        b = tuple(self.boundaries)
        if len(b) < 2 or b[0] != 0 or any(y <= x for x, y in zip(b, b[1:])):
            raise PipelineConfigError(f"a plan's boundaries must rise strictly from 0, one range per stage, got {list(b)}")
        object.__setattr__(self, "boundaries", b)

    @property
    def num_stages(self) -> int:
        return len(self.boundaries) - 1

    @property
    def num_layers(self) -> int:
        return self.boundaries[-1]

    def layers(self, stage: int) -> range:
        return range(self.boundaries[stage], self.boundaries[stage + 1])

    def check(self, num_layers: int, world_size: int | None = None) -> None:
        """:class:`PipelineConfigError` unless the plan covers ``num_layers`` and has ``world_size`` stages."""
        if self.num_layers != num_layers:
            raise PipelineConfigError(f"the plan covers {self.num_layers} layers but the model has {num_layers}")
        if world_size is not None and world_size != self.num_stages:
            raise PipelineConfigError(f"the plan has {self.num_stages} stages but {world_size} processes were "
                                      f"launched (torchrun --nproc-per-node x --nnodes must equal the stages)")


def plan_stages(num_layers: int, num_stages: int, *, layer_costs: Sequence[float] | None = None,
                first_extra: float = 0.0, last_extra: float = 0.0) -> StagePlan:
    """A cost-balanced plan: contiguous ranges minimising the most expensive stage (exact, by dynamic
    programming). ``layer_costs`` default to 1 per layer; ``first_extra`` / ``last_extra``: the embedding (and
    drafter) on stage 0 and the final norm + LM head on the last stage, in the same units."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise PipelineConfigError(f"the number of stages must be an int >= 1, got {num_stages!r}")
    if num_stages > num_layers:
        raise PipelineConfigError(f"{num_stages} stages cannot split {num_layers} layers (at most one stage per layer)")
    costs = list(layer_costs) if layer_costs is not None else [1.0] * num_layers
    if len(costs) != num_layers:
        raise PipelineConfigError(f"{len(costs)} layer costs for {num_layers} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][j]: the cheapest maximum stage cost splitting layers [0, j) into s stages; cut[s][j]: last boundary
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, num_layers + 1):
            for i in range(s - 1, j):
                stage = prefix[j] - prefix[i] + (first_extra if i == 0 else 0.0) + (last_extra if j == num_layers and s == num_stages else 0.0)
                value = max(best[s - 1][i], stage)
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds = [num_layers]
    j = num_layers
    for s in range(num_stages, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    return StagePlan(tuple(reversed(bounds)))
