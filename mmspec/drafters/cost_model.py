"""A measured cost model of the target: what verifying w tokens costs relative to one, and how large a
draft tree should be this step.

Paper: the tree-size trade-off of EAGLE-2 (Li et al., EMNLP 2024) and Sequoia (Chen et al., 2024);
the expected accepted length of a tree is the sum of its nodes' path acceptance probabilities,
estimated by the drafter's own path confidences (EAGLE-2's observation that they are calibrated).

Glossary:
    widths, seconds   the target's cached forward time for w new tokens at a typical context,
                      measured once per machine and model (:func:`measure_cost_model`)
    relative(w)       seconds(w) / seconds(1), interpolated linearly between measured widths
    level_cost        one drafter expansion (one tree level) in target single-token forwards
    best_num_nodes    per step: with each row's candidates' path probabilities sorted high to low, the n
                      maximising  sum_rows (1 + cumsum_n) / (relative(n + 1) + depth * level_cost)
                      (expected tokens per unit of time; the +1 is the target's own token)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cache import CacheSession
from .model import model_device, model_vocab_size


@dataclass(frozen=True)
class CostModel:
    widths: tuple[int, ...]
    seconds: tuple[float, ...]
    level_cost: float = 0.0
    device: str = ""

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.seconds) or not self.widths or self.widths[0] != 1:
            raise ValueError("a cost model needs seconds for widths starting at 1")
        if any(not (s > 0) for s in self.seconds):
            raise ValueError(f"cost model seconds must be > 0, got {self.seconds}")

    def relative(self, w: int) -> float:
        """Cost of a w-token verification forward in single-token forwards (extrapolated linearly)."""
        ws, ss = self.widths, self.seconds
        if w <= ws[0]:
            return 1.0
        for (w0, s0), (w1, s1) in zip(zip(ws, ss), zip(ws[1:], ss[1:])):
            if w <= w1:
                return (s0 + (s1 - s0) * (w - w0) / (w1 - w0)) / ss[0]
        if len(ws) > 1:
            slope = (ss[-1] - ss[-2]) / (ws[-1] - ws[-2])
            return (ss[-1] + slope * (w - ws[-1])) / ss[0]
        return float(w)

    def best_num_nodes(self, path_probs: torch.Tensor, depth: int) -> int:
        """path_probs float [B, M] (each row's candidates' path probabilities); the tree size n <= M
        with the most expected tokens per unit of time."""
        m = path_probs.shape[1]
        if m == 0:
            return 0
        gain = path_probs.sort(dim=1, descending=True).values.cumsum(dim=1).sum(dim=0) + path_probs.shape[0]  # [M]
        cost = torch.tensor([self.relative(n + 1) + depth * self.level_cost for n in range(1, m + 1)],
                            dtype=gain.dtype)
        return int((gain / cost).argmax()) + 1

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        d = json.loads(Path(path).read_text())
        return cls(widths=tuple(d["widths"]), seconds=tuple(d["seconds"]), level_cost=d.get("level_cost", 0.0),
                   device=d.get("device", ""))


@torch.no_grad()
def measure_cost_model(target: torch.nn.Module, *, widths: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64),
                       context: int = 256, repeats: int = 5, level_seconds: float | None = None) -> CostModel:
    """Time the target's cached forward for each width (median of ``repeats``) at ``context`` tokens."""
    device = model_device(target)
    vocab = model_vocab_size(target) or 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context + max(widths)), generator=g).to(device)
    session = CacheSession(target, 1, device)
    session.extend(ids[:, :context], num_logits=1)
    seconds = []
    for w in widths:
        times = []
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            session.extend(ids[:, context:context + w])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            session.rollback(torch.full((1,), w, dtype=torch.long, device=device))
        seconds.append(sorted(times[1:])[len(times[1:]) // 2])
    level = 0.0 if level_seconds is None else level_seconds / seconds[0]
    return CostModel(widths=tuple(widths), seconds=tuple(seconds), level_cost=level,
                     device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
