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
                 mask, hidden states) and ``KEEP_PATH`` (path, tokens kept). The last stage sends the logits of an
                 ``EXTEND`` back to rank 0. FlowSpec (:mod:`~mmspec.pipeline.flowspec`): ``SEGMENT`` (node ids and
                 parent ids long [2, w], hidden states; the last stage answers with the ids and logits of the nodes
                 it computed), ``COMMIT`` (the round's accepted path as node ids), ``STATS`` (every stage answers
                 rank 0 with its counters)
    features     hidden states a feature drafter (EAGLE) reads: ``FEATURES`` names them (HF ``hidden_states``
                 indices of the whole model); every later forward then carries, after its hidden states, the
                 features computed so far ([B, w, n d], in index order): each stage appends the ones of its
                 layers and the last stage returns all of them with the logits
    kill         FlowSpec's in-flight pruning: rank 0 sends each stage, on a side channel (tag ``KILL_TAG``, read by
                 a listener thread), the nodes that can no longer be accepted; a stage drops them from segments it
                 has not forwarded yet, so pruned nodes cost no stage compute after the news reaches it
    timeout      every receive waits at most the process group's timeout; a stage that died or stopped
                 answering makes the others raise :class:`PipelineStageError` (and exit), never hang
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from ..cache import CacheSession
from ..errors import MMSpecError
from .stage import float_dtype, hidden_size, layer_range, owned_features

EXTEND, ROLLBACK, SELECT, STOP, RESET, BEGIN_TREE, EXTEND_TREE, KEEP_PATH = 1, 2, 3, 4, 5, 6, 7, 8
SEGMENT, COMMIT, STATS, FEATURES = 9, 10, 11, 12
HEADER = 8
KILL_TAG, STATS_TAG = 9, 3
#: a kill message: long [2 + MAX_KILL] = (dead_below, n, ids...): node ids < dead_below and the n ids are dead;
#: dead_below = EXIT_LISTENER ends the stage's listener thread
MAX_KILL = 512
EXIT_LISTENER = -2
#: a stage's counters (``STATS``): forwards, busy seconds, wall seconds, tokens computed, tokens pruned in flight
NUM_STATS = 5


class PipelineStageError(MMSpecError):
    """A pipeline stage died or stopped answering within the timeout."""


def _send(t: torch.Tensor, dst: int) -> None:
    try:
        dist.send(t.contiguous(), dst)
    except RuntimeError as exc:
        raise PipelineStageError(f"stage {dist.get_rank()} cannot reach stage {dst}: {str(exc).splitlines()[0]}") from None


#: seconds this process has spent blocked in receives (rank 0: waiting for the pipeline; benchmarks read it)
RECV_WAIT = [0.0]


def _recv(shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int = 0) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t0 = time.perf_counter()
    try:
        dist.recv(t, src, tag=tag)
        RECV_WAIT[0] += time.perf_counter() - t0
    except RuntimeError as exc:
        raise PipelineStageError(f"stage {dist.get_rank()} got no answer from stage {src} (it died or stopped "
                                 f"answering within the timeout): {str(exc).splitlines()[0]}") from None
    return t


class Outbox:
    """Non-blocking sends (gloo ``isend``): a send completes only once the peer posts its receive, so a stage
    never waits on its successor; the oldest sends are awaited once more than ``depth`` are outstanding."""

    def __init__(self, depth: int = 64):
        self.works: deque = deque()
        self.depth = depth

    def post(self, t: torch.Tensor, dst: int, tag: int = 0) -> None:
        t = t.contiguous()
        try:
            self.works.append((dist.isend(t, dst, tag=tag), t))
            while len(self.works) > self.depth:
                self.works.popleft()[0].wait()
        except RuntimeError as exc:
            raise PipelineStageError(f"stage {dist.get_rank()} cannot reach stage {dst}: "
                                     f"{str(exc).splitlines()[0]}") from None

    def flush(self) -> None:
        try:
            while self.works:
                self.works.popleft()[0].wait()
        except RuntimeError as exc:
            raise PipelineStageError(f"stage {dist.get_rank()}: a send was never received: "
                                     f"{str(exc).splitlines()[0]}") from None


