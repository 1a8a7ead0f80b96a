"""The speculative-decoding loop for HF causal LMs (batched, lossless).

Paper: Leviathan et al. (ICML 2023); Chen et al. (2023).

Glossary:
    pending     the last committed token of each row: not yet in the target's cache; every
                step feeds ``[pending, d_1..d_k]`` and gets k+1 logits
    committed   tokens a row keeps from one step: accepted drafts + the recovered/bonus token,
                cut after EOS and at ``max_new_tokens``
    finished    a row that emitted EOS or reached ``max_new_tokens``; it leaves the batch
                (its cache rows are dropped from target and drafter)

The loop only talks to the target through :class:`~mmspec.cache.CacheSession` (forward +
rollback) and to the drafter through the :class:`~mmspec.drafters.base.Drafter` protocol.
``generate_stream`` yields one :class:`StepEvent` per verification step; ``generate``
consumes the stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .cache import CacheSession
from .config import SamplingParams
from .drafters.adaptive import DraftLengthPolicy
from .drafters.base import Drafter, StepOutcome
from .drafters.model import ModelDrafter, model_device
from .drafters.prompt_lookup import PromptLookupDrafter
from .errors import (DeviceMismatchError, EmptyPromptError, InvalidDraftLengthError,
                     InvalidLengthError, ShapeError)
from .stats import GenerationStats
from .verify.chain import default_rule, verify_chain
from .verify.rule import AcceptRule

DEFAULT_NUM_DRAFT_TOKENS = 5

#: prefill(session, input_ids, attention_mask, model_inputs): feed all prompt tokens but the last
PrefillFn = Callable[[CacheSession, torch.Tensor, torch.Tensor, dict], None]


def prefill_causal_lm(session: CacheSession, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      model_inputs: dict) -> None:
    """Default target prefill: every prompt token but the last (which stays pending)."""
    if input_ids.shape[1] > 1:
        session.extend(input_ids[:, :-1], attention_mask[:, :-1], num_logits=1, **model_inputs)


@dataclass(frozen=True)
class StepEvent:
    """One verification step.

    rows:         original batch indices of the rows verified in this step
    tokens:       per row, the committed tokens; the first ``num_accepted`` came from the
                  drafter, the last one from the target (unless cut by EOS / max length)
    num_accepted: per row, accepted drafted tokens
    num_draft:    per row, drafted tokens
    finished:     per row, whether it finished in this step
    stats:        the live statistics of the whole call
    """

    step: int
    rows: list[int]
    tokens: list[list[int]]
    num_accepted: list[int]
    num_draft: list[int]
    finished: list[bool]
    stats: GenerationStats


@dataclass(frozen=True)
class GenerationOutput:
    sequences: torch.Tensor  # long [B, L + T], like HF generate (finished rows padded)
    stats: GenerationStats
    num_generated: list[int]  # per row, generated tokens (including EOS)


def commit_row(emitted: list[int], num_accepted: int, remaining: int, eos: set[int] = frozenset()) -> tuple[list[int], bool]:
    """The tokens a row keeps from one step, and whether it finished: the emitted tokens (accepted
    drafts + recovered/bonus), cut at ``remaining`` and after the first EOS."""
    toks = emitted[: num_accepted + 1][:remaining]
    for j, t in enumerate(toks):
        if t in eos:
            return toks[: j + 1], True
    return toks, len(toks) == remaining


def _as_eos_set(eos_token_id: int | list[int] | torch.Tensor | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        return set(eos_token_id.flatten().tolist())
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


#: generation_config fields that change HF generate's logits but that mmspec does not apply
_UNSUPPORTED_GENERATION_SETTINGS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
    "exponential_decay_length_penalty": None, "sequence_bias": None,
}


def warn_ignored_generation_settings(model: torch.nn.Module) -> list[str]:
    """Warn (once per call) about generation_config settings HF ``generate`` would apply and mmspec does not;
    mmspec's output equals ``generate()`` with those settings at their neutral values."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    ignored = []
    for name, neutral in _UNSUPPORTED_GENERATION_SETTINGS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral and not (name == "min_length" and value == 0):
            ignored.append(f"{name}={value!r}")
    if ignored:
        import warnings
        warnings.warn(
            f"{type(model).__name__}.generation_config sets {', '.join(ignored)}, which mmspec does not apply "
            "(it applies temperature, top_k and top_p as given); the output equals HF generate() with these "
            "settings neutral", UserWarning, stacklevel=3)
    return ignored


