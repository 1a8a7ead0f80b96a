"""The target split over pipeline stages (one process each, torch.distributed), seen by the loop as one session.

Paper: FlowSpec (arXiv 2507.02620); this is its baseline, naive pipelined speculative decoding: each
verification block travels the whole pipeline before the next one is drafted.

Glossary:
    rank         a process of the group; rank s runs stage s. Rank 0 also runs the decoding loop and the drafter
                 and holds a :class:`PipelineSession`; ranks >= 1 run :func:`serve_stage`
    command      what rank 0 sends down the chain (rank s -> s + 1): a header long [8] = (op, batch, width,
                 has_valid, num_logits, 0, 0, 0) and its payload; ``EXTEND`` carries the valid mask and the
                 hidden states, ``ROLLBACK`` the tokens to remove per row, ``SELECT`` the rows to keep, ``STOP``
                 nothing, ``RESET`` (a new batch) nothing; trees: ``BEGIN_TREE``, ``EXTEND_TREE`` (parents, valid
                 mask, hidden states) and ``KEEP_PATH`` (path, tokens kept). The last stage sends the logits of an ``EXTEND`` back to rank 0
    timeout      every receive waits at most the process group's timeout; a stage that died or stopped
                 answering makes the others raise :class:`PipelineStageError` (and exit), never hang
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..cache import CacheSession
from ..errors import MMSpecError
from .stage import float_dtype, hidden_size

EXTEND, ROLLBACK, SELECT, STOP, RESET, BEGIN_TREE, EXTEND_TREE, KEEP_PATH = 1, 2, 3, 4, 5, 6, 7, 8
HEADER = 8


class PipelineStageError(MMSpecError):
    """A pipeline stage died or stopped answering within the timeout."""


def _send(t: torch.Tensor, dst: int) -> None:
    try:
        dist.send(t.contiguous(), dst)
    except RuntimeError as exc:
        raise PipelineStageError(f"stage {dist.get_rank()} cannot reach stage {dst}: {str(exc).splitlines()[0]}") from None


def _recv(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    try:
        dist.recv(t, src)
    except RuntimeError as exc:
        raise PipelineStageError(f"stage {dist.get_rank()} got no answer from stage {src} (it died or stopped "
                                 f"answering within the timeout): {str(exc).splitlines()[0]}") from None
    return t


def _header(op: int, batch: int = 0, width: int = 0, has_valid: int = 0, num_logits: int = 0) -> torch.Tensor:
    return torch.tensor([op, batch, width, has_valid, num_logits, 0, 0, 0], dtype=torch.long)


class PipelineSession:
    """Rank 0's session: stage 0 locally, the other stages over the process group (CPU tensors, gloo)."""

    last_hidden = None

    def __init__(self, stage_model: torch.nn.Module, batch: int, device: torch.device, *, world_size: int,
                 vocab_size: int):
        self.local = CacheSession(stage_model, batch, device)
        self.world = world_size
        self.vocab = vocab_size
        self.device = device
        if world_size > 1:
            _send(_header(RESET), 1)  # a new batch: every stage starts an empty cache

    @property
    def calls(self) -> int:
        return self.local.calls

    @property
    def batch_size(self) -> int:
        return self.local.batch_size

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, num_logits: int | None = None,
               hidden_layers: tuple[int, ...] = (), **model_inputs: Any) -> torch.Tensor:
        if hidden_layers or model_inputs:
            raise ValueError("a pipelined target takes token ids only (no hidden states for feature drafters yet)")
        if self.world == 1:
            return self.local.extend(tokens, valid, num_logits=num_logits)
        batch, width = tokens.shape
        n = num_logits if num_logits is not None else width
        _send(_header(EXTEND, batch, width, int(valid is not None), n), 1)
        hidden = self.local.extend(tokens, valid)  # [B, w, d]
        if valid is not None:
            _send(valid.to(torch.long).cpu(), 1)
        _send(hidden.cpu(), 1)
        return _recv((batch, n, self.vocab), hidden.dtype, self.world - 1).to(self.device)

    def rollback(self, num_remove: torch.Tensor) -> None:
        self.local.rollback(num_remove)
        if self.world > 1:
            _send(_header(ROLLBACK, num_remove.numel()), 1)
            _send(num_remove.to(torch.long).cpu(), 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.local.select_rows(rows)
        if self.world > 1:
            _send(_header(SELECT, rows.numel()), 1)
            _send(rows.to(torch.long).cpu(), 1)

    def stop(self) -> None:
        """Tell every stage to exit its loop."""
        if self.world > 1:
            _send(_header(STOP), 1)

    def begin_tree(self) -> None:
        self.local.begin_tree()
        if self.world > 1:
            _send(_header(BEGIN_TREE), 1)

    def extend_tree(self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor | None = None,
                    hidden_layers: tuple[int, ...] = ()) -> torch.Tensor:
        if hidden_layers:
            raise ValueError("a pipelined target takes token ids only (no hidden states for feature drafters yet)")
        valid = torch.ones_like(tokens) if valid is None else valid.to(torch.long)
        if self.world == 1:
            return self.local.extend_tree(tokens, parents, valid)
        batch, width = tokens.shape
        _send(_header(EXTEND_TREE, batch, width, 1, width), 1)
        hidden = self.local.extend_tree(tokens, parents, valid)
        _send(parents.to(torch.long).cpu(), 1)
        _send(valid.cpu(), 1)
        _send(hidden.cpu(), 1)
        return _recv((batch, width, self.vocab), hidden.dtype, self.world - 1).to(self.device)

    def keep_path(self, path: torch.Tensor, num_keep: torch.Tensor) -> None:
        self.local.keep_path(path, num_keep)
        if self.world > 1:
            _send(_header(KEEP_PATH, path.shape[0], path.shape[1]), 1)
            _send(path.to(torch.long).cpu(), 1)
            _send(num_keep.to(torch.long).cpu(), 1)


def serve_stage(stage_model: torch.nn.Module, rank: int, world_size: int) -> int:
    """Run stage ``rank`` (>= 1) until ``STOP``: receive commands from rank - 1, pass them on, send the last
    stage's logits to rank 0. Returns the number of forwards run."""
    last = rank == world_size - 1
    d, dtype = hidden_size(stage_model), float_dtype(stage_model)
    session: CacheSession | None = None
    forwards = 0
    while True:
        header = _recv((HEADER,), torch.long, rank - 1)
        op, batch, width, has_valid, n = (int(x) for x in header[:5])
        if not last:
            _send(header, rank + 1)
        if op == STOP:
            return forwards
        if op == RESET:
            session = None
            continue
        if op == EXTEND:
            if session is None or session.batch_size != batch:
                session = CacheSession(stage_model, batch, torch.device("cpu"))
            valid = _recv((batch, width), torch.long, rank - 1) if has_valid else None
            hidden = _recv((batch, width, d), dtype, rank - 1)
            out = session.extend(None, valid, inputs_embeds=hidden, num_logits=n if last else None)
            forwards += 1
            if last:
                _send(out.to(dtype), 0)
            else:
                if valid is not None:
                    _send(valid, rank + 1)
                _send(out, rank + 1)
        elif op == BEGIN_TREE:
            assert session is not None
            session.begin_tree()
        elif op == EXTEND_TREE:
            assert session is not None
            parents = _recv((batch, width), torch.long, rank - 1)
            valid = _recv((batch, width), torch.long, rank - 1)
            hidden = _recv((batch, width, d), dtype, rank - 1)
            out = session.extend_tree(torch.zeros((batch, width), dtype=torch.long), parents, valid,
                                      inputs_embeds=hidden)
            forwards += 1
            if last:
                _send(out.to(dtype), 0)
            else:
                for t in (parents, valid, out):
                    _send(t, rank + 1)
        elif op == KEEP_PATH:
            assert session is not None
            path = _recv((batch, width), torch.long, rank - 1)
            keep = _recv((batch,), torch.long, rank - 1)
            if not last:
                _send(path, rank + 1)
                _send(keep, rank + 1)
            session.keep_path(path, keep)
        elif op in (ROLLBACK, SELECT):
            arg = _recv((batch,), torch.long, rank - 1)
            if not last:
                _send(arg, rank + 1)
            assert session is not None
            if op == ROLLBACK:
                session.rollback(arg)
            else:
                session.select_rows(arg)
        else:
            raise PipelineStageError(f"stage {rank} received an unknown command {op}")
