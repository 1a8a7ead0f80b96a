"""One session over several models: the target of collaborative decoding, returning combined logits.

Paper: Fu et al., "Fast Large Language Model Collaborative Decoding via Speculation" (CoS, ICML 2025,
arXiv 2502.01662).

Glossary:
    frontier    the tokens the decoding loop believes the session holds (every committed token but the
                pending one); the loop feeds blocks ``[pending, d_1 .. d_k]`` and rolls rejected ones back
    lookahead   per model and row, tokens that model has fed beyond the frontier, with the logits it
                computed after each (long [B, L] + float [B, L, V], ``length`` long [B]): a proposer's
                drafts, a scoring model's bonus position, a rolled-back block. They are CoS's "cached
                future logits": a block whose prefix matches a model's lookahead reuses those logits
                instead of running the model; the first mismatch (a rejection) drops the rest from that
                model's cache
    open end    a step whose target distribution after the last draft is not needed (alternate
                proposals): a model whose lookahead already covers the block but its last token runs no
                forward; a model that runs one anyway feeds the whole block, so it holds the logits after
                the last draft (its bonus proposal for the next step) at no extra forward
    settle      the loop's last block becomes frontier (its rolled-back tail stays lookahead)

The loop sees an ordinary session (:class:`~mmspec.cache.CacheSession`'s ``extend`` / ``rollback`` /
``select_rows``); the proposal drafter (:mod:`mmspec.collaborative.proposals`) drafts through
:meth:`CollaborativeSession.lookahead`, so its forwards are reused by the verification step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..cache import CacheSession
from ..session import TargetSession
from .combine import Combination


def _gather_cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, W, ...] gathered along dim 1 by idx long [B, w] -> [B, w, ...]."""
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class Lookahead:
    """One model's KV cache (frontier + lookahead) and the logits of its lookahead tokens."""

    def __init__(self, model: torch.nn.Module, batch: int, device: torch.device):
        self.session = CacheSession(model, batch, device)
        self.tokens = torch.zeros((batch, 0), dtype=torch.long, device=device)  # [B, L]
        self.length = torch.zeros((batch,), dtype=torch.long, device=device)  # [B]
        self.logits: torch.Tensor | None = None  # float [B, L, V]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Feed every prompt token but the last (long [B, L], left padded) into the frontier."""
        if input_ids.shape[1] > 1:
            self.session.extend(input_ids[:, :-1], attention_mask[:, :-1], num_logits=1)

    def feed(self, block: torch.Tensor, need: int) -> tuple[torch.Tensor, bool]:
        """Logits after each of the first ``need`` tokens of ``block`` (long [B, w], following the frontier),
        reusing the lookahead's matching prefix. A forward, when one is needed, runs over the whole block.
        Returns (logits float [B, w or need, V], whether all w columns are there); the block then starts
        the lookahead (a longer lookahead the block is a prefix of is kept)."""
        batch, w = block.shape
        device = block.device
        old_w = self.tokens.shape[1]
        n = min(old_w, w)
        cols = torch.arange(n, device=device)
        same = (self.tokens[:, :n] == block[:, :n]) & (cols < self.length.unsqueeze(1))  # [B, n]
        match = same.long().cumprod(dim=1).sum(dim=1)  # [B]: the lookahead's prefix equal to the block
        covers = match == w  # the block is a prefix of the row's lookahead: keep all of it
        drop = torch.where(covers, torch.zeros_like(match), self.length - match)
        if bool((drop > 0).any()):  # a mismatch (a rejected draft): those slots leave the cache
            self.session.rollback(drop)
        if bool((match >= need).all()):  # every needed logit is cached: no forward
            self.length = torch.where(covers, self.length, match)
            self._trim()
            return self.logits[:, :need], bool(covers.all())
        start = int(match.min())
        width = w - start
        fresh_valid = (torch.arange(start, w, device=device).unsqueeze(0) >= match.unsqueeze(1)).long()  # [B, w-s]
        fresh = self.session.extend(block[:, start:], None if bool(fresh_valid.all()) else fresh_valid)
        # logits of the block: cached before the row's match, fresh after
        j = torch.arange(w, device=device).unsqueeze(0)
        idx = torch.where(j < match.unsqueeze(1), j, old_w + j - start)  # [B, w] into [old | fresh]
        if self.logits is None:
            self.logits = fresh.new_zeros((batch, 0, fresh.shape[-1]))
        both = torch.cat([self.logits.to(fresh.dtype), fresh], dim=1)  # [B, old_w + width, V]
        out = _gather_cols(both, idx.clamp_max(old_w + width - 1))  # [B, w, V]
        # new lookahead: the block (rows whose lookahead covered it keep theirs)
        keep_w = max(w, old_w) if bool(covers.any()) else w
        pad = keep_w - w
        new_tokens = torch.nn.functional.pad(block, (0, pad))
        new_logits = torch.nn.functional.pad(out, (0, 0, 0, pad))
        if bool(covers.any()):
            old_t = torch.nn.functional.pad(self.tokens, (0, keep_w - old_w))
            old_l = torch.nn.functional.pad(self.logits, (0, 0, 0, keep_w - old_w))
            new_tokens = torch.where(covers.unsqueeze(1), old_t, new_tokens)
            new_logits = torch.where(covers.view(batch, 1, 1), old_l.to(new_logits.dtype), new_logits)
        self.tokens, self.logits = new_tokens, new_logits
        self.length = torch.where(covers, self.length, torch.full_like(match, w))
        self._trim()
        return out, True

    def advance(self, num: torch.Tensor) -> None:
        """The first ``num[b]`` lookahead tokens of each row (long [B]) become frontier."""
        if not bool((num > 0).any()):
            return
        if bool((num > self.length).any()):
            raise RuntimeError("advancing past the lookahead: the session and the loop disagree on the frontier")
        w = self.tokens.shape[1]
        idx = (torch.arange(w, device=num.device).unsqueeze(0) + num.unsqueeze(1)).clamp_max(max(w - 1, 0))
        self.tokens = _gather_cols(self.tokens, idx)
        self.logits = _gather_cols(self.logits, idx)
        self.length = self.length - num
        self._trim()

    def _trim(self) -> None:
        width = int(self.length.max()) if self.length.numel() else 0
        self.tokens = self.tokens[:, :width]
        if self.logits is not None:
            self.logits = self.logits[:, :width]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.session.select_rows(rows)
        self.tokens, self.length = self.tokens[rows], self.length[rows]
        if self.logits is not None:
            self.logits = self.logits[rows]
        self._trim()


