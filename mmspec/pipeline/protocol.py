"""The pipeline protocol as data: one message type per command rank 0 sends down the chain and per reply, and
the one codec that puts any of them on a :class:`~mmspec.pipeline.transport.Transport`.

Paper: FlowSpec (arXiv 2507.02620); the naive pipelined baseline uses the loop's commands (``Extend`` ..
``Reset``), FlowSpec its segments (``Segment``, ``Commit``, ``Kill``).

Glossary:
    command      a message rank 0 sends to stage 1, which each stage passes on to the next: as received when it
                 carries no hidden states, else with its own output in place of the hidden states it got
                 (``CARRIES_HIDDEN``); the last stage answers rank 0 (``Logits``, ``SegmentResult``)
    reply        what a stage sends rank 0: the last stage's ``Logits`` / ``SegmentResult`` on the commands
                 channel, every stage's ``StageStats`` on the stats channel
    side channel ``Kill`` (FlowSpec's in-flight pruning) and ``StopListening``, from rank 0 to every stage on the
                 kill channel, read by the stage's listener thread
    features     hidden states a feature drafter (EAGLE) reads: ``Features`` names them (HF ``hidden_states``
                 indices of the whole model); every later forward then carries, after its hidden states, the
                 features computed so far ([B, w, k d], in index order): each stage appends those of its layers
                 and the last stage returns all of them with the logits
    header       long [HEADER]: (op, float dtype code, the message's int fields, then the dims of each tensor
                 field in field order; a missing optional tensor has ``ABSENT`` dims); the payload follows, one
                 tensor per present non-empty tensor field, so a receiver knows every shape from the header
    posted       a message sent without waiting for its receiver (``POSTED``: FlowSpec's stream, the
                 bookkeeping commands); the naive loop's commands and their logits are blocking sends
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import torch

from .transport import Channel, PipelineStageError, Transport

HEADER = 16
#: the dims of a missing optional tensor in the header
ABSENT = -1
#: the float dtypes a message may carry (the header holds the index)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: the most node ids one ``Kill`` names (more are dropped: pruning saves work, it is never needed to be right)
MAX_KILL = 512


class ProtocolError(PipelineStageError):
    """A message the protocol does not allow: an unknown op, a tensor of the wrong rank or dtype, or a command a
    stage cannot act on in its state."""


def tensor(ndim: int, *, long: bool = False, optional: bool = False):
    """A message field holding a tensor of ``ndim`` dims: long (ids, masks, counts) or the message's float dtype;
    ``optional`` ones default to None."""
    return field(default=None if optional else MISSING, metadata={"ndim": ndim, "long": long})


class Message:
    """A command or reply (a dataclass whose fields are ints and :func:`tensor` fields)."""

    CARRIES_HIDDEN: ClassVar[bool] = False
    POSTED: ClassVar[bool] = True

    def send(self, transport: Transport, dst: int, channel: Channel = Channel.COMMANDS) -> None:
        header, payload = encode(self)
        put = transport.post if self.POSTED else transport.send
        for t in (header, *payload):
            put(t, dst, channel)


# -- commands: rank 0 -> 1 -> ... -> N-1 --------------------------------------------------------------------------
@dataclass
class Extend(Message):
    """The loop's ``extend``: feed a block of w slots per row; the last stage answers with ``Logits``."""

    CARRIES_HIDDEN: ClassVar[bool] = True
    POSTED: ClassVar[bool] = False
    hidden: torch.Tensor = tensor(3)  # float [B, w, d]: the previous stage's output
    num_logits: int  # the last stage returns the logits of the last n columns
    valid: torch.Tensor | None = tensor(2, long=True, optional=True)  # long [B, w]; None: all valid
    features: torch.Tensor | None = tensor(3, optional=True)  # float [B, w, k d]: features computed so far


@dataclass
class BeginTree(Message):
    """The loop's ``begin_tree``: slots fed from now on are tree nodes."""

    POSTED: ClassVar[bool] = False