def resolve_drafter(drafter: Any, num_draft_tokens: int | DraftLengthPolicy | None) -> Drafter:
    """Accept a Drafter, a HF model (-> ModelDrafter) or ``"prompt_lookup"``."""
    if isinstance(drafter, str):
        if drafter != "prompt_lookup":
            raise ValueError(f"unknown drafter {drafter!r}; pass a Drafter, a model or 'prompt_lookup'")
        drafter = PromptLookupDrafter()
    elif isinstance(drafter, torch.nn.Module):
        drafter = ModelDrafter(drafter)
    elif not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a Drafter, a torch model or 'prompt_lookup', got {type(drafter).__name__}")
    if num_draft_tokens is not None and hasattr(drafter, "set_default_length"):
        drafter.set_default_length(num_draft_tokens)
    return drafter


def _validate(target, input_ids, attention_mask, max_new_tokens, num_draft_tokens, generator):
    if not isinstance(input_ids, torch.Tensor):
        raise ShapeError(f"input_ids must be a torch.LongTensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ShapeError(f"input_ids must be a long tensor [B, L], got {tuple(input_ids.shape)} {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise EmptyPromptError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ShapeError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(torch.long)
    empty_rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise EmptyPromptError(f"empty prompt: rows {empty_rows} have no unmasked token")
    if not bool(attention_mask[:, -1].all()):
        raise ShapeError("prompts must be left padded (attention_mask[:, -1] must be 1 for every row)")
    device = model_device(target)
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if t.device != device:
            raise DeviceMismatchError(f"{name} is on {t.device} but the target model is on {device}")
    if generator is not None and torch.device(generator.device).type != device.type:
        raise DeviceMismatchError(f"generator is on {generator.device} but the target model is on {device}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise InvalidLengthError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    if num_draft_tokens is not None and not isinstance(num_draft_tokens, DraftLengthPolicy):
        if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
            raise InvalidDraftLengthError(f"num_draft_tokens (k) must be an int >= 1, got {num_draft_tokens!r}")
    return input_ids, attention_mask, device


def generate_stream(
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    drafter: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_draft_tokens: int | DraftLengthPolicy | None = DEFAULT_NUM_DRAFT_TOKENS,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    rule: AcceptRule | None = None,
    prefill: PrefillFn | None = None,
    **model_inputs: Any,
) -> Iterator[StepEvent]:
    """Speculative decoding as a stream of :class:`StepEvent` (arguments as :func:`generate`).

    Input is validated eagerly (before the first ``next``).
    """
    input_ids, attention_mask, device = _validate(
        target, input_ids, attention_mask, max_new_tokens, num_draft_tokens, generator)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    warn_ignored_generation_settings(target)
    drafter = resolve_drafter(drafter, num_draft_tokens)
    drafter.check_compatible(target)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    return _stream(target, drafter, input_ids, attention_mask, device, max_new_tokens, sampling,
                   rule if rule is not None else default_rule(sampling), generator,
                   _as_eos_set(eos_token_id), model_inputs, prefill or prefill_causal_lm)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _stream(target, drafter: Drafter, input_ids, attention_mask, device, max_new_tokens,
            sampling: SamplingParams, rule: AcceptRule, generator, eos: set[int],
            model_inputs: dict, prefill: PrefillFn) -> Iterator[StepEvent]:
    stats = GenerationStats()
    t_start = time.perf_counter()
    batch = input_ids.shape[0]
    session = CacheSession(target, batch, device)
    with drafter.target_prefill_context(target, input_ids, attention_mask):
        prefill(session, input_ids, attention_mask, model_inputs)
    _sync(device)
    stats.prefill_time = time.perf_counter() - t_start
    t0 = time.perf_counter()
    drafter.start(input_ids, attention_mask, sampling=sampling, generator=generator, **model_inputs)
    _sync(device)
    stats.drafter_prefill_time = time.perf_counter() - t0
    stats.drafter_time += stats.drafter_prefill_time
    stats.extra.update(drafter.info)
    pending = input_ids[:, -1:]  # [B, 1]
    active = list(range(batch))  # original indices of the rows still in the batch
    generated: list[list[int]] = [[] for _ in range(batch)]
    step = 0
    while active:
        remaining = [max_new_tokens - len(generated[r]) for r in active]
        t0 = time.perf_counter()
        draft = drafter.propose(max(1, max(remaining) - 1))
        _sync(device)
        t1 = time.perf_counter()
        block = torch.cat([pending, draft.tokens], dim=1)  # [B', k+1]
        logits = session.extend(block)  # [B', k+1, V]
        _sync(device)
        t2 = time.perf_counter()
        result = verify_chain(draft.tokens, draft.probs, logits, rule, sampling, generator,
                              num_draft=draft.num_draft)
        n_acc = result.num_accepted.tolist()
        out = result.tokens.tolist()
        t3 = time.perf_counter()
        k = draft.k
        session.rollback(k - result.num_accepted)
        pending = result.tokens.gather(1, result.num_accepted.unsqueeze(1))
        committed, finished = [], []
        for i, row in enumerate(active):
            toks, done = commit_row(out[i], n_acc[i], remaining[i], eos)
            generated[row].extend(toks)
            committed.append(toks)
            finished.append(done)
        drafter.observe(StepOutcome(draft=draft, result=result, committed=committed))
        _sync(device)
        t4 = time.perf_counter()
        stats.drafter_time += (t1 - t0) + (t4 - t3)
        stats.target_time += t2 - t1
        stats.verify_time += t3 - t2
        stats.record(n_acc, draft.num_draft.tolist(), [len(c) for c in committed])
        stats.target_calls = session.calls
        stats.drafter_calls = getattr(drafter, "num_calls", 0)
        stats.total_time = time.perf_counter() - t_start
        yield StepEvent(step=step, rows=list(active), tokens=committed, num_accepted=n_acc,
                        num_draft=draft.num_draft.tolist(), finished=finished, stats=stats)
        step += 1
        if any(finished):
            keep = [i for i, f in enumerate(finished) if not f]
            active = [active[i] for i in keep]
            if active:
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                session.select_rows(rows)
                drafter.select_rows(rows)
                pending = pending[rows]
    stats.total_time = time.perf_counter() - t_start


def generate(
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    drafter: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_draft_tokens: int | DraftLengthPolicy | None = DEFAULT_NUM_DRAFT_TOKENS,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    rule: AcceptRule | None = None,
    pad_token_id: int | None = None,
    prefill: PrefillFn | None = None,
    **model_inputs: Any,
) -> GenerationOutput:
    """Speculative decoding with ``target`` verifying ``drafter``'s proposals.

    Args:
        target: any HF causal LM (``PreTrainedModel``).
        input_ids: long [B, L], left padded when rows differ in length.
        drafter: a :class:`~mmspec.drafters.Drafter`, a HF causal LM with the target's vocabulary
            (wrapped in :class:`~mmspec.drafters.ModelDrafter`) or ``"prompt_lookup"``.
        max_new_tokens: tokens to generate per row (> 0).
        temperature, top_k, top_p: sampling as HF's warpers; ``temperature=0`` is greedy.
        num_draft_tokens: k (>= 1) or a draft-length policy; used unless the drafter has its own.
        generator: the only source of randomness.
        eos_token_id: defaults to ``target.generation_config.eos_token_id``.
        rule: acceptance rule; default greedy (temperature 0) or exact rejection sampling.
        pad_token_id: fills finished rows; defaults to the generation config's pad, else EOS, else 0.
        prefill: how the target consumes the prompt (default: token ids; :mod:`mmspec.vision`
            supplies one for VLMs).
        **model_inputs: extra inputs for the target's prefill (and the drafter's ``start``).

    Returns:
        :class:`GenerationOutput` with ``sequences`` shaped like HF ``generate``'s output.
    """
    stream = generate_stream(
        target, input_ids, drafter=drafter, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, num_draft_tokens=num_draft_tokens, generator=generator,
        eos_token_id=eos_token_id, attention_mask=attention_mask, rule=rule, prefill=prefill, **model_inputs)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    stats = GenerationStats()
    for event in stream:
        stats = event.stats
        for row, toks in zip(event.rows, event.tokens):
            generated[row].extend(toks)
    if pad_token_id is None:
        config = getattr(target, "generation_config", None)
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            eos = _as_eos_set(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
            pad_token_id = min(eos) if eos else 0
    width = max(len(g) for g in generated)
    new = torch.full((len(generated), width), int(pad_token_id), dtype=torch.long)
    for b, g in enumerate(generated):
        new[b, : len(g)] = torch.tensor(g, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    return GenerationOutput(sequences=sequences, stats=stats, num_generated=[len(g) for g in generated])
