"""The front door: one place that checks a decoding request and prepares what the one loop needs.

Every entry point that decodes (:func:`mmspec.generate`, :mod:`mmspec.vision`, :mod:`mmspec.image_gen`'s text
prefixes aside, collaborative decoding, the pipeline and FlowSpec) calls :func:`prepare_request` and
:func:`prepare_drafter` before any model runs, so they accept the same arguments, raise the same named errors
and seed, sample and stop the same way.

Glossary:
    DecodeRequest   a checked request: the prompts (long [B, L], left padded) and their attention mask, the
                    device, ``max_new_tokens``, the sampling parameters, the per-row random streams and the
                    EOS ids
    target          the model whose device, vocabulary, EOS ids and generation settings the request is checked
                    against; several models (collaborative decoding) are all checked, the first one gives the
                    device and the EOS ids
    EOS ids         ``eos_token_id`` as given (int, list or tensor), else the target's
                    ``generation_config.eos_token_id``, as HF ``generate`` does; an empty set stops only at
                    ``max_new_tokens``
    vocab check     prompt ids must lie in [0, V) of the smallest input embedding table (``vocab_size``
                    overrides it: ``None`` skips the check, e.g. a pipeline stage that holds no embedding)
    drafter         whatever the user passed (None, ``"prompt_lookup"``, a HF model, an EAGLE-3 head, blockwise
                    heads, a :class:`~mmspec.drafters.base.Drafter`), resolved to a Drafter, given the call's
                    draft length and the EOS ids, and checked against the target
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import SamplingParams
from .drafters.adaptive import DraftLengthPolicy
from .drafters.base import Drafter, NoDrafter
from .drafters.blockwise import BlockwiseDrafter
from .drafters.feature import FeatureDrafter
from .drafters.model import ModelDrafter, model_device
from .drafters.prompt_lookup import PromptLookupDrafter
from .errors import (DeviceMismatchError, EmptyPromptError, InvalidDraftLengthError, InvalidLengthError, ShapeError,
                     TokenIdError)
from .heads.blockwise import BlockwiseHeads
from .heads.eagle3 import Eagle3Head
from .rng import RowRandom

#: ``vocab_size`` default of :func:`prepare_request`: read the target's input embedding table
FROM_TARGET: Any = object()

#: generation_config fields that change HF generate's logits but that mmspec does not apply
UNSUPPORTED_GENERATION_SETTINGS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
    "exponential_decay_length_penalty": None, "sequence_bias": None,
}


@dataclass(frozen=True)
class DecodeRequest:
    """A checked decoding request (see the module glossary)."""

    input_ids: torch.Tensor  # long [B, L], left padded
    attention_mask: torch.Tensor  # long [B, L]; every row's last column is 1
    device: torch.device
    max_new_tokens: int | tuple[int, ...]  # one budget for every row, or one per row
    sampling: SamplingParams
    rng: RowRandom
    eos: frozenset[int]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def budgets(self) -> list[int]:
        """Tokens each row may still generate (the loop's ``max_new_tokens`` per row)."""
        if isinstance(self.max_new_tokens, tuple):
            return list(self.max_new_tokens)
        return [self.max_new_tokens] * self.batch_size


def eos_set(eos_token_id: int | list[int] | torch.Tensor | None) -> frozenset[int]:
    """EOS ids as a set (``None``: none)."""
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        return frozenset(int(e) for e in eos_token_id.flatten().tolist())
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(e) for e in eos_token_id)


def input_vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the input embedding table (ids >= this crash the embedding lookup)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def check_token_ids(input_ids: torch.Tensor, vocab: int | None) -> None:
    """:class:`TokenIdError` for a prompt id < 0 or >= the model's vocabulary (padding included)."""
    if vocab is None or input_ids.numel() == 0:
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
        raise TokenIdError(f"input_ids hold ids outside the vocabulary [0, {vocab}): {sorted(set(bad.tolist()))[:5]}")


def check_draft_length(num_draft_tokens: int | DraftLengthPolicy | None) -> None:
    """:class:`InvalidDraftLengthError` unless ``num_draft_tokens`` is None, a policy or an int >= 1."""
    if num_draft_tokens is None or isinstance(num_draft_tokens, DraftLengthPolicy):
        return
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
        raise InvalidDraftLengthError(f"num_draft_tokens (k) must be an int >= 1, got {num_draft_tokens!r}")