class CollaborativeSession(TargetSession):
    """The loop's target session over ``models``: ``extend`` returns the combination's logits."""

    last_hidden = None

    def __init__(self, models: Sequence[torch.nn.Module], combination: Combination, batch: int, device: torch.device):
        combination.check_models(len(models))
        self.combination = combination
        self.members = [Lookahead(m, batch, device) for m in models]
        self.device = device
        self._outstanding: torch.Tensor | None = None  # long [B]: the last block's width, not yet frontier
        #: set by the proposal drafter for the next ``extend``: the distribution after the block's last
        #: token is not needed (an open-end draft)
        self.open_end = False
        #: indices of the models that hold the logits after the last block's last token (bonus proposals)
        self.fed_tail: list[int] = []

    @property
    def calls(self) -> int:
        return sum(m.session.calls for m in self.members)

    @property
    def calls_per_model(self) -> list[int]:
        return [m.session.calls for m in self.members]

    @property
    def batch_size(self) -> int:
        return self.members[0].session.batch_size

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        for m in self.members:
            m.prefill(input_ids, attention_mask)

    def _settle(self) -> None:
        if self._outstanding is not None:
            for m in self.members:
                m.advance(self._outstanding)
            self._outstanding = None

    def lookahead(self, model: int, tokens: torch.Tensor) -> torch.Tensor:
        """Logits float [B, w, V] of model ``model`` after each of ``tokens`` (long [B, w], following the
        frontier); cached ones are reused, the fed tokens stay in that model's lookahead."""
        self._settle()
        logits, _ = self.members[model].feed(tokens, tokens.shape[1])
        return logits

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, num_logits: int | None = None,
               hidden_layers: tuple[int, ...] = ()) -> torch.Tensor:
        """Feed ``tokens`` (long [B, w]) to every model; combined logits [B, w, V] (the last column is
        zeros and must not be used after an open-end request)."""
        if valid is not None or hidden_layers:
            raise ValueError("a collaborative session feeds whole blocks of tokens only (no padding, no hidden states)")
        self._settle()
        w = tokens.shape[1]
        open_end, self.open_end = self.open_end, False
        need = w - 1 if open_end else w
        parts, self.fed_tail = [], []
        for i, m in enumerate(self.members):
            logits, whole = m.feed(tokens, need)
            parts.append(logits[:, :need])
            if whole:
                self.fed_tail.append(i)
        combined = self.combination.combine(parts) if need else None
        if open_end:
            zeros = torch.zeros((tokens.shape[0], 1, parts[0].shape[-1]), dtype=torch.float32, device=tokens.device)
            combined = zeros if combined is None else torch.cat([combined, zeros], dim=1)
        self._outstanding = torch.full((tokens.shape[0],), w, dtype=torch.long, device=tokens.device)
        return combined if num_logits is None else combined[:, -num_logits:]

    def rollback(self, num_remove: torch.Tensor) -> None:
        """The last block's last ``num_remove[b]`` tokens leave the frontier (they stay lookahead, reused if
        the next block starts with them)."""
        if self._outstanding is None:
            raise RuntimeError("rollback without a block to roll back")
        num = self._outstanding - num_remove.to(self._outstanding.device)
        self._outstanding = None
        for m in self.members:
            m.advance(num)

    def select_rows(self, rows: torch.Tensor) -> None:
        self._settle()
        for m in self.members:
            m.select_rows(rows)
