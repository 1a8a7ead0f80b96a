"""How the pipeline's messages travel between ranks: the :class:`Transport` interface, its gloo implementation
(one process per stage, torch.distributed) and its in-process implementation (one thread per stage).

Paper: FlowSpec (arXiv 2507.02620) runs its stages on separate devices; this module is the wire between them.

Glossary:
    rank          a participant of the pipeline; rank s runs stage s. Rank 0 decodes (the loop, the drafter,
                  stage 0); ranks >= 1 serve their stage (:class:`~mmspec.pipeline.server.StageServer`)
    channel       what a tensor travels on (a gloo tag): ``COMMANDS`` down the chain and the last stage's replies,
                  ``STATS`` each stage's counters to rank 0, ``KILL`` rank 0's side channel to every stage (read
                  by a listener thread, so it overtakes the commands queued before it); tensors on one channel
                  between two ranks arrive in the order they were sent
    send / post   a blocking send (returns once the tensor is handed over) / a non-blocking one that a later
                  :meth:`Transport.flush` (or a full outbox) waits for
    outbox        gloo's sends in flight (``isend`` handles): a handle dropped before the peer receives may lose
                  the tensor, so a transport keeps every one until it completes
    receive wait  seconds a rank spent blocked in receives (rank 0: waiting for the pipeline), in
                  :attr:`Transport.recv_wait_s`; the side channel's listener waits by design and is left out
    timeout       every receive waits at most the group's timeout; a rank that died or stopped answering makes
                  the others raise :class:`PipelineStageError` naming the stages, never hang
    group         the ranks that talk to each other: torchrun's default process group (gloo), or an
                  :class:`InProcessGroup` (a FIFO queue per source, destination and channel; a rank that ends
                  with an error is recorded, and every receive in the group then raises at once)
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque

import torch
import torch.distributed as dist

from ..errors import MMSpecError
from .plan import PipelineConfigError

DEFAULT_TIMEOUT_S = 60.0


class PipelineStageError(MMSpecError):
    """A pipeline stage died, stopped answering within the timeout, or sent what the protocol does not allow."""


class Channel(enum.IntEnum):
    COMMANDS = 0
    STATS = 3
    KILL = 9


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class Transport(ABC):
    """Moves CPU tensors between the ranks of one group (see the module glossary)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.recv_wait_s = 0.0

    @abstractmethod
    def send(self, t: torch.Tensor, dst: int, channel: Channel = Channel.COMMANDS) -> None:
        """Blocking send of ``t`` to rank ``dst``."""

    @abstractmethod
    def post(self, t: torch.Tensor, dst: int, channel: Channel = Channel.COMMANDS) -> None:
        """Non-blocking send of ``t`` to rank ``dst`` (complete after :meth:`flush`)."""

    @abstractmethod
    def flush(self) -> None:
        """Wait until every posted tensor was received."""

    @abstractmethod
    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, channel: Channel) -> torch.Tensor:
        ...

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int,
             channel: Channel = Channel.COMMANDS) -> torch.Tensor:
        """The next tensor (``dtype``, ``shape``) from rank ``src`` on ``channel``; :class:`PipelineStageError`
        when none comes within the timeout."""
        t0 = time.perf_counter()
        t = self._recv(tuple(shape), dtype, src, channel)
        if channel != Channel.KILL:
            self.recv_wait_s += time.perf_counter() - t0
        return t

    def unreachable(self, dst: int, why: str) -> PipelineStageError:
        return PipelineStageError(f"stage {self.rank} cannot reach stage {dst}: {why}")

    def no_answer(self, src: int, why: str) -> PipelineStageError:
        return PipelineStageError(f"stage {self.rank} got no answer from stage {src} (it died or stopped answering "
                                  f"within the timeout): {why}")


