"""The drafter protocol.

Glossary:
    Draft        what a drafter proposes for one step: tokens long [B, k], the processed
                 distributions they were sampled from (float [B, k, V], or ``None`` for a
                 deterministic drafter) and ``num_draft`` long [B] (real drafts per row, <= k);
                 a tree also carries ``parents`` long [B, N] (-1 for children of the root; a chain
                 is parents[i] = i - 1) and the tree rule matching how its children were drawn;
                 an ``open_end`` chain asks for no bonus token (see :class:`Draft`)
    StepOutcome  what verification decided: the draft, the ``VerifyResult``, the tokens each
                 row really committed (after EOS / max-length truncation) and what the target's
                 verification forward produced (its processed-to-be logits, and the hidden states
                 of the layers in ``Drafter.hidden_layers`` when the drafter asks for them)
    start        called once with the whole prompt (left padded) before the first step; ``rng``
                 gives the per-row keyed random numbers (:class:`mmspec.rng.RowRandom`), ``guidance``
                 the classifier-free-guidance spec when the target runs with CFG (a drafter with a
                 model runs the same guidance)
    propose      ``max_tokens`` long [B]: at most that many real drafts per row are usable; the
                 drafter sizes its draft by the widest row and the loop caps each row's
                 ``num_draft``; the draft has k >= 1 columns unless the drafter drafts nothing
    observe_prefill  feature drafters (``hidden_layers`` non-empty) get the target's hidden states over
                 the prompt once, after ``start``
    observe      called after every step; drafters update caches, n-gram indices and the
                 adaptive draft length here; SJD refines its guesses from the target's logits
    select_rows  called when finished rows leave the batch

One protocol serves text, VLM and image-token drafters.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SamplingParams
from ..guidance import Guidance
from ..rng import RowRandom
from ..verify.types import VerifyResult


@dataclass(frozen=True)
class Draft:
    tokens: torch.Tensor  # long [B, k] (k = N nodes for a tree)
    probs: torch.Tensor | None  # float [B, k, V] | None (tree: the distribution at each node's parent)
    num_draft: torch.Tensor  # long [B]
    parents: torch.Tensor | None = None  # long [B, N]: a tree (-1: child of the root); None: a chain
    tree_rule: Any = None  # the lossless TreeRule matching how children were drawn (None: the default)
    #: a chain whose target does not compute the distribution after its last draft (collaborative decoding's
    #: alternate proposals): a row accepting every draft commits the drafts only, no bonus token, and its last
    #: draft becomes the next step's pending token
    open_end: bool = False

    @property
    def k(self) -> int:
        return self.tokens.shape[1]

    @property
    def is_tree(self) -> bool:
        return self.parents is not None


@dataclass(frozen=True)
class StepOutcome:
    draft: Draft
    result: VerifyResult
    committed: list[list[int]]  # per row: tokens appended to the sequence this step
    target_logits: torch.Tensor | None = None  # float [B, k+1, V]: the verification forward's (guided) logits
    target_hidden: dict[int, torch.Tensor] | None = None  # layer -> float [B, k+1, d], layers the drafter asked for


def widest_budget(max_tokens: torch.Tensor | int) -> int:
    """The widest row's draft budget from an int or long [B] (the loop caps each row's ``num_draft``)."""
    if isinstance(max_tokens, int):
        return max_tokens
    return int(max_tokens.max()) if max_tokens.numel() else 0


class Drafter(ABC):
    """Proposes tokens; never sees the target model."""

    #: vocabulary size of the drafter's distributions, or None if it has none (n-gram lookup)
    vocab_size: int | None = None
    #: target layers whose hidden states ``observe`` needs (feature-level drafters); the target
    #: forward requests hidden states only when this is non-empty
    hidden_layers: tuple[int, ...] = ()

    @abstractmethod
    def start(
        self,
        input_ids: torch.Tensor,  # long [B, L], left padded
        attention_mask: torch.Tensor,  # long [B, L]
        *,
        sampling: SamplingParams,
        rng: RowRandom,
        guidance: Guidance | None = None,
        **model_inputs: Any,
    ) -> None:
        """Reset state for a new batch of prompts (``model_inputs``: the target's extra inputs,
        e.g. ``pixel_values``; text drafters ignore them)."""

    def observe_prefill(self, target_hidden: dict[int, torch.Tensor] | None) -> None:
        """Called once after ``start`` when ``hidden_layers`` is non-empty: the target's hidden states of
        those layers over the prompt it prefilled (layer -> float [B, L-1, d], every prompt token but the
        last; None for one-token prompts)."""

    @abstractmethod
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        """Propose up to ``max_tokens`` (long [B] or an int for every row) tokens per row."""

    @abstractmethod
    def observe(self, outcome: StepOutcome) -> None:
        """Learn what was committed (cache rollback, context update, draft-length update)."""

    @abstractmethod
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B']) of the batch."""

    def add_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_hidden: "dict[int, torch.Tensor] | None" = None) -> None:
        """Take new prompts (long [N, L], left padded) into the running batch, after its rows (continuous
        batching); ``target_hidden``: the target's hidden states over their prefill (layers ``hidden_layers``,
        [N, L - 1, d] each) for a drafter that reads them. A drafter that cannot take rows says so."""
        from ..errors import MMSpecError

        raise MMSpecError(f"{type(self).__name__} cannot take rows into a running batch; use prompt lookup, an "
                          "EAGLE-3 head or no drafter")

    #: the drafter needs nothing from the target's prefill (no hidden states, no prompt context of its own kept
    #: in step with the target): the loop may then feed the prompt in the first verification step, together
    #: with the first draft, one target forward fewer (prompt lookup, as HF's prompt lookup does)
    needs_no_prefill: bool = False

    # -- optional hooks: the defaults do nothing ------------------------------------------------------------
    def set_default_length(self, k: "int | Any") -> None:
        """The call's ``num_draft_tokens`` (an int or a draft-length policy); a drafter given a length of its
        own keeps it (default: drafters without a draft length ignore it)."""

    def set_stop_tokens(self, tokens: "frozenset[int] | set[int]") -> None:
        """The request's EOS ids (default: ignored; prompt lookup cuts its drafts after one)."""

    @property
    def num_calls(self) -> int:
        """Forwards of the drafter's own model so far (for the stats; 0 without a model)."""
        return 0

    def check_compatible(self, target: torch.nn.Module) -> None:
        """Raise a named error if this drafter cannot serve ``target`` (default: no check)."""

    def target_prefill_context(self, target: torch.nn.Module, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context the engine enters around the target's prefill (e.g. to capture attention)."""
        return contextlib.nullcontext()

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the drafter's context for the stats (e.g. visual tokens kept)."""
        return {}


class NoDrafter(Drafter):
    """Drafts nothing: the loop then samples one target token per step (plain AR decoding)."""

    needs_no_prefill = True

    def start(self, input_ids, attention_mask, *, sampling, rng, guidance=None, **model_inputs) -> None:
        self.device = input_ids.device

    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        batch = max_tokens.numel() if isinstance(max_tokens, torch.Tensor) else 1
        return Draft(tokens=torch.zeros((batch, 0), dtype=torch.long, device=self.device), probs=None,
                     num_draft=torch.zeros((batch,), dtype=torch.long, device=self.device))

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def select_rows(self, rows: torch.Tensor) -> None:
        pass

    def add_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_hidden: "dict[int, torch.Tensor] | None" = None) -> None:
        pass
