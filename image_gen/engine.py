"""The image-token decoding loop: AR, or speculative with any image drafter and acceptance rule.

Glossary:
    step            one target forward over [pending, drafted...] for every image, then one
                    ``verify_chain`` on the guided logits (k = 0 drafts is plain AR sampling)
    acceptance map  float [H, W]: fraction of images whose token at (h, w) was a drafted token the
                    rule accepted (the rest were sampled by the target: recovered or bonus)

The loop talks to models only through :class:`~mmspec.image_gen.guided.GuidedSession` and to the
drafter through :class:`~mmspec.image_gen.drafting.ImageDrafter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.base import Draft
from mmspec.engine import commit_row
from mmspec.stats import GenerationStats
from mmspec.verify.chain import verify_chain
from mmspec.verify.rule import AcceptRule

from .drafting import GuidanceSpec, ImageDrafter, ImageStepOutcome
from .guided import GuidedSession


@dataclass
class ImageGenerationStats(GenerationStats):
    accepted_map: torch.Tensor | None = None  # float [H, W]: fraction of images with a drafted token kept
    target_forwards: int = 0  # batched target calls including the prefill
    images: int = 0

    @property
    def tokens_per_forward(self) -> float:
        """Image tokens emitted per target forward an image took part in (tau for chain methods)."""
        return self.emitted_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def target_forwards_per_image(self) -> float:
        """Target forward passes each image took part in (verification steps, plus the prefill
        when the prefix has more than one token), averaged over images; batch-size independent."""
        prefill = self.target_forwards - self.steps
        return self.row_steps / self.images + prefill if self.images else 0.0

    def as_dict(self) -> dict:
        d = super().as_dict()
        d["accepted_map"] = None if self.accepted_map is None else self.accepted_map.tolist()
        d["target_forwards_per_image"] = self.target_forwards_per_image
        d["tokens_per_forward"] = self.tokens_per_forward
        return d


@dataclass(frozen=True)
class ImageStepEvent:
    step: int
    rows: list[int]
    tokens: list[list[int]]
    num_accepted: list[int]
    finished: list[bool]
    stats: ImageGenerationStats


@torch.no_grad()
def decode_image_tokens(target: torch.nn.Module, guidance: GuidanceSpec, *, drafter: ImageDrafter | None,
                        rule: AcceptRule, sampling: SamplingParams, generator: torch.Generator | None,
                        grid: int) -> Iterator[ImageStepEvent]:
    """Yield one event per step; the final event's stats hold the acceptance map."""
    stats = ImageGenerationStats(images=len(guidance.cond))
    t_start = time.perf_counter()
    total = guidance.num_tokens
    target_s = GuidedSession(target, guidance.cond, guidance.uncond, guidance.cfg_scale, guidance.schedule, total)
    device = target_s.pending.device
    stats.prefill_time = time.perf_counter() - t_start
    if drafter is not None:
        t0 = time.perf_counter()
        drafter.start(guidance, sampling=sampling, generator=generator)
        stats.drafter_prefill_time = time.perf_counter() - t0
        stats.drafter_time += stats.drafter_prefill_time
    n_img = len(guidance.cond)
    accepted_flags = torch.zeros((n_img, total), dtype=torch.float32)
    generated: list[list[int]] = [[] for _ in range(n_img)]
    active = list(range(n_img))
    step = 0
    while active:
        step_rows = list(active)
        next_pos = torch.tensor([len(generated[r]) for r in active], dtype=torch.long, device=device)
        remaining = [total - len(generated[r]) for r in active]
        t0 = time.perf_counter()
        if drafter is None:
            draft = Draft(tokens=torch.zeros((len(active), 0), dtype=torch.long, device=device), probs=None,
                          num_draft=torch.zeros((len(active),), dtype=torch.long, device=device))
        else:
            draft = drafter.propose(max(1, max(remaining) - 1), next_pos)
        t1 = time.perf_counter()
        k = draft.k
        pos = next_pos.unsqueeze(1) + torch.arange(k + 1, device=device)  # image index each column predicts
        logits = target_s.extend_after_pending(draft.tokens, pos)  # [B, k+1, V]
        t2 = time.perf_counter()
        result = verify_chain(draft.tokens, draft.probs, logits, rule, sampling, generator, num_draft=draft.num_draft)
        n_acc = result.num_accepted.tolist()
        out = result.tokens.tolist()
        t3 = time.perf_counter()
        target_s.rollback(k - result.num_accepted)
        committed, finished = [], []
        for i, row in enumerate(active):
            toks, done = commit_row(out[i], n_acc[i], remaining[i])
            start = len(generated[row])
            accepted_flags[row, start: start + min(n_acc[i], len(toks))] = 1.0
            generated[row].extend(toks)
            committed.append(toks)
            finished.append(done)
        target_s.set_pending([[c[-1]] for c in committed])
        if drafter is not None:
            drafter.observe(ImageStepOutcome(draft=draft, result=result, committed=committed, target_logits=logits))
        t4 = time.perf_counter()
        stats.drafter_time += (t1 - t0) + (t4 - t3)
        stats.target_time += t2 - t1
        stats.verify_time += t3 - t2
        stats.record(n_acc, draft.num_draft.tolist(), [len(c) for c in committed])
        stats.target_calls = stats.target_forwards = target_s.calls
        stats.drafter_calls = 0 if drafter is None else drafter.num_calls
        stats.total_time = time.perf_counter() - t_start
        if all(len(g) >= total for g in generated):
            stats.accepted_map = accepted_flags.mean(dim=0).view(grid, grid)
        yield ImageStepEvent(step=step, rows=step_rows, tokens=committed, num_accepted=n_acc,
                             finished=finished, stats=stats)
        step += 1
        if any(finished):
            keep = [i for i, f in enumerate(finished) if not f]
            active = [active[i] for i in keep]
            if keep:
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                target_s.select_rows(rows)
                if drafter is not None:
                    drafter.select_rows(rows)
    stats.total_time = time.perf_counter() - t_start
