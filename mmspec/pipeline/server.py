"""A pipeline stage (rank >= 1) as a server: it receives rank s - 1's commands, acts on each with one method per
message, passes them on to rank s + 1, and (the last stage) answers rank 0.

Paper: FlowSpec (arXiv 2507.02620): the stages of its pipeline, with in-flight pruning of queued segments.

Glossary:
    stage server  :class:`StageServer`: a stage model, its :class:`~mmspec.cache.CacheSession` (one per batch,
                  made by the first ``Extend``) and a transport; :meth:`StageServer.serve` runs until ``Stop``
    pass on       a command without hidden states goes on as received, before this stage acts on it; one with
                  hidden states goes on with this stage's output (and the features so far) in their place
    forward       one call of the stage model through the session, counted and timed in one place
                  (:meth:`StageServer.forward`), keeping the hidden states of this stage's feature layers
    tree map      FlowSpec: node id -> this stage's tree index, while a round is open (between the first
                  ``Segment`` and its ``Commit``)
    kill list     the nodes rank 0 pruned, filled by a listener thread reading the side channel; a ``Segment``'s
                  dead nodes are dropped before the forward ("pruned in flight")
    counters      forwards, busy seconds (model and cache work), wall seconds, tokens computed (every forward's
                  slots) and tokens pruned in flight since the last ``Stats``
                  (:data:`~mmspec.pipeline.protocol.STAT_NAMES`)
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from ..cache import CacheSession
from .plan import PipelineConfigError
from .protocol import (COMMANDS, BeginTree, Commit, Extend, ExtendTree, Features, KeepPath, Kill, Logits, Message,
                       ProtocolError, Reset, Rollback, Segment, SegmentResult, Select, STAT_NAMES, StageStats, Stats,
                       Stop, StopListening, receive)
from .stage import layer_range, owned_features
from .transport import Channel, PipelineStageError, Transport


class KillList:
    """A stage's view of the dead nodes, filled by a listener thread reading rank 0's ``Kill`` messages."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dead_below = 0
        self.dead: set[int] = set()
        self.thread: threading.Thread | None = None

    def add(self, kill: Kill) -> None:
        with self.lock:
            if kill.dead_below > self.dead_below:
                self.dead_below = kill.dead_below
                self.dead = {i for i in self.dead if i >= kill.dead_below}
            self.dead.update(kill.ids.tolist())

    def listen(self, transport: Transport) -> None:
        def run() -> None:
            while True:
                try:
                    msg = receive(transport, 0, Channel.KILL, expect=(Kill, StopListening))
                except PipelineStageError:
                    return  # the main loop reports a dead peer
                if isinstance(msg, StopListening):
                    return
                self.add(msg)

        self.thread = threading.Thread(target=run, name=f"mmspec-kill-listener-{transport.rank}", daemon=True)
        self.thread.start()

    def alive(self, ids: list[int]) -> list[bool]:
        with self.lock:
            return [i >= self.dead_below and i not in self.dead for i in ids]

    def join(self, timeout_s: float = 1.0) -> None:
        if self.thread is not None:
            self.thread.join(timeout=timeout_s)


