"""Rescoring the top-k lattice of blockwise parallel drafts: an n-gram model (global p-best search) or a
small neural LM (local rescoring) adds its log-probability to the heads' own.

Paper: Kim et al., "Exploring and Improving Drafts in Blockwise Parallel Decoding" (arXiv 2404.09221): the
heads' independent per-position guesses repeat tokens and break local fluency; an LM scoring the paths
through the lattice finds drafts the target accepts further. n-gram smoothing: Witten and Bell (1991).

Glossary:
    lattice     column i (the i-th drafted position) holds the k tokens head i likes most, with their
                head log-probabilities; a path takes one token per column
    beam        a path prefix kept by the p-best search; beams of column i are indexed 0..P-1 best first
    score       head log-prob + ``weight`` x rescorer log-prob, summed along the path
    rescorer    ``score(paths, parent_beams, candidates)``: paths long [B, P, i] (the beams' tokens after the
                pending token), parent_beams long [B, P] (each beam's beam in the previous column, unused at
                i = 0), candidates long [B, P, k] -> log-probabilities float [B, P, k]; ``start`` /
                ``observe`` / ``select_rows`` follow the drafter protocol, ``finish`` learns which beams
                became tree nodes
    n-gram      :class:`NGramModel`: interpolated Witten-Bell estimates of order n over token ids, built from
                local text (a global model passed in; e.g. from the corpus table that ``train-drafter --kind
                heads`` keeps: the answers the heads were trained on) and/or the row's own context (prompt and
                every committed token, updated each step); with both, their mixture 1/2 : 1/2
    neural      :class:`NeuralRescorer`: a small causal LM on the target's vocabulary (the standalone drafter)
                keeps the committed context in its cache and reads the beams as draft-tree slots, one forward
                per column (EAGLE-2's tree machinery, :mod:`mmspec.drafters.tree`)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Iterable, Sequence

import torch

from ..errors import MethodParameterError
from .base import StepOutcome
from .model import ModelDrafter
from .tree import StaticTree

#: separates documents in a corpus token table (:meth:`NGramModel.from_corpus`)
SEPARATOR = -1


class NGramModel:
    """Interpolated Witten-Bell n-gram model over token ids (``order`` >= 1) with a uniform floor over
    ``vocab_size`` tokens. ``add(tokens)`` counts every n-gram of a sequence; ``extend`` counts only the
    n-grams ending at newly appended tokens."""

    def __init__(self, order: int, vocab_size: int):
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise MethodParameterError(f"order must be an int >= 1, got {order!r}")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise MethodParameterError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        self.order, self.vocab_size = order, vocab_size
        # counts[m]: context tuple of length m -> {next token: count}; totals[m]: context -> sum of its counts
        self.counts: list[dict[tuple, dict[int, int]]] = [{} for _ in range(order)]
        self.totals: list[dict[tuple, int]] = [{} for _ in range(order)]

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]], order: int, vocab_size: int) -> "NGramModel":
        model = cls(order, vocab_size)
        for seq in sequences:
            model.add(seq)
        return model

    @classmethod
    def from_corpus(cls, corpus: torch.Tensor, order: int, vocab_size: int) -> "NGramModel":
        """From a token table: long/int [T], documents separated by ``SEPARATOR`` (-1)."""
        if corpus.ndim != 1:
            raise MethodParameterError(f"corpus must be a 1-D token table, got shape {tuple(corpus.shape)}")
        if corpus.numel() and (int(corpus.min()) < SEPARATOR or int(corpus.max()) >= vocab_size):
            raise MethodParameterError(f"corpus ids must lie in [0, {vocab_size}) (or be the separator -1)")
        flat = corpus.tolist()
        docs, start = [], 0
        for i, t in enumerate(flat + [SEPARATOR]):
            if t == SEPARATOR:
                docs.append(flat[start:i])
                start = i + 1
        return cls.from_sequences(docs, order, vocab_size)

    def add(self, tokens: Sequence[int]) -> None:
        self.extend([], tokens)

    def extend(self, history: Sequence[int], new: Sequence[int]) -> None:
        """Count the n-grams ending at each token of ``new`` (``history`` precedes it)."""
        seq = list(history[-(self.order - 1):]) if self.order > 1 else []
        for w in new:
            w = int(w)
            for m in range(min(self.order - 1, len(seq)) + 1):
                ctx = tuple(seq[len(seq) - m:])
                row = self.counts[m].setdefault(ctx, {})
                row[w] = row.get(w, 0) + 1
                self.totals[m][ctx] = self.totals[m].get(ctx, 0) + 1
            seq.append(w)
            if len(seq) > self.order - 1:
                seq = seq[len(seq) - (self.order - 1):] if self.order > 1 else []

    def prob(self, context: Sequence[int], token: int) -> float:
        """p(token | the last order - 1 tokens of context)."""
        p = 1.0 / self.vocab_size
        ctx = tuple(context[len(context) - (self.order - 1):]) if self.order > 1 else ()
        for m in range(min(self.order - 1, len(ctx)) + 1):
            c = ctx[len(ctx) - m:]
            total = self.totals[m].get(c)
            if not total:
                break
            row = self.counts[m][c]
            types = len(row)
            p = (row.get(token, 0) + types * p) / (total + types)
        return p


class Rescorer(ABC):
    """What :class:`~mmspec.drafters.blockwise.BlockwiseDrafter` asks of a lattice rescorer (module glossary)."""

    #: weight of the rescorer's log-probability beside the heads' own
    weight: float = 1.0

    @abstractmethod
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: Any, rng: Any,
              vocab_size: int) -> None:
        """A new batch of prompts (long [B, L], left padded)."""

    @abstractmethod
    def score(self, paths: torch.Tensor, parent_beams: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """paths long [B, P, i], parent_beams long [B, P], candidates long [B, P, k] -> log-probs float [B, P, k]."""

    @abstractmethod
    def observe(self, outcome: StepOutcome) -> None:
        """What the step committed (as :meth:`Drafter.observe`)."""

    @abstractmethod
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B'])."""

    # -- optional hooks: the defaults do nothing --------------------------------------------------------------
    def check_compatible(self, target: torch.nn.Module) -> None:
        """Raise a named error if this rescorer cannot serve ``target`` (default: no check)."""

    def finish(self, node_depth: torch.Tensor, node_beam: torch.Tensor) -> None:
        """Which beams became draft-tree nodes: node_depth / node_beam long [B, N] (default: not needed)."""


