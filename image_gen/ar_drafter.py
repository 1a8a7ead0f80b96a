"""Drafting image tokens with a smaller AR image model under the same CFG as the target.

Paper: Leviathan et al. (ICML 2023) applied to AR image models (as in LANTERN's baselines).

Glossary: the drafter keeps its own :class:`~mmspec.image_gen.guided.GuidedSession` (conditional
and unconditional halves), samples each drafted token from its *guided*, processed distribution
(same cfg scale, schedule, temperature, top-k, top-p as the target) and returns those
distributions so the exact rule stays lossless.
"""

from __future__ import annotations

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.adaptive import DraftLengthPolicy, as_policy
from mmspec.drafters.base import Draft
from mmspec.errors import VocabularyMismatchError
from mmspec.sampling import logits_to_probs, sample

from .drafting import GuidanceSpec, ImageDrafter, ImageStepOutcome
from .guided import GuidedSession


class ARDrafter(ImageDrafter):
    def __init__(self, model: torch.nn.Module, draft_length: int | DraftLengthPolicy = 4):
        self.model = model
        self.policy = as_policy(draft_length)
        self.g: GuidedSession | None = None

    def check_compatible(self, target: torch.nn.Module) -> None:
        a, b = target.config, self.model.config
        if a.codebook_size != b.codebook_size:
            raise VocabularyMismatchError(
                f"drafter codebook size {b.codebook_size} != target codebook size {a.codebook_size}")
        if (a.num_classes, tuple(a.words)) != (b.num_classes, tuple(b.words)):
            raise VocabularyMismatchError("drafter and target use different conditions (classes or prompt words)")

    @property
    def num_calls(self) -> int:
        return 0 if self.g is None else self.g.calls

    def start(self, guidance: GuidanceSpec, *, sampling: SamplingParams, generator: torch.Generator | None) -> None:
        self.sampling, self.generator = sampling, generator
        self.g = GuidedSession(self.model, guidance.cond, guidance.uncond, guidance.cfg_scale, guidance.schedule,
                               guidance.num_tokens)
        self.fed = 0

    @torch.no_grad()
    def propose(self, max_tokens: int, next_pos: torch.Tensor) -> Draft:
        assert self.g is not None
        k = max(1, min(self.policy.current(), max_tokens))
        tokens, probs = [], []
        for i in range(k):
            pos = (next_pos + i).unsqueeze(1)  # [B, 1]
            if i == 0:
                logits = self.g.extend(self.g.pending, pos.expand(-1, self.g.pending.shape[1]), self.g.pending_valid)
            else:
                logits = self.g.extend(self.g.both(tokens[-1].unsqueeze(1)), pos)
            p = logits_to_probs(logits[:, -1], self.sampling)
            tokens.append(sample(p, self.sampling, self.generator))
            probs.append(p)
        self.fed = k - 1
        draft_probs = None if self.sampling.is_greedy else torch.stack(probs, dim=1)
        num = torch.full((len(tokens[0]),), k, dtype=torch.long, device=next_pos.device)
        return Draft(tokens=torch.stack(tokens, dim=1), probs=draft_probs, num_draft=num)

    def observe(self, outcome: ImageStepOutcome) -> None:
        assert self.g is not None
        n = outcome.result.num_accepted
        kept = n.clamp_max(self.fed)
        self.g.rollback(self.fed - kept)
        self.g.set_pending([row[m:] for row, m in zip(outcome.committed, kept.tolist())])
        self.policy.update(n, outcome.draft.num_draft)

    def select_rows(self, rows: torch.Tensor) -> None:
        assert self.g is not None
        self.g.select_rows(rows)