def check_prompts(input_ids: Any, attention_mask: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as (input_ids long [B, L], attention_mask long [B, L]); named errors for a wrong type or shape,
    an empty row, right padding or another device."""
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
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if t.device != device:
            raise DeviceMismatchError(f"{name} is on {t.device} but the target model is on {device}")
    return input_ids, attention_mask


def warn_ignored_generation_settings(model: torch.nn.Module) -> list[str]:
    """Warn about generation_config settings HF ``generate`` would apply and mmspec does not; mmspec's output
    equals ``generate()`` with those settings at their neutral values."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    ignored = []
    for name, neutral in UNSUPPORTED_GENERATION_SETTINGS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral and not (name == "min_length" and value == 0):
            ignored.append(f"{name}={value!r}")
    if ignored:
        warnings.warn(
            f"{type(model).__name__}.generation_config sets {', '.join(ignored)}, which mmspec does not apply "
            "(it applies temperature, top_k and top_p as given); the output equals HF generate() with these "
            "settings neutral", UserWarning, stacklevel=4)
    return ignored


def prepare_request(
    target: torch.nn.Module | Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    num_draft_tokens: int | DraftLengthPolicy | None = None,
    vocab_size: int | None = FROM_TARGET,
) -> DecodeRequest:
    """Check a request against ``target`` (a model, or the models of a combination) before any work; named
    errors (:mod:`mmspec.errors`) for anything it cannot run. Arguments as :func:`mmspec.generate`."""
    models = [target] if isinstance(target, torch.nn.Module) else list(target)
    first = models[0]
    device = model_device(first)
    input_ids, attention_mask = check_prompts(input_ids, attention_mask, device)
    if generator is not None and torch.device(generator.device).type != device.type:
        raise DeviceMismatchError(f"generator is on {generator.device} but the target model is on {device}")
    if vocab_size is FROM_TARGET:
        sizes = [v for v in (input_vocab_size(m) for m in models) if v is not None]
        vocab_size = min(sizes) if sizes else None
    check_token_ids(input_ids, vocab_size)
    if isinstance(max_new_tokens, (list, tuple)):  # one budget per row (a server's requests in one batch)
        if len(max_new_tokens) != input_ids.shape[0] or not all(
                isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in max_new_tokens):
            raise InvalidLengthError(f"max_new_tokens must be an int > 0 or one per row ({input_ids.shape[0]}), "
                                     f"got {max_new_tokens!r}")
        max_new_tokens = tuple(max_new_tokens)
    elif not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise InvalidLengthError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    check_draft_length(num_draft_tokens)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    rng = RowRandom.from_seed(seed, input_ids.shape[0], generator)
    for m in models:
        warn_ignored_generation_settings(m)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(first, "generation_config", None), "eos_token_id", None)
    return DecodeRequest(input_ids=input_ids, attention_mask=attention_mask, device=device,
                         max_new_tokens=max_new_tokens, sampling=sampling, rng=rng, eos=eos_set(eos_token_id))


def resolve_drafter(drafter: Any, num_draft_tokens: int | DraftLengthPolicy | None = None) -> Drafter:
    """A Drafter for what the user passed: a Drafter as is, a HF model (-> ModelDrafter), an EAGLE-3 head
    (-> FeatureDrafter), blockwise heads (-> BlockwiseDrafter), ``"prompt_lookup"`` or None (plain AR); it
    takes ``num_draft_tokens`` unless it was given a draft length of its own."""
    if drafter is None:
        return NoDrafter()
    if isinstance(drafter, str):
        if drafter != "prompt_lookup":
            raise ValueError(f"unknown drafter {drafter!r}; pass a Drafter, a model or 'prompt_lookup'")
        drafter = PromptLookupDrafter()
    elif isinstance(drafter, BlockwiseHeads):
        drafter = BlockwiseDrafter(drafter)
    elif isinstance(drafter, Eagle3Head):
        drafter = FeatureDrafter(drafter)
    elif isinstance(drafter, torch.nn.Module):
        drafter = ModelDrafter(drafter)
    elif not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a Drafter, a torch model or 'prompt_lookup', got {type(drafter).__name__}")
    if num_draft_tokens is not None:
        drafter.set_default_length(num_draft_tokens)
    return drafter


def prepare_drafter(drafter: Any, request: DecodeRequest, *, num_draft_tokens: int | DraftLengthPolicy | None = None,
                    target: torch.nn.Module | None = None) -> Drafter:
    """:func:`resolve_drafter`, then the request's EOS ids (drafters that cut their drafts there) and, when
    ``target`` is given, the drafter's own compatibility check (vocabulary, device)."""
    drafter = resolve_drafter(drafter, num_draft_tokens)
    if target is not None:
        drafter.check_compatible(target)
    drafter.set_stop_tokens(request.eos)
    return drafter


__all__ = ["DecodeRequest", "FROM_TARGET", "check_draft_length", "check_prompts", "check_token_ids", "eos_set",
           "input_vocab_size", "prepare_drafter", "prepare_request", "resolve_drafter",
           "warn_ignored_generation_settings"]
