"""Prompt-lookup drafting: copy the continuation of an earlier n-gram match in the context.

Reference: Saxena, "Prompt Lookup Decoding" (2023), as shipped in HF transformers
(``prompt_lookup_num_tokens=``); the search order matches HF's: n-gram sizes from
``max_ngram_size`` down to 1, earliest match first.

Glossary:
    context   a row's valid prompt tokens followed by every token it has committed
    n-gram    the last n tokens of the context, searched for earlier in the context
    draft     up to k tokens that followed the match; deterministic (no probabilities)
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import SamplingParams
from ..errors import InvalidDraftLengthError
from .adaptive import DraftLengthPolicy, as_policy
from .base import Draft, Drafter, StepOutcome, widest_budget


def find_candidate(context: list[int], max_ngram_size: int, num_tokens: int) -> list[int]:
    """Continuation of the earliest earlier match of the context's last n-gram (n descending)."""
    length = len(context)
    for n in range(min(max_ngram_size, length - 1), 0, -1):
        tail = context[length - n:]
        for start in range(0, length - n):
            if context[start:start + n] == tail:
                cont = context[start + n:start + n + num_tokens]
                if cont:
                    return cont
    return []


class PromptLookupDrafter(Drafter):
    """Deterministic n-gram drafter that needs no model."""

    def __init__(self, max_ngram_size: int = 2, draft_length: int | DraftLengthPolicy | None = None):
        if not isinstance(max_ngram_size, int) or max_ngram_size < 1:
            raise InvalidDraftLengthError(f"max_ngram_size must be an int >= 1, got {max_ngram_size!r}")
        self.max_ngram_size = max_ngram_size
        self.policy: DraftLengthPolicy | None = None if draft_length is None else as_policy(draft_length)
        self._own_policy = draft_length is not None

    def set_default_length(self, k: int | DraftLengthPolicy) -> None:
        """Use the call's draft length unless one was given at construction."""
        if not self._own_policy:
            self.policy = as_policy(k)

    def start(self, input_ids, attention_mask, *, sampling: SamplingParams, rng: Any = None,
              guidance: Any = None, **model_inputs: Any) -> None:
        if self.policy is None:
            raise RuntimeError("PromptLookupDrafter has no draft length: pass draft_length or num_draft_tokens")
        self.device = input_ids.device
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        self.contexts = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]

    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        assert self.policy is not None
        k = max(1, min(self.policy.current(), widest_budget(max_tokens)))
        found = [find_candidate(c, self.max_ngram_size, k) for c in self.contexts]
        width = max(1, max(len(f) for f in found))
        tokens = torch.zeros((len(found), width), dtype=torch.long)
        for b, f in enumerate(found):
            if f:
                tokens[b, :len(f)] = torch.tensor(f, dtype=torch.long)
        num_draft = torch.tensor([len(f) for f in found], dtype=torch.long)
        return Draft(tokens=tokens.to(self.device), probs=None, num_draft=num_draft.to(self.device))

    def observe(self, outcome: StepOutcome) -> None:
        assert self.policy is not None
        for ctx, new in zip(self.contexts, outcome.committed):
            ctx.extend(new)
        self.policy.update(outcome.result.num_accepted, outcome.draft.num_draft)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.contexts = [self.contexts[i] for i in rows.tolist()]
