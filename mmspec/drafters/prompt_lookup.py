"""Prompt-lookup drafting: copy the continuation of an earlier n-gram match in the context.

Reference: Saxena, "Prompt Lookup Decoding" (2023), as shipped in HF transformers
(``prompt_lookup_num_tokens=``); the search order matches HF's: n-gram sizes from
``max_ngram_size`` down to 1, earliest match first.

Glossary:
    context   a row's valid prompt tokens followed by every token it has committed
    n-gram    the last n tokens of the context (``min_ngram_size`` <= n <= ``max_ngram_size``), searched for
              earlier in the context
    draft     up to k tokens that followed the match, cut before the first stop token (EOS): a drafted
              EOS, if accepted, ends the row exactly where the target itself would emit it as the
              step's own token, so drafting it only widens the verification forward (HF cuts the same
              way); deterministic (no probabilities)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..config import SamplingParams
from ..errors import InvalidDraftLengthError
from .adaptive import DraftLengthPolicy, as_policy
from .base import Draft, Drafter, StepOutcome


def find_candidate(context: list[int], max_ngram_size: int, num_tokens: int, min_ngram_size: int = 1) -> list[int]:
    """Continuation of the earliest earlier match of the context's last n-gram (n from ``max_ngram_size`` down to
    ``min_ngram_size``)."""
    length = len(context)
    for n in range(min(max_ngram_size, length - 1), min_ngram_size - 1, -1):
        tail = context[length - n:]
        for start in range(0, length - n):
            if context[start:start + n] == tail:
                cont = context[start + n:start + n + num_tokens]
                if cont:
                    return cont
    return []


class PromptLookupDrafter(Drafter):
    """Deterministic n-gram drafter that needs no model."""

    #: nothing to learn from the target's prefill: the loop feeds the prompt with the first draft
    #: (:func:`mmspec.engine.needs_no_prefill`), as HF's prompt lookup does
    needs_no_prefill = True

    def __init__(self, max_ngram_size: int = 2, draft_length: int | DraftLengthPolicy | None = None,
                 stop_tokens: Iterable[int] | None = None, min_ngram_size: int = 1):
        if not isinstance(max_ngram_size, int) or max_ngram_size < 1:
            raise InvalidDraftLengthError(f"max_ngram_size must be an int >= 1, got {max_ngram_size!r}")
        if not isinstance(min_ngram_size, int) or not 1 <= min_ngram_size <= max_ngram_size:
            raise InvalidDraftLengthError(f"min_ngram_size must be an int in [1, max_ngram_size], got {min_ngram_size!r}")
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size
        self.policy: DraftLengthPolicy | None = None if draft_length is None else as_policy(draft_length)
        self._own_policy = draft_length is not None
        self.stop_tokens: frozenset[int] = frozenset() if stop_tokens is None else frozenset(int(t) for t in stop_tokens)
        self._own_stop = stop_tokens is not None

    def set_default_length(self, k: int | DraftLengthPolicy) -> None:
        """Use the call's draft length unless one was given at construction."""
        if not self._own_policy:
            self.policy = as_policy(k)

    def set_stop_tokens(self, tokens: Iterable[int]) -> None:
        """Cut drafts before the call's EOS ids unless stop tokens were given at construction."""
        if not self._own_stop:
            self.stop_tokens = frozenset(int(t) for t in tokens)

    def _cut(self, draft: list[int]) -> list[int]:
        for i, t in enumerate(draft):
            if t in self.stop_tokens:
                return draft[:i]
        return draft

    def start(self, input_ids, attention_mask, *, sampling: SamplingParams, rng: Any = None,
              guidance: Any = None, **model_inputs: Any) -> None:
        if self.policy is None:
            raise RuntimeError("PromptLookupDrafter has no draft length: pass draft_length or num_draft_tokens")
        self.device = input_ids.device
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        self.contexts = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]

    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        """Up to k tokens per row; the draft is as wide as the longest usable continuation, so a step where
        no row found a match (or no row may draft) feeds only the pending token, as HF's prompt lookup does."""
        assert self.policy is not None
        batch = len(self.contexts)
        caps = max_tokens.tolist() if isinstance(max_tokens, torch.Tensor) else [max_tokens] * batch
        k = min(self.policy.current(), max(caps, default=0))
        found = [self._cut(find_candidate(c, self.max_ngram_size, min(k, cap), self.min_ngram_size))
                 if k > 0 and cap > 0 else []
                 for c, cap in zip(self.contexts, caps)]
        width = max((len(f) for f in found), default=0)
        tokens = torch.zeros((batch, width), dtype=torch.long)
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

    def add_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: Any = None) -> None:
        ids, mask = input_ids.tolist(), attention_mask.tolist()
        self.contexts += [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
