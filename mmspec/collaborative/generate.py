"""Collaborative decoding of several models, standard or speculative (CoS), through the one loop.

Paper: Fu et al., "Fast Large Language Model Collaborative Decoding via Speculation" (CoS, ICML 2025,
arXiv 2502.01662).

Glossary:
    standard     ``proposal=None``: every model runs one forward per token and the token is sampled from r
                 (the baseline CoS accelerates)
    speculative  ``proposal=FixedProposer(...)`` or ``AlternateProposals(...)``: drafts verified against r
                 with lossless rejection sampling (greedy: the argmax of r), so the output is distributed
                 exactly as standard collaborative decoding's (token-identical when greedy)

The combined session (:class:`~mmspec.collaborative.session.CollaborativeSession`) is the loop's target and
the proposal drafter its drafter: :func:`mmspec.engine.decode` runs unchanged.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import torch

from ..drafters.base import NoDrafter
from ..drafters.model import check_same_tokenizer, model_device, model_vocab_size
from ..engine import GenerationOutput, StepEvent, collect_output, decode
from ..errors import DeviceMismatchError, InvalidWeightsError, VocabularyMismatchError
from ..request import DecodeRequest, prepare_request
from ..stats import GenerationStats
from ..verify.chain import default_rule
from .combine import Combination
from .proposals import AlternateProposals, FixedProposer, ProposalDrafter
from .session import CollaborativeSession


def check_models(models: Sequence[torch.nn.Module], combine: Combination, tokenizers: Sequence[Any] | None = None) -> None:
    """Named errors before any work: fewer than two models, a combination for another number of models,
    vocabularies (or tokenizers, when given) that differ, models on different devices."""
    if isinstance(models, torch.nn.Module) or len(models) < 2:
        raise InvalidWeightsError("collaborative decoding needs a list of at least 2 models")
    if not isinstance(combine, Combination):
        raise TypeError(f"combine must be a Combination (WeightedEnsemble, ContrastiveDecoding), got {type(combine).__name__}")
    combine.check_models(len(models))
    sizes = [model_vocab_size(m) for m in models]
    if len(set(sizes)) > 1:
        raise VocabularyMismatchError(f"the models' vocabularies differ in size: {sizes}; collaborative decoding "
                                      "combines distributions over one vocabulary")
    if tokenizers is not None:
        for tok in tokenizers[1:]:
            check_same_tokenizer(tokenizers[0], tok)
    devices = [model_device(m) for m in models]
    if len(set(devices)) > 1:
        raise DeviceMismatchError(f"the models are on different devices: {[str(d) for d in devices]}")


def generate_stream(
    models: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    *,
    combine: Combination,
    proposal: FixedProposer | AlternateProposals | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    tokenizers: Sequence[Any] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[StepEvent]:
    """Collaborative decoding as a stream of :class:`~mmspec.engine.StepEvent` (arguments as :func:`generate`).
    Input is validated eagerly."""
    check_models(models, combine, tokenizers)
    if proposal is not None and not isinstance(proposal, (FixedProposer, AlternateProposals)):
        raise TypeError(f"proposal must be None, a FixedProposer or AlternateProposals, got {type(proposal).__name__}")
    request = prepare_request(models, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=generator, seed=seed, eos_token_id=eos_token_id,
                              attention_mask=attention_mask)
    session = CollaborativeSession(models, combine, request.batch_size, request.device)
    drafter = NoDrafter() if proposal is None else ProposalDrafter(session, proposal)
    drafter.set_stop_tokens(request.eos)
    return _run(session, drafter, request, stats if stats is not None else GenerationStats())


def _run(session: CollaborativeSession, drafter: NoDrafter | ProposalDrafter, request: DecodeRequest,
         stats: GenerationStats) -> Iterator[StepEvent]:
    with torch.no_grad():
        t_start = time.perf_counter()
        session.prefill(request.input_ids, request.attention_mask)
        stats.prefill_time = time.perf_counter() - t_start
        drafter.start(request.input_ids, request.attention_mask, sampling=request.sampling, rng=request.rng)
        yield from decode(session, drafter, request.input_ids[:, -1:], max_new_tokens=request.budgets,
                          sampling=request.sampling, rule=default_rule(request.sampling), rng=request.rng,
                          eos=request.eos, stats=stats, t_start=t_start)
        stats.extra.update(drafter.info)
        stats.extra["calls_per_model"] = session.calls_per_model


def generate(
    models: Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    *,
    combine: Combination,
    proposal: FixedProposer | AlternateProposals | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    tokenizers: Sequence[Any] | None = None,
) -> GenerationOutput:
    """Sample from the combination ``combine`` of ``models`` (HF causal LMs sharing one vocabulary).

    Args:
        models: the models, in the order the combination's weights / roles refer to.
        input_ids: long [B, L], left padded when rows differ in length (one tokenizer for all models).
        combine: :class:`~mmspec.collaborative.WeightedEnsemble` or
            :class:`~mmspec.collaborative.ContrastiveDecoding`.
        proposal: None (standard collaborative decoding: every model at every token),
            :class:`~mmspec.collaborative.FixedProposer` (one model drafts, all verify against r) or
            :class:`~mmspec.collaborative.AlternateProposals` (models take turns; bonus tokens become proposals).
        max_new_tokens, temperature, top_k, top_p, generator, seed, eos_token_id, attention_mask,
        pad_token_id: as :func:`mmspec.generate`; the sampling parameters apply to r.
        tokenizers: optional, one per model: checked to map the same strings to the same ids.

    Returns:
        :class:`~mmspec.engine.GenerationOutput` (``stats.extra`` holds forwards per model and proposals).
    """
    stream = generate_stream(models, input_ids, combine=combine, proposal=proposal, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, seed=seed,
                             eos_token_id=eos_token_id, attention_mask=attention_mask, tokenizers=tokenizers)
    return collect_output(stream, input_ids, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                          generation_config=getattr(models[0], "generation_config", None))
