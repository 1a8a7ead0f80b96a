"""Rank 0's view of the pipelined target: stage 0 locally, the later stages through a transport, seen by the loop as
one target session.

Paper: FlowSpec (arXiv 2507.02620); this is its baseline, naive pipelined speculative decoding: each
verification block travels the whole pipeline before the next one is drafted.

Glossary:
    rank 0       runs the decoding loop (:func:`mmspec.engine.decode`), the drafter and stage 0, and holds a
                 :class:`PipelineSession`; ranks >= 1 run :class:`~mmspec.pipeline.server.StageServer`
    session      the loop's :class:`~mmspec.session.TargetSession` (``extend``, ``extend_tree``, ``begin_tree``,
                 ``keep_path``, ``rollback``, ``select_rows``, ``calls``, ``batch_size``, ``last_hidden``): each
                 call runs stage 0 and sends the matching command (:mod:`~mmspec.pipeline.protocol`) to stage 1;
                 ``extend`` and ``extend_tree`` wait for the last stage's ``Logits``
    one process  no transport (or one of world size 1): stage 0 is the whole target and nothing is sent
    features     hidden states a feature drafter (EAGLE) reads, asked for once with :meth:`PipelineSession.set_features`
                 and returned with every forward's logits, in :attr:`PipelineSession.last_hidden`
    FlowSpec     :meth:`PipelineSession.send_segment` / :meth:`PipelineSession.receive_segment` stream tree
                 segments, :meth:`PipelineSession.commit` ends a round and :meth:`PipelineSession.kill` prunes
                 on the side channel (:mod:`~mmspec.pipeline.flowspec`)
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from ..cache import CacheSession
from ..session import TargetSession
from .protocol import (BeginTree, Commit, Extend, ExtendTree, Features, KeepPath, Kill, Logits, Message,
                       ProtocolError, Reset, Rollback, Segment, SegmentResult, Select, StageStats, Stats, Stop,
                       StopListening, receive)
from .stage import hidden_size, layer_range, owned_features
from .transport import Channel, PipelineStageError, Transport, open_transport


def stop_stages(world_size: int = 1, *, transport: Transport | None = None) -> None:
    """Rank 0, at the end: every stage ends its kill listener and its command loop (``world_size`` > 1: the
    torchrun form, over the default gloo group)."""
    transport = open_transport(world_size, transport)
    if transport is None:
        return
    for r in range(1, transport.world_size):
        StopListening().send(transport, r, Channel.KILL)
    Stop().send(transport, 1)
    transport.flush()


def collect_stage_stats(world_size: int = 1, *, transport: Transport | None = None) -> list[list[float]]:
    """Rank 0, between generations: the counters of stages 1 .. N-1 since their last report (forwards, busy s,
    wall s, tokens computed, tokens pruned in flight: :data:`~mmspec.pipeline.protocol.STAT_NAMES`); each stage
    resets them."""
    transport = open_transport(world_size, transport)
    if transport is None:
        return []
    Stats().send(transport, 1)
    out = [receive(transport, r, Channel.STATS, expect=StageStats).counters.tolist()
           for r in range(1, transport.world_size)]
    transport.flush()
    return out


class PipelineSession(TargetSession):
    """Rank 0's session: stage 0 locally, stages 1 .. N-1 through ``transport`` (None: one process)."""

    def __init__(self, stage_model: torch.nn.Module, batch: int, device: torch.device, *, vocab_size: int,
                 transport: Transport | None = None):
        self.local = CacheSession(stage_model, batch, device)
        self.transport = transport if transport is not None and transport.world_size > 1 else None
        self.world = 1 if self.transport is None else self.transport.world_size
        self.vocab = vocab_size
        self.device = device
        self.features: list[int] = []
        self.own0: list[int] = []
        self._results: deque = deque()  # one process: segment results, in order
        self._send(Reset())  # a new batch: every stage starts an empty cache

    @property
    def calls(self) -> int:
        return self.local.calls

    @property
    def batch_size(self) -> int:
        return self.local.batch_size

    def close(self) -> None:
        """Wait until the stages received everything sent (a generation's end)."""
        if self.transport is not None:
            self.transport.flush()

    def _send(self, msg: Message) -> None:
        if self.transport is not None:
            msg.send(self.transport, 1)

    def _receive(self, expect: type[Message]) -> Any:
        return receive(self.transport, self.world - 1, expect=expect)

    def set_features(self, layers: tuple[int, ...]) -> None:
        """From now on every forward also returns these hidden states (whole-model HF indices) in
        :attr:`last_hidden`: what a feature drafter reads."""
        self.features = sorted({int(i) for i in layers})
        _, self.own0 = owned_features(self.features, layer_range(self.local.model))
        self._send(Features(torch.tensor(self.features, dtype=torch.long)))

    @staticmethod
    def _token_ids_only(model_inputs: dict[str, Any]) -> None:
        if model_inputs:
            raise ValueError(f"a pipelined target takes token ids only, got {sorted(model_inputs)}")

    def _check_features(self, hidden_layers: tuple[int, ...]) -> None:
        if not set(hidden_layers) <= set(self.features):
            raise ValueError(f"hidden states {sorted(set(hidden_layers) - set(self.features))} were not asked for: "
                             "call set_features first")

    def _stage0_features(self) -> torch.Tensor | None:
        """float [B, w, k0 d]: the features stage 0 computed in its last forward (None: none of them)."""
        if not self.own0:
            return None
        return torch.cat([self.local.last_hidden[i] for i in self.own0], dim=-1)

    def _take_features(self, feats: torch.Tensor | None) -> None:
        """Split the features [B, w, k d] that came back into :attr:`last_hidden` (layer -> [B, w, d])."""
        self.last_hidden = None
        if self.features and feats is not None:
            d = hidden_size(self.local.model)
            feats = feats.to(self.device)
            self.last_hidden = {i: feats[..., k * d:(k + 1) * d] for k, i in enumerate(self.features)}

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.vocab:
            raise ProtocolError(f"the last stage returned logits over {logits.shape[-1]} tokens, the target has "
                                f"{self.vocab}")
        return logits.to(self.device)

    def _pass_down(self, msg: Extend | ExtendTree) -> torch.Tensor:
        """Send stage 0's output on; the last stage's logits [B, n, V] (and every stage's features, in
        :attr:`last_hidden`)."""
        self._send(msg)
        reply = self._receive(Logits)
        self._take_features(reply.features)
        return self._logits(reply.logits)

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, num_logits: int | None = None,
               hidden_layers: tuple[int, ...] = (), **model_inputs: Any) -> torch.Tensor:
        self._token_ids_only(model_inputs)
        if self.transport is None:
            out = self.local.extend(tokens, valid, num_logits=num_logits, hidden_layers=hidden_layers)
            self.last_hidden = self.local.last_hidden
            return out
        self._check_features(hidden_layers)
        n = num_logits if num_logits is not None else tokens.shape[1]
        hidden = self.local.extend(tokens, valid, hidden_layers=tuple(self.own0))  # [B, w, d]
        return self._pass_down(Extend(hidden, n, valid, self._stage0_features()))

    def rollback(self, num_remove: torch.Tensor) -> None:
        self.local.rollback(num_remove)
        self._send(Rollback(num_remove))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.local.select_rows(rows)
        self._send(Select(rows))

    def begin_tree(self) -> None:
        self.local.begin_tree()
        self._send(BeginTree())

    def extend_tree(self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor | None = None,
                    hidden_layers: tuple[int, ...] = (), **model_inputs: Any) -> torch.Tensor:
        self._token_ids_only(model_inputs)
        valid = torch.ones_like(tokens) if valid is None else valid.to(torch.long)
        if self.transport is None:
            out = self.local.extend_tree(tokens, parents, valid, hidden_layers=hidden_layers)
            self.last_hidden = self.local.last_hidden
            return out
        self._check_features(hidden_layers)
        hidden = self.local.extend_tree(tokens, parents, valid, hidden_layers=tuple(self.own0))
        return self._pass_down(ExtendTree(hidden, parents, valid, self._stage0_features()))

    def keep_path(self, path: torch.Tensor, num_keep: torch.Tensor) -> None:
        self.local.keep_path(path, num_keep)
        self._send(KeepPath(path, num_keep))

    # FlowSpec: segments of a draft tree streamed through the stages (see mmspec.pipeline.flowspec)
    def send_segment(self, ids: list[int], parent_ids: list[int], tokens: torch.Tensor,
                     local_parents: torch.Tensor) -> None:
        """Feed tree nodes ``ids`` (tokens long [1, w]; ``local_parents`` long [1, w]: parents as stage-0 tree
        indices, -1 for a child of the committed context) to stage 0 and post its hidden states down the chain;
        the last stage's logits come back through :meth:`receive_segment`, in order."""
        layers = tuple(self.features) if self.transport is None else tuple(self.own0)
        out = self.local.extend_tree(tokens, local_parents, torch.ones_like(tokens), hidden_layers=layers)
        if self.transport is None:
            self._results.append((list(ids), out, self.local.last_hidden))
            return
        self._send(Segment(torch.tensor([ids, parent_ids], dtype=torch.long), out, self._stage0_features()))

    def receive_segment(self) -> tuple[list[int], torch.Tensor | None, dict[int, torch.Tensor] | None]:
        """The next segment's result from the last stage: (node ids it computed, logits [1, n, V] or None when
        every node was pruned on the way, the :meth:`set_features` hidden states of those nodes or None)."""
        if self.transport is None:
            return self._results.popleft()
        reply = self._receive(SegmentResult)
        if reply.logits is None:
            return [], None, None
        self._take_features(reply.features)
        return reply.ids.tolist(), self._logits(reply.logits), self.last_hidden

    def commit(self, path_ids: list[int], path_local: torch.Tensor) -> None:
        """End a round: every stage keeps the tree nodes ``path_ids`` (root first; stage 0's indices
        ``path_local`` long [1, D]) as committed slots and drops the rest of its tree."""
        self.local.keep_path(path_local, torch.tensor([len(path_ids)], device=path_local.device))
        self._send(Commit(torch.tensor(path_ids, dtype=torch.long)))

    def kill(self, dead_below: int, ids: list[int]) -> None:
        """Tell every later stage, ahead of the queued segments, that these nodes can no longer be accepted."""
        if self.transport is not None:
            msg = Kill.of(dead_below, ids)
            for r in range(1, self.world):
                msg.send(self.transport, r, Channel.KILL)

    def stage_stats(self) -> list[list[float]]:
        """Counters of stages 1 .. N-1 since the last call (see :func:`collect_stage_stats`)."""
        return collect_stage_stats(transport=self.transport)


__all__ = ["PipelineSession", "PipelineStageError", "collect_stage_stats", "stop_stages"]
