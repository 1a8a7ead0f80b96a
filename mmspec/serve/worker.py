"""The generation worker of ``mmspec serve``: requests in a bounded queue, decoded in batches on the one loop.

Glossary:
    handle      what :meth:`Worker.submit` returns for one request: its text pieces as they come (a thread-safe
                queue ending in ``None``), the finish reason, token counts, an error, and ``cancel()``
    wave        the requests taken together from the queue (up to ``max_rows``, those sharing the first one's
                temperature and top-p) and decoded as one batch by :func:`mmspec.engine.generate_stream`, each
                row with its own seed and its own token budget (a row leaves the batch at its ``max_tokens``,
                EOS, a stop sequence or when its request is cancelled: a client that disconnects frees its row)
    joining     with prompt lookup, the EAGLE-3 head or no drafter, requests that arrive while a wave runs join it
                between verification steps (:class:`mmspec.engine.Admission`: prefilled alone, merged into the batch's
                cache) while it has fewer than ``max_rows`` rows and they share its sampling settings; otherwise
                they wait for the next wave, and once one waits nothing more joins (first come, first served:
                the wave drains and the waiting request's wave is next)
    isolation   a wave that raises is decoded again request by request, so the request whose generation raises
                fails alone (its 500) and the others finish with the text they would have had
    budget      ``prefill_budget``: where rows can join, a wave starts with the waiting requests whose prompts
                fit that many tokens (at least one) and the others join at the next steps within the same budget
                each: a burst's first answers start after one prefill instead of the whole burst's
    seed        a request's ``seed`` makes its sampled text depend only on its prompt, settings and seed (the
                loop's per-row randomness), alone or in a wave; without one a random seed is drawn
    piece       the text a request gained in one verification step: its committed tokens decoded, held back
                while they end in an incomplete UTF-8 character or could still start a stop sequence
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmspec.request import eos_set

from .protocol import GenerationRequest, RequestError


@dataclass
class Handle:
    request: GenerationRequest
    ids: list[int] = field(default_factory=list)  # the prompt's token ids
    budget: int = 0  # max_tokens, or the server's default
    prompt_tokens: int = 0
    pieces: "queue.Queue[str | None]" = field(default_factory=queue.Queue)
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False
    seed: int | None = None  # the request's seed, or the one drawn for it when it first ran
    sent: int = 0  # characters of its text already put in ``pieces``
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> str:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.text


class Worker:
    """One background thread decoding waves of requests (see the module glossary)."""

    #: whether requests may carry ``image_url`` parts (:class:`VLMWorker`)
    takes_images = False

    def __init__(self, target: torch.nn.Module, tokenizer: Any, *, model_name: str,
                 drafter: Callable[[], Any] | None = None, max_rows: int = 8, max_queue: int = 64,
                 default_max_tokens: int = 256, context: int | None = None, prefill_budget: int | None = 512):
        self.target, self.tokenizer, self.model_name = target, tokenizer, model_name
        self.drafter = drafter or (lambda: "prompt_lookup")
        self.max_rows, self.default_max_tokens = max_rows, default_max_tokens
        # prompt tokens prefilled before a step (a wave's start or the rows joining it), at least one request; None:
        # no limit. Only where rows can join (the others wait for the next step instead of the next wave)
        self.joins = not self.takes_images and _can_join(self.drafter())  # whether rows may join a running wave
        self.prefill_budget = prefill_budget if self.joins else None
        self._held: list[Handle] = []  # taken with the running wave's settings, beyond a step's prefill budget
        self.context = context or int(getattr(target.config, "max_position_embeddings", 2048))
        self.queue: "queue.Queue[Handle]" = queue.Queue(maxsize=max_queue)
        self.stats = {"requests": 0, "completed": 0, "failed": 0, "rejected": 0, "tokens": 0, "waves": 0,
                      "running_rows": 0, "accepted": 0, "row_steps": 0, "decode_seconds": 0.0, "joined": 0,
                      "isolated": 0, "steps": 0}
        self._deferred: list[Handle] = []  # taken from the queue by a batch of other sampling settings
        self._thread = threading.Thread(target=self._loop, name="mmspec-serve-worker", daemon=True)
        self._stop = False
        self._thread.start()

    # -- requests ---------------------------------------------------------------------------------
    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if req.kind == "chat":
            if getattr(tok, "chat_template", None) is None:
                text = "\n".join(f"{m['role']}: {m['content']}" for m in req.messages) + "\nassistant:"
                ids = tok(text)["input_ids"]
            else:
                ids = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
        else:
            ids = tok(req.prompt)["input_ids"]
        return list(ids)

    def submit(self, req: GenerationRequest) -> Handle:
        """Queue ``req`` (tokenised and checked against the context first); a full queue is a 429."""
        ids = self.prompt_ids(req)
        budget = req.max_tokens or self.default_max_tokens
        if not ids:
            raise RequestError("the prompt is empty after tokenisation", param="messages")
        if len(ids) + budget > self.context:
            raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens {budget} that exceeds the "
                               f"model's context of {self.context}", param="max_tokens")
        h = Handle(req, ids=ids, budget=budget, prompt_tokens=len(ids))
        try:
            self.queue.put_nowait(h)
        except queue.Full:
            self.stats["rejected"] += 1
            raise RequestError("the server is at capacity; retry shortly", status=429, type="rate_limit_error",
                               code="queue_full") from None
        self.stats["requests"] += 1
        return h

    def close(self) -> None:
        self._stop = True

    # -- the loop ---------------------------------------------------------------------------------
    def _take_wave(self) -> list[Handle]:
        """The next wave: the longest-waiting request and those waiting with its sampling settings (first the
        deferred ones, then the queue's), up to ``max_rows``."""
        waiting = self._held + self._deferred
        first = waiting[0] if waiting else self.queue.get()
        key = _setting(first)
        wave = ([first] + [h for h in waiting[1:] if _setting(h) == key])[: self.max_rows]
        taken = {id(h) for h in wave}
        self._held = []
        self._deferred = [h for h in waiting if id(h) not in taken]
        later = []
        while len(wave) < self.max_rows:
            try:
                h = self.queue.get_nowait()
            except queue.Empty:
                break
            (wave if _setting(h) == key else later).append(h)
        self._deferred += later  # another sampling setting: the next wave (never put back: the queue may be full)
        wave = [h for h in wave if not h.cancelled]
        now = _within_budget(wave, self.prefill_budget)
        self._held = wave[len(now):]  # join the wave at its next steps
        return now

    def _loop(self) -> None:
        while not self._stop:
            wave = self._take_wave()
            if not wave:
                continue
            try:
                self._run_isolated(wave)
            finally:
                self.stats["running_rows"] = 0

    def _run_isolated(self, wave: list[Handle]) -> None:
        """Decode ``wave``; if it raises, decode each of its unfinished requests again alone, so that a request
        whose generation raises fails alone (a 500) and the others finish. A rerun repeats the same tokens (greedy,
        or sampled with the row's seed: the loop's per-row randomness) and streams only what was not yet sent."""
        try:
            self._run_wave(wave)
            return
        except Exception as exc:  # a failing wave fails its own requests, never the server
            failed = exc
        left = [h for h in wave if not h.done.is_set()]
        if len(wave) == 1:
            self._fail(left, failed)
            return
        self.stats["isolated"] += len(left)
        for h in left:
            if h.cancelled:
                self._finish(h, h.text, h.sent, h.completion_tokens, "cancelled")
                continue
            try:
                self._run_wave([h], joins=False)  # alone: nothing joins a rerun that may fail again
            except Exception as exc:
                self._fail([h], exc)

    def _fail(self, handles: list[Handle], exc: BaseException) -> None:
        for h in handles:
            if not h.done.is_set():
                h.error, h.finish_reason = exc, "error"
                self.stats["failed"] += 1
                h.pieces.put(None)
                h.done.set()

    def _batch(self, handles: list[Handle]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(prompts long [N, L] left padded, attention mask, seeds) of ``handles``."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(h.ids) for h in handles)
        ids = torch.tensor([[pad] * (width - len(h.ids)) + h.ids for h in handles], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(h.ids)) + [1] * len(h.ids) for h in handles], dtype=torch.long)
        for h in handles:
            if h.seed is None:
                h.seed = h.request.seed if h.request.seed is not None else random.getrandbits(62)
        return ids, mask, [h.seed for h in handles]

    def _admitter(self, wave: list[Handle]):
        """The loop's ``admit``: waiting requests with the batch's sampling settings join it between steps (up to
        ``max_rows``); others wait for a batch of their own."""
        from mmspec.engine import Admission

        key = _setting(wave[0])

        def admit(running: int):
            new = [h for h in self._held if not h.cancelled]
            while running + len(new) < self.max_rows and not self._deferred:
                # (a request of another setting waits: nothing more joins, the wave drains and that request's
                # wave comes next, so a stream of joining requests cannot starve it)
                try:
                    h = self.queue.get_nowait()
                except queue.Empty:
                    break
                if h.cancelled:
                    continue
                if _setting(h) != key or len(h.ids) < 2:
                    self._deferred.append(h)
                    continue
                new.append(h)
            new, self._held = new[: self.max_rows - running], new[self.max_rows - running:]
            now = _within_budget(new, self.prefill_budget)
            self._held = new[len(now):] + self._held  # the next steps (first come, first served)
            new = now
            if not new:
                return None
            ids, mask, seeds = self._batch(new)
            wave.extend(new)
            self.stats["running_rows"] = running + len(new)
            self.stats["joined"] += len(new)
            return Admission(ids, mask, [h.budget for h in new], seeds)
        return admit

    def _events(self, wave: list[Handle], ids: torch.Tensor, mask: torch.Tensor, seeds: list[int],
                joins: bool = True):
        """The loop's step events for ``wave`` (its prompts ``ids`` / ``mask``, its rows' seeds); the rows of
        requests admitted later (``joins``) are appended to ``wave``."""
        from mmspec.engine import generate_stream

        req0 = wave[0].request
        drafter = self.drafter()
        return generate_stream(self.target, ids, attention_mask=mask, drafter=drafter,
                               max_new_tokens=[h.budget for h in wave], temperature=req0.temperature,
                               top_p=req0.top_p if req0.top_p < 1.0 else None, seed=seeds,
                               eos_token_id=self.target.generation_config.eos_token_id,
                               admit=self._admitter(wave) if joins and self.joins else None,
                               leave=lambda r: wave[r].done.is_set() or wave[r].cancelled)

    def _run_wave(self, wave: list[Handle], joins: bool = True) -> None:
        tok = self.tokenizer
        ids, mask, seeds = self._batch(wave)
        eos_ids = eos_set(self.target.generation_config.eos_token_id)
        self.stats["waves"] += 1
        self.stats["running_rows"] = len(wave)
        tokens: dict[int, list[int]] = defaultdict(list)  # row -> its committed tokens (rows may join)
        t0 = time.perf_counter()
        events = self._events(wave, ids, mask, seeds, joins)
        for ev in events:
            self.stats["steps"] += 1
            self.stats["row_steps"] += len(ev.rows)
            self.stats["accepted"] += sum(ev.num_accepted)
            for r, toks, fin in zip(ev.rows, ev.tokens, ev.finished):
                h = wave[r]
                if h.done.is_set():
                    continue
                take = toks[: h.budget - len(tokens[r])]
                tokens[r].extend(take)
                eos_hit = bool(take) and take[-1] in eos_ids
                text = tok.decode(tokens[r][:-1] if eos_hit else tokens[r], skip_special_tokens=True)
                reason = None
                for s in h.request.stop:
                    cut = text.find(s)
                    if cut >= 0:
                        text, reason = text[:cut], "stop"
                if reason is None and eos_hit:
                    reason = "stop"
                if reason is None and len(tokens[r]) >= h.budget:
                    reason = "length"
                if reason is None and fin:
                    reason = "stop"
                h.text, h.completion_tokens = text, len(tokens[r])
                if reason or h.cancelled:
                    self._finish(h, text, h.sent, len(tokens[r]), reason or "cancelled")
                    continue
                piece = text[h.sent: len(text) - _held_back(text, h.request.stop)]
                if piece:
                    h.pieces.put(piece)
                    h.sent += len(piece)
            self.stats["running_rows"] = len(ev.rows) - sum(ev.finished)
        self.stats["decode_seconds"] += time.perf_counter() - t0
        for r, h in enumerate(wave):  # rows the loop ended without a reason (it ran out of budget)
            if not h.done.is_set():
                self._finish(h, tok.decode(tokens[r], skip_special_tokens=True), h.sent, len(tokens[r]), "length")

    def _finish(self, h: Handle, text: str, sent: int, num_tokens: int, reason: str) -> None:
        """End ``h``: the rest of its text (after the ``sent`` characters already streamed), then the end mark."""
        if text[sent:]:
            h.pieces.put(text[sent:])
            h.sent = len(text)
        h.text, h.completion_tokens, h.finish_reason = text, num_tokens, reason
        self.stats["completed"] += 1
        self.stats["tokens"] += num_tokens
        h.pieces.put(None)
        h.done.set()