@dataclass
class ExtendTree(Message):
    """The loop's ``extend_tree``: feed w tree nodes per row; the last stage answers with ``Logits`` (all w)."""

    CARRIES_HIDDEN: ClassVar[bool] = True
    POSTED: ClassVar[bool] = False
    hidden: torch.Tensor = tensor(3)  # float [B, w, d]
    parents: torch.Tensor = tensor(2, long=True)  # long [B, w]: parent tree index, -1: child of the context
    valid: torch.Tensor = tensor(2, long=True)  # long [B, w]
    features: torch.Tensor | None = tensor(3, optional=True)  # float [B, w, k d]


@dataclass
class KeepPath(Message):
    """The loop's ``keep_path``: end the tree, keeping the first ``num_keep[b]`` nodes of ``path``."""

    POSTED: ClassVar[bool] = False
    path: torch.Tensor = tensor(2, long=True)  # long [B, D]: tree indices, root first, -1 padded
    num_keep: torch.Tensor = tensor(1, long=True)  # long [B]


@dataclass
class Rollback(Message):
    """The loop's ``rollback``: remove the last ``num_remove[b]`` valid tokens of each row."""

    POSTED: ClassVar[bool] = False
    num_remove: torch.Tensor = tensor(1, long=True)  # long [B]


@dataclass
class Select(Message):
    """The loop's ``select_rows``: keep these rows (finished ones leave the batch)."""

    POSTED: ClassVar[bool] = False
    rows: torch.Tensor = tensor(1, long=True)  # long [B']


@dataclass
class Reset(Message):
    """A new generation: every stage starts an empty cache and forgets the features asked for."""


@dataclass
class Features(Message):
    """From now on every forward also carries these hidden states (whole-model HF indices, sorted)."""

    layers: torch.Tensor = tensor(1, long=True)  # long [k]


@dataclass
class Segment(Message):
    """FlowSpec: tree nodes streamed through the stages; each stage drops the nodes killed so far (and those whose
    parent it never computed) before its forward and passes the survivors on."""

    CARRIES_HIDDEN: ClassVar[bool] = True
    nodes: torch.Tensor = tensor(2, long=True)  # long [2, w]: node ids, parent ids (-1: child of the context)
    hidden: torch.Tensor = tensor(3)  # float [1, w, d]
    features: torch.Tensor | None = tensor(3, optional=True)  # float [1, w, k d]


@dataclass
class Commit(Message):
    """FlowSpec, end of a round: keep the accepted path's nodes as committed slots, drop the rest of the tree."""

    path_ids: torch.Tensor = tensor(1, long=True)  # long [D]: node ids, root first


@dataclass
class Stats(Message):
    """Every stage answers rank 0 with its counters since the last ``Stats`` (``StageStats``) and resets them."""


@dataclass
class Stop(Message):
    """The end: every stage flushes its sends and returns."""


# -- replies: to rank 0 --------------------------------------------------------------------------------------------
@dataclass
class Logits(Message):
    """The last stage's answer to ``Extend`` / ``ExtendTree``."""

    POSTED: ClassVar[bool] = False
    logits: torch.Tensor = tensor(3)  # float [B, n, V]
    features: torch.Tensor | None = tensor(3, optional=True)  # float [B, w, k d]: every stage's features


@dataclass
class SegmentResult(Message):
    """The last stage's answer to a ``Segment``: the nodes it computed (none when every one was pruned)."""

    ids: torch.Tensor = tensor(1, long=True)  # long [n]: node ids
    logits: torch.Tensor | None = tensor(3, optional=True)  # float [1, n, V]; None when n = 0
    features: torch.Tensor | None = tensor(3, optional=True)  # float [1, n, k d]


#: a stage's counters, in ``StageStats.counters`` order
STAT_NAMES = ("forwards", "busy_s", "wall_s", "tokens", "pruned")


@dataclass
class StageStats(Message):
    """A stage's counters (stats channel): forwards, busy seconds, wall seconds, tokens computed, tokens pruned in
    flight (dropped from segments before the forward)."""

    counters: torch.Tensor = tensor(1)  # float64 [len(STAT_NAMES)]