class GlooTransport(Transport):
    """torchrun's default process group (gloo; joined by :func:`~mmspec.pipeline.run.init_group`, whose timeout
    bounds every receive). Posted sends are ``isend`` handles kept in an outbox; the oldest are awaited once more
    than ``depth`` are outstanding."""

    def __init__(self, depth: int = 64):
        if not dist.is_initialized():
            raise PipelineConfigError("no process group: call mmspec.pipeline.init_group first (under torchrun)")
        super().__init__(dist.get_rank(), dist.get_world_size())
        self.outbox: deque = deque()  # (work, tensor): the tensor stays alive until its send completes
        self.depth = depth

    def send(self, t: torch.Tensor, dst: int, channel: Channel = Channel.COMMANDS) -> None:
        try:
            dist.send(t.contiguous(), dst, tag=int(channel))
        except RuntimeError as exc:
            raise self.unreachable(dst, _first_line(exc)) from None

    def post(self, t: torch.Tensor, dst: int, channel: Channel = Channel.COMMANDS) -> None:
        t = t.contiguous()
        try:
            self.outbox.append((dist.isend(t, dst, tag=int(channel)), t))
            while len(self.outbox) > self.depth:
                self.outbox.popleft()[0].wait()
        except RuntimeError as exc:
            raise self.unreachable(dst, _first_line(exc)) from None

    def flush(self) -> None:
        try:
            while self.outbox:
                self.outbox.popleft()[0].wait()
        except RuntimeError as exc:
            raise PipelineStageError(f"stage {self.rank}: a send was never received: {_first_line(exc)}") from None

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, channel: Channel) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        try:
            dist.recv(t, src, tag=int(channel))
        except RuntimeError as exc:
            raise self.no_answer(src, _first_line(exc)) from None
        return t


class InProcessGroup:
    """The mailboxes of ``world_size`` ranks in one process (each rank a thread): a FIFO queue per (source,
    destination, channel). A rank that ends with an error is recorded with :meth:`fail`; from then on every
    receive in the group that finds nothing queued raises :class:`PipelineStageError` naming it."""

    POLL_S = 0.05  # how often a waiting receive looks for a failed rank

    def __init__(self, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._boxes: dict[tuple[int, int, int], queue.Queue] = {}
        self._lock = threading.Lock()
        self._failures: list[str] = []  # why ranks ended badly, first first

    def box(self, src: int, dst: int, channel: Channel) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((src, dst, int(channel)), queue.Queue())

    def fail(self, rank: int, why: str) -> None:
        with self._lock:
            self._failures.append(f"stage {rank} ended: {why}")

    def failure(self) -> str | None:
        """Why the first rank that failed ended (None while none has)."""
        with self._lock:
            return self._failures[0] if self._failures else None

    def transport(self, rank: int) -> InProcessTransport:
        return InProcessTransport(self, rank)


class InProcessTransport(Transport):
    """Rank ``rank``'s end of an :class:`InProcessGroup`: sends copy the tensor into the peer's queue (so both ends
    own their memory, as over gloo; sending never blocks, so :meth:`post` is :meth:`send` and :meth:`flush` has
    nothing to wait for); a receive checks the shape and dtype the protocol expects."""

    def __init__(self, group: InProcessGroup, rank: int):
        super().__init__(rank, group.world_size)
        self.group = group

    def send(self, t: torch.Tensor, dst: int, channel: Channel = Channel.COMMANDS) -> None:
        why = self.group.failure()
        if why is not None:
            raise self.unreachable(dst, why)
        self.group.box(self.rank, dst, channel).put(t.detach().clone())

    post = send

    def flush(self) -> None:
        pass

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, channel: Channel) -> torch.Tensor:
        box = self.group.box(src, self.rank, channel)
        deadline = time.monotonic() + self.group.timeout_s
        while True:
            try:
                t = box.get(timeout=max(0.0, min(self.group.POLL_S, deadline - time.monotonic())))
                break
            except queue.Empty:
                why = self.group.failure()
                if why is not None:
                    raise self.no_answer(src, why) from None
                if time.monotonic() >= deadline:
                    raise self.no_answer(src, f"nothing within {self.group.timeout_s:g} s") from None
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise PipelineStageError(f"stage {self.rank} expected {dtype} {list(shape)} from stage {src}, got "
                                     f"{t.dtype} {list(t.shape)}")
        return t


def open_transport(world_size: int = 1, transport: Transport | None = None) -> Transport | None:
    """Rank 0's transport to the stages for its entry points: ``transport`` itself, or for the torchrun form
    (``world_size`` > 1 and no transport) a :class:`GlooTransport` over the default group; None when there are no
    other stages (one process holds the whole target)."""
    if transport is not None:
        if world_size not in (1, transport.world_size):
            raise PipelineConfigError(f"world_size={world_size} but the transport has {transport.world_size} ranks")
        return transport if transport.world_size > 1 else None
    return GlooTransport() if world_size > 1 else None
