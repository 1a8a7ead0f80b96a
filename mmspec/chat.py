"""Chatting with a causal LM through speculative decoding: the conversation, streamed answers, the
speed of each answer (``mmspec chat``).

Glossary:
    conversation  the chat messages so far (``system`` first when given); each answer re-encodes the
                  whole conversation with the tokenizer's chat template (no cache kept across turns)
    piece         the text an answer gained in one verification step: the committed tokens decoded,
                  held back while they end in an incomplete UTF-8 character
    turn stats    per answer: new tokens, seconds, tokens/s and the mean accepted length tau

The decoding is the one loop's (:func:`mmspec.engine.generate_stream`); greedy answers equal HF
``generate``'s, sampled ones follow the target's distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .engine import generate_stream


@dataclass
class TurnStats:
    new_tokens: int
    seconds: float
    mean_accepted_length: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tokens/s, "
                f"mean accepted length {self.mean_accepted_length:.2f})")


@dataclass
class Chat:
    """A multi-turn chat: ``for piece in chat.reply("Hi"): print(piece, end="")``."""

    target: Any
    tokenizer: Any
    drafter: Any
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    num_draft_tokens: int = 3
    seed: int = 0
    messages: list[dict] = field(default_factory=list)
    last: TurnStats | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: chat needs an instruction-tuned model's tokenizer")
        self._turn = 0

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages.clear()
        self.last = None

    def _input_ids(self) -> torch.Tensor:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to the user's ``text``; the answer joins the conversation when done."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty message: write something to the model")
        self.messages.append({"role": "user", "content": text})
        ids = self._input_ids()
        eos = self.target.generation_config.eos_token_id
        eos_set = {eos} if isinstance(eos, int) else set(eos or [])
        tokens: list[int] = []
        shown = ""
        t0 = time.perf_counter()
        try:  # bad settings raise here, before any work, and the message leaves the conversation again
            stream = generate_stream(self.target, ids, drafter=self.drafter, max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                     num_draft_tokens=self.num_draft_tokens, seed=self.seed + self._turn)
        except Exception:
            self.messages.pop()
            raise
        steps = 0
        answer = ""
        try:
            for event in stream:
                steps += 1
                tokens.extend(event.tokens[0])
                answer = self.tokenizer.decode([t for t in tokens if t not in eos_set], skip_special_tokens=True)
                if not answer.endswith("\ufffd") and answer.startswith(shown):  # hold back a split character
                    yield answer[len(shown):]
                    shown = answer
            if answer.startswith(shown) and answer != shown:
                yield answer[len(shown):]
        finally:  # also when the caller stops early: the conversation keeps what was generated
            self.messages.append({"role": "assistant", "content": answer})
            self.last = TurnStats(len(tokens), time.perf_counter() - t0, len(tokens) / max(steps, 1))
            self._turn += 1