class NGramRescorer(Rescorer):
    """Scores lattice paths with an n-gram model: ``model`` (global, built from local text), the row's
    context (``context=True``), or their mixture."""

    def __init__(self, model: NGramModel | None = None, *, context: bool = True, order: int = 3,
                 weight: float = 1.0):
        if model is None and not context:
            raise MethodParameterError("NGramRescorer needs a global model, the context (context=True), or both")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise MethodParameterError(f"weight must be a finite number >= 0, got {weight!r}")
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise MethodParameterError(f"order must be an int >= 1, got {order!r}")
        self.model, self.use_context, self.order, self.weight = model, context, order, float(weight)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: Any = None, rng: Any = None,
              vocab_size: int) -> None:
        self.history = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        self.contexts: list[NGramModel] = []
        if self.use_context:
            for h in self.history:
                m = NGramModel(self.order, vocab_size)
                m.add(h)
                self.contexts.append(m)

    def _prob(self, b: int, ctx: list[int], token: int) -> float:
        if not self.use_context:
            return self.model.prob(ctx, token)
        p = self.contexts[b].prob(ctx, token)
        return p if self.model is None else 0.5 * (p + self.model.prob(ctx, token))

    def score(self, paths: torch.Tensor, parent_beams: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        out = torch.empty(candidates.shape, dtype=torch.float32)
        n = max(self.order - 1, self.model.order - 1 if self.model is not None else 0)
        p_list, c_list = paths.tolist(), candidates.tolist()
        for b, (rows, cands) in enumerate(zip(p_list, c_list)):
            tail = self.history[b][-n:] if n else []
            for j, (path, cand) in enumerate(zip(rows, cands)):
                ctx = tail + path
                for i, w in enumerate(cand):
                    out[b, j, i] = math.log(self._prob(b, ctx, w))
        return out.to(candidates.device)

    def finish(self, node_depth: torch.Tensor, node_beam: torch.Tensor) -> None:
        pass

    def observe(self, outcome: StepOutcome) -> None:
        for b, new in enumerate(outcome.committed):
            if self.use_context:
                self.contexts[b].extend(self.history[b], new)
            self.history[b].extend(new)

    def select_rows(self, rows: torch.Tensor) -> None:
        keep = rows.tolist()
        self.history = [self.history[i] for i in keep]
        if self.use_context:
            self.contexts = [self.contexts[i] for i in keep]


class NeuralRescorer(Rescorer):
    """Scores lattice paths with a small causal LM ``model`` sharing the target's vocabulary."""

    def __init__(self, model: torch.nn.Module, *, weight: float = 1.0):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise MethodParameterError(f"weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        # the LM's cache and its draft-tree slots are a tree drafter's: its hooks feed the beams as tree slots
        self.lm = ModelDrafter(model, tree=StaticTree((1,)))

    @property
    def vocab_size(self) -> int | None:
        return self.lm.vocab_size

    def check_compatible(self, target: torch.nn.Module) -> None:
        self.lm.check_compatible(target)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: Any, rng: Any,
              vocab_size: int | None = None) -> None:
        self.lm.start(input_ids, attention_mask, sampling=sampling, rng=rng)
        self._slots: list[torch.Tensor] = []  # per column i >= 1: the cache slot of each beam, long [B, P]
        self._fed = 0

    def score(self, paths: torch.Tensor, parent_beams: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        batch, beams, depth = paths.shape
        if depth == 0:
            logits = self.lm.tree_root_logits().unsqueeze(1)  # [B, 1, V]: after the pending tokens
            self.lm.session.begin_tree()
            self._slots, self._fed = [], 0
        else:
            parent_slot = (self._slots[-1].gather(1, parent_beams) if depth > 1
                           else torch.full_like(parent_beams, -1))
            logits = self.lm.tree_expand(paths[:, :, -1], parent_slot)  # [B, P, V]
            self._slots.append(self._fed + torch.arange(beams, device=paths.device).expand(batch, -1))
            self._fed += beams
        return logits.float().log_softmax(-1).gather(-1, candidates)

    def finish(self, node_depth: torch.Tensor, node_beam: torch.Tensor) -> None:
        """node_depth / node_beam long [B, N]: each tree node's column (1-based) and beam there; nodes of the
        last column (never fed) and padding (depth 0) get no slot."""
        slot = torch.full_like(node_depth, -1)
        for d, slots in enumerate(self._slots, start=1):
            at = node_depth == d
            slot = torch.where(at, slots.gather(1, node_beam.clamp(0, slots.shape[1] - 1)), slot)
        self.lm._tree_slot = slot

    def observe(self, outcome: StepOutcome) -> None:
        self.lm.observe(outcome)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.lm.select_rows(rows)