class StageCounters:
    """What a stage did since its last report (see the module glossary), by :data:`STAT_NAMES`."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(STAT_NAMES, 0.0)
        self.since = time.perf_counter()

    def add(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.values[name] += amount

    def report(self) -> StageStats:
        self.values["wall_s"] = time.perf_counter() - self.since
        return StageStats(torch.tensor([self.values[name] for name in STAT_NAMES], dtype=torch.float64))


class StageServer:
    """Stage ``transport.rank`` (>= 1) of ``transport.world_size`` (see the module glossary)."""

    def __init__(self, stage_model: torch.nn.Module, transport: Transport):
        if not 1 <= transport.rank < transport.world_size:
            raise PipelineConfigError(f"rank {transport.rank} of {transport.world_size} serves no stage (rank 0 "
                                      "decodes; ranks 1 .. N-1 serve)")
        self.model = stage_model
        self.transport = transport
        self.rank = transport.rank
        self.last = self.rank == transport.world_size - 1
        self.layers = layer_range(stage_model)
        self.session: CacheSession | None = None
        self.tree: dict[int, int] | None = None  # FlowSpec: node id -> tree index, while a round is open
        self.own: list[int] = []  # the features this stage computes (local hidden-state indices)
        self.kills = KillList()
        self.counters = StageCounters()
        self.forwards = 0
        self.handlers: dict[type[Message], Callable[[Any], None]] = {
            Extend: self.extend, BeginTree: self.begin_tree, ExtendTree: self.extend_tree, KeepPath: self.keep_path,
            Rollback: self.rollback, Select: self.select, Reset: self.reset, Features: self.features,
            Segment: self.segment, Commit: self.commit, Stats: self.stats}

    def serve(self) -> int:
        """Handle commands until ``Stop``; the number of forwards run."""
        self.kills.listen(self.transport)
        with torch.no_grad():
            while True:
                msg = receive(self.transport, self.rank - 1, expect=COMMANDS)
                if not self.last and not msg.CARRIES_HIDDEN:
                    msg.send(self.transport, self.rank + 1)
                if isinstance(msg, Stop):
                    break
                self.handlers[type(msg)](msg)
        self.transport.flush()
        self.kills.join()
        return self.forwards

    # -- helpers -----------------------------------------------------------------------------------------------
    def _session(self, msg: Message) -> CacheSession:
        if self.session is None:
            raise ProtocolError(f"stage {self.rank} received {type(msg).__name__} before any Extend")
        return self.session

    def _busy(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.counters.add(busy_s=time.perf_counter() - t0)
        return out

    def forward(self, method: Callable, hidden: torch.Tensor, features: torch.Tensor | None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run and count one forward of ``hidden`` [B, w, d] (``method``: the session's ``extend`` or
        ``extend_tree``); (output [B, n, d or V], the features so far [B, w, k d] or None)."""
        out = self._busy(method, *args, inputs_embeds=hidden, hidden_layers=tuple(self.own), **kwargs)
        self.forwards += 1
        self.counters.add(forwards=1, tokens=hidden.shape[0] * hidden.shape[1])
        parts = ([features] if features is not None else []) + [self.session.last_hidden[j] for j in self.own]
        return out, (torch.cat(parts, dim=-1) if parts else None)

    def _answer(self, msg: Extend | ExtendTree, out: torch.Tensor, features: torch.Tensor | None) -> None:
        """After an ``Extend`` / ``ExtendTree`` forward: the last stage sends rank 0 its logits (and the
        features); the others pass the command on with their output."""
        if self.last:
            Logits(out, features).send(self.transport, 0)
        else:
            replace(msg, hidden=out, features=features).send(self.transport, self.rank + 1)

    # -- one method per command --------------------------------------------------------------------------------
    def extend(self, msg: Extend) -> None:
        batch = msg.hidden.shape[0]
        if self.session is None or self.session.batch_size != batch:
            self.session = CacheSession(self.model, batch, torch.device("cpu"))
        out, feats = self.forward(self.session.extend, msg.hidden, msg.features, None, msg.valid,
                                  num_logits=msg.num_logits if self.last else None)
        self._answer(msg, out, feats)

    def begin_tree(self, msg: BeginTree) -> None:
        self._session(msg).begin_tree()

    def extend_tree(self, msg: ExtendTree) -> None:
        session = self._session(msg)
        out, feats = self.forward(session.extend_tree, msg.hidden, msg.features, torch.zeros_like(msg.parents),
                                  msg.parents, msg.valid)
        self._answer(msg, out, feats)

    def keep_path(self, msg: KeepPath) -> None:
        self._busy(self._session(msg).keep_path, msg.path, msg.num_keep)

    def rollback(self, msg: Rollback) -> None:
        self._busy(self._session(msg).rollback, msg.num_remove)

    def select(self, msg: Select) -> None:
        self._busy(self._session(msg).select_rows, msg.rows)

    def reset(self, msg: Reset) -> None:
        self.session, self.tree = None, None
        self.own = []  # a new generation asks for its features again

    def features(self, msg: Features) -> None:
        _, self.own = owned_features(msg.layers.tolist(), self.layers)

    def stats(self, msg: Stats) -> None:
        self.counters.report().send(self.transport, 0, Channel.STATS)
        self.counters = StageCounters()

    def segment(self, msg: Segment) -> None:
        """Drop the dead nodes (and those whose parent this stage never computed), feed the others as tree nodes,
        pass the survivors on (the last stage: their ids and logits to rank 0)."""
        session = self._session(msg)
        if self.tree is None:
            session.begin_tree()
            self.tree = {}
        ids, parents = msg.nodes.tolist()
        alive = self.kills.alive(ids)
        keep, local_parents = [], []
        for j, (node, parent) in enumerate(zip(ids, parents)):  # in order: a parent may come earlier in the segment
            if alive[j] and (parent < 0 or parent in self.tree):
                local_parents.append(self.tree[parent] if parent >= 0 else -1)
                self.tree[node] = session.tree_size + len(keep)
                keep.append(j)
        self.counters.add(pruned=len(ids) - len(keep))
        out = feats = None
        if keep:
            k = torch.tensor(keep)
            ones = torch.ones((1, len(keep)), dtype=torch.long)
            out, feats = self.forward(session.extend_tree, msg.hidden[:, k],
                                      None if msg.features is None else msg.features[:, k],
                                      torch.zeros_like(ones), torch.tensor([local_parents]), ones)
        nodes = msg.nodes[:, keep]
        if self.last:
            SegmentResult(nodes[0], out, feats).send(self.transport, 0)
        else:
            hidden = out if keep else msg.hidden[:, :0]
            Segment(nodes, hidden, feats).send(self.transport, self.rank + 1)

    def commit(self, msg: Commit) -> None:
        session = self._session(msg)
        path_ids = msg.path_ids.tolist()
        missing = [i for i in path_ids if self.tree is None or i not in self.tree]
        if missing:
            raise ProtocolError(f"stage {self.rank} was asked to keep nodes it never computed: {missing}")
        path = torch.tensor([[self.tree[i] for i in path_ids]])
        self._busy(session.keep_path, path, torch.tensor([len(path_ids)]))
        self.tree = None