class VLMWorker(Worker):
    """A worker for a HF vision-language model (LLaVA family and others whose processor has a chat template): chat
    requests with ``image_url`` parts, decoded in waves on the one loop by :func:`mmspec.vision.generate_stream`
    with a drafter that sees a pruned share of the visual tokens (``pruning``, ``keep_ratio``). Rows do not join
    a running wave (the multimodal prefill is the wave's)."""

    takes_images = True

    def __init__(self, target: torch.nn.Module, processor: Any, *, drafter: Any, model_name: str,
                 pruning: str = "verifier", keep_ratio: float = 0.25, num_draft_tokens: Any = None, **kw: Any):
        self.processor, self.vlm_drafter = processor, drafter
        self.pruning, self.keep_ratio, self.num_draft_tokens = pruning, keep_ratio, num_draft_tokens
        text = getattr(target.config, "text_config", target.config)
        kw.setdefault("context", int(getattr(text, "max_position_embeddings", 2048)))
        super().__init__(target, processor.tokenizer, model_name=model_name, drafter=lambda: None, **kw)

    def _inputs(self, requests: list[GenerationRequest]) -> dict:
        """The processor's left-padded batch of ``requests`` (their chats with the images where they were)."""
        texts = [self.processor.apply_chat_template(r.parts, add_generation_prompt=True) for r in requests]
        images = [im for r in requests for im in r.images]
        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = dict(self.processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
        finally:
            tok.padding_side = side
        dtype = next(self.target.parameters()).dtype
        return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in enc.items()}

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.kind != "chat" or not req.images:
            raise RequestError(f"the model '{self.model_name}' answers about images: send a chat whose messages "
                               "hold an image_url part", param="messages")
        try:
            enc = self._inputs([req])
        except Exception as exc:  # the processor's own message names the problem
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RequestError(f"the processor cannot prepare this request: {first}", param="messages") from None
        return enc["input_ids"][0].tolist()

    def _events(self, wave: list[Handle], ids: torch.Tensor, mask: torch.Tensor, seeds: list[int],
                joins: bool = True):
        import mmspec.vision as mv

        req0 = wave[0].request
        extra = {} if self.num_draft_tokens is None else {"num_draft_tokens": self.num_draft_tokens}
        return mv.generate_stream(self.target, self.vlm_drafter, self._inputs([h.request for h in wave]),
                                  pruning=self.pruning, keep_ratio=self.keep_ratio,
                                  max_new_tokens=[h.budget for h in wave], temperature=req0.temperature,
                                  top_p=req0.top_p if req0.top_p < 1.0 else None, seed=seeds,
                                  eos_token_id=self.target.generation_config.eos_token_id,
                                  leave=lambda r: wave[r].done.is_set() or wave[r].cancelled, **extra)