#: this process's sends in flight: one outbox for the whole process, so no send is dropped (a gloo send whose
#: handle is garbage-collected before the peer receives it may never arrive)
OUTBOX = Outbox()


def kill_message(dead_below: int, ids: list[int]) -> torch.Tensor:
    """long [2 + MAX_KILL]: node ids < ``dead_below`` and ``ids`` are dead (``ids`` beyond MAX_KILL are dropped:
    pruning is an optimisation, never needed for correctness)."""
    ids = ids[:MAX_KILL]
    msg = torch.zeros(2 + MAX_KILL, dtype=torch.long)
    msg[0], msg[1] = dead_below, len(ids)
    if ids:
        msg[2:2 + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return msg


class KillList:
    """A stage's view of the dead nodes, filled by a listener thread reading rank 0's kill messages."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dead_below = 0
        self.dead: set[int] = set()
        self.thread: threading.Thread | None = None

    def listen(self) -> None:
        def run() -> None:
            while True:
                msg = torch.empty(2 + MAX_KILL, dtype=torch.long)
                try:
                    dist.recv(msg, 0, tag=KILL_TAG)
                except RuntimeError:
                    return  # the main loop reports a dead peer
                below, n = int(msg[0]), int(msg[1])
                if below == EXIT_LISTENER:
                    return
                with self.lock:
                    if below > self.dead_below:
                        self.dead_below = below
                        self.dead = {i for i in self.dead if i >= below}
                    self.dead.update(msg[2:2 + n].tolist())

        self.thread = threading.Thread(target=run, name="mmspec-kill-listener", daemon=True)
        self.thread.start()

    def alive(self, ids: list[int]) -> list[bool]:
        with self.lock:
            return [i >= self.dead_below and i not in self.dead for i in ids]


def _header(op: int, batch: int = 0, width: int = 0, has_valid: int = 0, num_logits: int = 0) -> torch.Tensor:
    return torch.tensor([op, batch, width, has_valid, num_logits, 0, 0, 0], dtype=torch.long)


def stop_stages(world_size: int) -> None:
    """Rank 0, at the end: every stage ends its kill listener and its command loop."""
    if world_size > 1:
        for r in range(1, world_size):
            OUTBOX.post(kill_message(EXIT_LISTENER, []), r, KILL_TAG)
        OUTBOX.post(_header(STOP), 1)
        OUTBOX.flush()


def collect_stage_stats(world_size: int) -> list[list[float]]:
    """Rank 0, between generations: counters of stages 1 .. N-1 since their last report (forwards, busy s, wall
    s, tokens computed, tokens pruned in flight); each stage resets them."""
    if world_size == 1:
        return []
    OUTBOX.post(_header(STATS), 1)
    return [_recv((NUM_STATS,), torch.float64, r, STATS_TAG).tolist() for r in range(1, world_size)]


class PipelineSession:
    """Rank 0's session: stage 0 locally, the other stages over the process group (CPU tensors, gloo)."""

    last_hidden = None

    def __init__(self, stage_model: torch.nn.Module, batch: int, device: torch.device, *, world_size: int,
                 vocab_size: int):
        self.local = CacheSession(stage_model, batch, device)
        self.world = world_size
        self.vocab = vocab_size
        self.device = device
        self.outbox = OUTBOX
        self.features: list[int] = []
        self.own0: list[int] = []
        self._results: deque = deque()  # one process: segment results, in order
        if world_size > 1:
            self.outbox.post(_header(RESET), 1)  # a new batch: every stage starts an empty cache

    @property
    def calls(self) -> int:
        return self.local.calls

    @property
    def batch_size(self) -> int:
        return self.local.batch_size

    def set_features(self, layers: tuple[int, ...]) -> None:
        """From now on every forward also returns these hidden states (whole-model HF indices) in
        :attr:`last_hidden`: what a feature drafter reads."""
        self.features = sorted({int(i) for i in layers})
        _, self.own0 = owned_features(self.features, layer_range(self.local.model))
        if self.world > 1:
            self.outbox.post(_header(FEATURES, 0, len(self.features)), 1)
            if self.features:
                self.outbox.post(torch.tensor(self.features, dtype=torch.long), 1)

    def _check_features(self, hidden_layers: tuple[int, ...]) -> None:
        if self.world > 1 and not set(hidden_layers) <= set(self.features):
            raise ValueError(f"hidden states {sorted(set(hidden_layers) - set(self.features))} were not asked for: "
                             "call set_features first")

    def _stage0_features(self) -> torch.Tensor | None:
        if not self.own0:
            return None
        return torch.cat([self.local.last_hidden[i] for i in self.own0], dim=-1).cpu()

    def _pass_down(self, hidden: torch.Tensor, num_logits: int) -> torch.Tensor:
        """Send stage 0's hidden states [B, w, d] (and its features) on; the last stage's logits [B, n, V] (and
        every stage's features, in :attr:`last_hidden`)."""
        batch, width = hidden.shape[:2]
        _send(hidden.cpu(), 1)
        feats0 = self._stage0_features()
        if feats0 is not None:
            _send(feats0, 1)
        logits = _recv((batch, num_logits, self.vocab), hidden.dtype, self.world - 1).to(self.device)
        self._recv_features(batch, width, hidden.dtype)
        return logits

    def _recv_features(self, batch: int, width: int, dtype: torch.dtype) -> None:
        self.last_hidden = None
        if self.features:
            d = hidden_size(self.local.model)
            feats = _recv((batch, width, len(self.features) * d), dtype, self.world - 1).to(self.device)
            self.last_hidden = {i: feats[..., k * d:(k + 1) * d] for k, i in enumerate(self.features)}

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, num_logits: int | None = None,
               hidden_layers: tuple[int, ...] = (), **model_inputs: Any) -> torch.Tensor:
        if model_inputs:
            raise ValueError("a pipelined target takes token ids only")
        if self.world == 1:
            out = self.local.extend(tokens, valid, num_logits=num_logits, hidden_layers=hidden_layers)
            self.last_hidden = self.local.last_hidden
            return out
        self._check_features(hidden_layers)
        batch, width = tokens.shape
        n = num_logits if num_logits is not None else width
        _send(_header(EXTEND, batch, width, int(valid is not None), n), 1)
        hidden = self.local.extend(tokens, valid, hidden_layers=tuple(self.own0))  # [B, w, d]
        if valid is not None:
            _send(valid.to(torch.long).cpu(), 1)
        return self._pass_down(hidden, n)

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

    # FlowSpec: segments of a draft tree streamed through the stages (see mmspec.pipeline.flowspec)
    def send_segment(self, ids: list[int], parent_ids: list[int], tokens: torch.Tensor,
                     local_parents: torch.Tensor) -> None:
        """Feed tree nodes ``ids`` (tokens long [1, w]; ``local_parents`` long [1, w]: parents as stage-0 tree
        indices, -1 for a child of the committed context) to stage 0 and post its hidden states down the chain;
        the last stage's logits come back through :meth:`receive_segment`, in order."""
        width = tokens.shape[1]
        if self.world == 1:
            out = self.local.extend_tree(tokens, local_parents, torch.ones_like(tokens), hidden_layers=tuple(self.features))
            self._results.append((list(ids), out, self.local.last_hidden))
            return
        out = self.local.extend_tree(tokens, local_parents, torch.ones_like(tokens), hidden_layers=tuple(self.own0))
        self.outbox.post(_header(SEGMENT, 1, width), 1)
        self.outbox.post(torch.tensor([ids, parent_ids], dtype=torch.long), 1)
        self.outbox.post(out.cpu(), 1)
        feats0 = self._stage0_features()
        if feats0 is not None:
            self.outbox.post(feats0, 1)

    def receive_segment(self) -> tuple[list[int], torch.Tensor | None, dict[int, torch.Tensor] | None]:
        """The next segment's result from the last stage: (node ids it computed, logits [1, n, V] or None when
        every node was pruned on the way, the :meth:`set_features` hidden states of those nodes or None)."""
        if self.world == 1:
            return self._results.popleft()
        header = _recv((HEADER,), torch.long, self.world - 1)
        n = int(header[2])
        if n == 0:
            return [], None, None
        ids = _recv((n,), torch.long, self.world - 1).tolist()
        dtype = float_dtype(self.local.model)
        logits = _recv((1, n, self.vocab), dtype, self.world - 1).to(self.device)
        self._recv_features(1, n, dtype)
        return ids, logits, self.last_hidden

    def commit(self, path_ids: list[int], path_local: torch.Tensor) -> None:
        """End a round: every stage keeps the tree nodes ``path_ids`` (root first; stage 0's indices
        ``path_local`` long [1, D]) as committed slots and drops the rest of its tree."""
        self.local.keep_path(path_local, torch.tensor([len(path_ids)], device=path_local.device))
        if self.world > 1:
            self.outbox.post(_header(COMMIT, 1, len(path_ids)), 1)
            self.outbox.post(torch.tensor(path_ids, dtype=torch.long), 1)

    def kill(self, dead_below: int, ids: list[int]) -> None:
        """Tell every later stage, ahead of the queued segments, that these nodes can no longer be accepted."""
        if self.world > 1:
            msg = kill_message(dead_below, ids)
            for r in range(1, self.world):
                self.outbox.post(msg, r, KILL_TAG)

    def stage_stats(self) -> list[list[float]]:
        """Counters of stages 1 .. N-1 since the last call (see :func:`collect_stage_stats`)."""
        return collect_stage_stats(self.world)

    def begin_tree(self) -> None:
        self.local.begin_tree()
        if self.world > 1:
            _send(_header(BEGIN_TREE), 1)

    def extend_tree(self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor | None = None,
                    hidden_layers: tuple[int, ...] = ()) -> torch.Tensor:
        valid = torch.ones_like(tokens) if valid is None else valid.to(torch.long)
        if self.world == 1:
            out = self.local.extend_tree(tokens, parents, valid, hidden_layers=hidden_layers)
            self.last_hidden = self.local.last_hidden
            return out
        self._check_features(hidden_layers)
        batch, width = tokens.shape
        _send(_header(EXTEND_TREE, batch, width, 1, width), 1)
        hidden = self.local.extend_tree(tokens, parents, valid, hidden_layers=tuple(self.own0))
        _send(parents.to(torch.long).cpu(), 1)
        _send(valid.cpu(), 1)
        return self._pass_down(hidden, width)

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
    kills = KillList()
    kills.listen()
    outbox = OUTBOX
    tree: dict[int, int] | None = None  # FlowSpec: node id -> this stage's tree index, while a round is open
    forwards = 0
    counters = [0.0] * NUM_STATS  # forwards, busy s, wall s, tokens computed, tokens pruned
    since = time.perf_counter()
    layers = layer_range(stage_model)
    carried, own = 0, []  # features: how many earlier stages computed, this stage's (local indices)

    def timed(fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        counters[1] += time.perf_counter() - t0
        return out

    def forward(fn, feats_in, *args, **kwargs):
        """Run (and count) a forward that also keeps this stage's feature layers; (output, features so far or
        None)."""
        nonlocal forwards
        out = timed(fn, *args, hidden_layers=tuple(own), **kwargs)
        forwards += 1
        counters[0] += 1
        parts = ([feats_in] if feats_in is not None else []) + [session.last_hidden[j] for j in own]
        return out, (torch.cat(parts, dim=-1) if parts else None)

    def pass_on(inputs: tuple[torch.Tensor, ...], out: torch.Tensor, feats: torch.Tensor | None) -> None:
        """After an ``EXTEND`` / ``EXTEND_TREE`` forward: the last stage sends its logits (and the features) to
        rank 0; the others send the command's ``inputs``, their output and the features on."""
        if last:
            _send(out.to(dtype), 0)
            if feats is not None:
                _send(feats, 0)
            return
        for t in inputs + (out,) + (() if feats is None else (feats,)):
            _send(t, rank + 1)

    def recv_features(batch: int, width: int) -> torch.Tensor | None:
        return _recv((batch, width, carried * d), dtype, rank - 1) if carried else None

    while True:
        header = _recv((HEADER,), torch.long, rank - 1)
        op, batch, width, has_valid, n = (int(x) for x in header[:5])
        if not last and op != SEGMENT:  # a segment's header is re-sent with the width left after pruning
            outbox.post(header, rank + 1)
        if op == STOP:
            outbox.flush()
            if kills.thread is not None:
                kills.thread.join(timeout=1.0)
            return forwards
        if op == RESET:
            session, tree = None, None
            carried, own = 0, []  # a new generation asks for its features again
            continue
        if op == STATS:
            counters[2] = time.perf_counter() - since
            outbox.post(torch.tensor(counters, dtype=torch.float64), 0, STATS_TAG)
            counters, since = [0.0] * NUM_STATS, time.perf_counter()
            continue
        if op == FEATURES:
            features = _recv((width,), torch.long, rank - 1).tolist() if width else []
            if not last and width:
                outbox.post(torch.tensor(features, dtype=torch.long), rank + 1)
            carried, own = owned_features(features, layers)
            continue
        if op == EXTEND:
            if session is None or session.batch_size != batch:
                session = CacheSession(stage_model, batch, torch.device("cpu"))
            valid = _recv((batch, width), torch.long, rank - 1) if has_valid else None
            hidden = _recv((batch, width, d), dtype, rank - 1)
            out, feats = forward(session.extend, recv_features(batch, width), None, valid, inputs_embeds=hidden,
                                 num_logits=n if last else None)
            pass_on(() if valid is None else (valid,), out, feats)
        elif op == SEGMENT:
            assert session is not None
            meta = _recv((2, width), torch.long, rank - 1) if width else torch.zeros((2, 0), dtype=torch.long)
            hidden = _recv((1, width, d), dtype, rank - 1) if width else None
            feats_in = recv_features(1, width) if width else None
            if tree is None:
                session.begin_tree()
                tree = {}
            ids, pars = meta[0].tolist(), meta[1].tolist()
            alive = kills.alive(ids)
            keep, local_parents = [], []
            for j in range(width):  # in order: a parent may come earlier in the same segment
                if alive[j] and (pars[j] < 0 or pars[j] in tree):
                    local_parents.append(tree[pars[j]] if pars[j] >= 0 else -1)
                    tree[ids[j]] = session.tree_size + len(keep)
                    keep.append(j)
            counters[4] += width - len(keep)
            if keep:
                local = torch.tensor([local_parents])
                k = torch.tensor(keep)
                out, feats = forward(session.extend_tree, None if feats_in is None else feats_in[:, k],
                                     torch.zeros((1, len(keep)), dtype=torch.long), local,
                                     torch.ones((1, len(keep)), dtype=torch.long), inputs_embeds=hidden[:, k])
                counters[3] += len(keep)
                meta = meta[:, k]
            dst = 0 if last else rank + 1
            outbox.post(_header(SEGMENT, 1, len(keep)), dst)
            if keep:
                outbox.post(meta[0].clone() if last else meta, dst)
                outbox.post(out.to(dtype) if last else out, dst)
                if feats is not None:
                    outbox.post(feats, dst)
        elif op == COMMIT:
            assert session is not None and tree is not None
            path_ids = _recv((width,), torch.long, rank - 1)
            if not last:
                outbox.post(path_ids, rank + 1)
            missing = [i for i in path_ids.tolist() if i not in tree]
            if missing:
                raise PipelineStageError(f"stage {rank} was asked to keep nodes it never computed: {missing}")
            path = torch.tensor([[tree[i] for i in path_ids.tolist()]])
            timed(session.keep_path, path, torch.tensor([width]))
            tree = None
        elif op == BEGIN_TREE:
            assert session is not None
            session.begin_tree()
        elif op == EXTEND_TREE:
            assert session is not None
            parents = _recv((batch, width), torch.long, rank - 1)
            valid = _recv((batch, width), torch.long, rank - 1)
            hidden = _recv((batch, width, d), dtype, rank - 1)
            out, feats = forward(session.extend_tree, recv_features(batch, width),
                                 torch.zeros((batch, width), dtype=torch.long), parents, valid, inputs_embeds=hidden)
            pass_on((parents, valid), out, feats)
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