# -- the side channel: rank 0 -> every stage ----------------------------------------------------------------------
@dataclass
class Kill(Message):
    """FlowSpec's pruning: node ids < ``dead_below`` and ``ids`` can no longer be accepted."""

    dead_below: int
    ids: torch.Tensor = tensor(1, long=True)  # long [n], n <= MAX_KILL

    @classmethod
    def of(cls, dead_below: int, ids: list[int]) -> Kill:
        return cls(dead_below, torch.tensor(ids[:MAX_KILL], dtype=torch.long))


@dataclass
class StopListening(Message):
    """Ends a stage's kill listener."""


#: what a stage receives from the previous one
COMMANDS: tuple[type[Message], ...] = (Extend, BeginTree, ExtendTree, KeepPath, Rollback, Select, Reset, Features, Segment,
                                       Commit, Stats, Stop)
#: every message, its op being its place here (from 1)
MESSAGES: tuple[type[Message], ...] = (Extend, Rollback, Select, Stop, Reset, BeginTree, ExtendTree, KeepPath, Segment,
                                       Commit, Stats, Features, Logits, SegmentResult, StageStats, Kill, StopListening)
OPS: dict[type[Message], int] = {cls: op for op, cls in enumerate(MESSAGES, start=1)}


def encode(msg: Message) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(header long [HEADER], the payload: the present non-empty tensors as CPU tensors, in field order)."""
    header = [OPS[type(msg)], 0]
    payload: list[torch.Tensor] = []
    float_dtype = None
    for f in fields(msg):
        value = getattr(msg, f.name)
        if "ndim" not in f.metadata:
            header.append(int(value))
            continue
        ndim = f.metadata["ndim"]
        if value is None:
            header.extend([ABSENT] * ndim)
            continue
        if value.dim() != ndim:
            raise ProtocolError(f"{type(msg).__name__}.{f.name} must have {ndim} dims, got shape {list(value.shape)}")
        if f.metadata["long"]:
            value = value.to(torch.long)
        elif float_dtype not in (None, value.dtype) or value.dtype not in FLOAT_DTYPES:
            raise ProtocolError(f"{type(msg).__name__}.{f.name}: {value.dtype}, but the message's floats are "
                                f"{float_dtype or 'one of ' + str(FLOAT_DTYPES)}")
        else:
            float_dtype = value.dtype
        header.extend(value.shape)
        if value.numel():
            payload.append(value.detach().cpu())
    if float_dtype is not None:
        header[1] = FLOAT_DTYPES.index(float_dtype)
    return torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.long), payload


def receive(transport: Transport, src: int, channel: Channel = Channel.COMMANDS,
            expect: type[Message] | tuple[type[Message], ...] = Message) -> Message:
    """The next message from rank ``src`` on ``channel``; :class:`ProtocolError` unless it is an ``expect``."""
    header = transport.recv((HEADER,), torch.long, src, channel).tolist()
    op, dtype_code = header[0], header[1]
    if not 1 <= op <= len(MESSAGES) or not 0 <= dtype_code < len(FLOAT_DTYPES):
        raise ProtocolError(f"stage {transport.rank} received an unknown message (op {op}, dtype {dtype_code}) from "
                            f"stage {src}")
    cls = MESSAGES[op - 1]
    values, at = {}, 2
    for f in fields(cls):
        if "ndim" not in f.metadata:
            values[f.name], at = header[at], at + 1
            continue
        dims, at = tuple(header[at:at + f.metadata["ndim"]]), at + f.metadata["ndim"]
        if dims[0] == ABSENT:
            values[f.name] = None
            continue
        if min(dims) < 0:
            raise ProtocolError(f"stage {transport.rank} received {cls.__name__}.{f.name} of shape {list(dims)} from "
                                f"stage {src}")
        dtype = torch.long if f.metadata["long"] else FLOAT_DTYPES[dtype_code]
        values[f.name] = transport.recv(dims, dtype, src, channel) if math.prod(dims) else torch.empty(dims, dtype=dtype)
    msg = cls(**values)
    if not isinstance(msg, expect):
        raise ProtocolError(f"stage {transport.rank} expected {_names(expect)} from stage {src}, got {cls.__name__}")
    return msg


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