def cost_aware_lookup(target):
    """A factory of prompt-lookup drafters whose draft length is chosen per step from this target's verification
    cost measured here (up to 128 tokens a forward) for the batch's rows (``CostAwareDraftLength``, k = 0 allowed):
    a wide batch drafts less, or not at all, where verifying drafts would cost more than they save."""
    from mmspec.drafters.adaptive import CostAwareDraftLength
    from mmspec.drafters.cost_model import measure_cost_model
    from mmspec.drafters.prompt_lookup import PromptLookupDrafter

    cost = measure_cost_model(target, widths=(1, 2, 4, 8, 16, 32, 64, 128), repeats=3)
    return lambda: PromptLookupDrafter(draft_length=CostAwareDraftLength(cost, max_k=10, min_k=0))


def _within_budget(handles: list[Handle], budget: int | None) -> list[Handle]:
    """The first of ``handles`` whose prompts fit ``budget`` tokens together (at least one; all for None)."""
    if budget is None:
        return handles
    total = 0
    for i, h in enumerate(handles):
        total += len(h.ids)
        if total > budget and i > 0:
            return handles[:i]
    return handles


def _setting(h: Handle) -> tuple[float, float]:
    """The sampling settings a wave shares: (temperature, top-p)."""
    return (h.request.temperature, h.request.top_p)


def _can_join(drafter: Any) -> bool:
    """Whether ``drafter`` (what the factory returned) can take rows into a running batch (``Drafter.add_rows``)."""
    from mmspec.drafters.base import Drafter
    from mmspec.heads.eagle3 import Eagle3Head

    if drafter is None or drafter == "prompt_lookup" or isinstance(drafter, Eagle3Head):
        return True  # (a head becomes a FeatureDrafter, which takes rows)
    return isinstance(drafter, Drafter) and type(drafter).add_rows is not Drafter.add_rows


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` to hold back: an incomplete UTF-8 character (decoded as U+FFFD) or the
    start of a stop sequence."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


__all__ = ["Handle", "VLMWorker", "Worker", "cost_aware_lookup"]
