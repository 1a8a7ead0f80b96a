"""Logits processing and sampling shared by target and drafters.

Glossary:
    processed distribution   softmax of the logits after temperature, top-k and top-p,
                             computed exactly as HF transformers' logits warpers do, in float32
                             (HF ``generate`` casts next-token logits to float32 first).
    exponential race         a sample from an unnormalised weight vector ``w`` is
                             ``argmax(w / E)`` with ``E ~ Exp(1)`` i.i.d.; one noise vector per row
                             serves every position because a row emits only one sampled token
                             per verification (recovered *or* bonus).

Greedy (temperature 0) distributions are one-hot at the first argmax, as ``torch.argmax``
breaks ties, which is what HF greedy search does.
"""

from __future__ import annotations

import torch

from .config import SamplingParams

#: Floor for exponential noise so that ``w / E`` never divides by zero.
MIN_EXPONENTIAL = 1e-20


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k, top-p like HF's warpers. logits [..., V] -> float32 [..., V].

    Filtered entries are ``-inf``. For greedy params the logits are returned unchanged (cast).
    """
    scores = logits.to(torch.float32)
    if params.is_greedy:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    vocab = scores.shape[-1]
    if params.top_k:
        k = min(max(params.top_k, 1), vocab)
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1.0 - params.top_p)
        remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed distribution. logits [..., V] -> probs float32 [..., V] (one-hot if greedy)."""
    scores = process_logits(logits, params)
    if params.is_greedy:
        return torch.nn.functional.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(torch.float32)
    return scores.softmax(dim=-1)


def draw_exponential(shape: tuple[int, ...], *, device: torch.device | str,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) noise for the exponential race, floored at ``MIN_EXPONENTIAL``. float32 [shape]."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    noise.exponential_(generator=generator)
    return noise.clamp_min_(MIN_EXPONENTIAL)


def sample_from_weights(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample indices proportional to non-negative ``weights`` [..., V] with Exp noise [..., V]."""
    return (weights / noise).argmax(dim=-1)


def sample(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from processed probs [..., V]; greedy params give the argmax."""
    if params.is_greedy:
        return probs.argmax(dim=-1)
    noise = draw_exponential(tuple(probs.shape), device=probs.device, generator=generator)
    return sample_from_weights(probs, noise)


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample indices proportional to non-negative ``weights`` [B, V] with one uniform per row [B]
    (inverse CDF: the first index whose cumulative weight exceeds u * total; zero weights are never
    chosen). Cheaper than the exponential race when the randomness is keyed per row."""
    cum = weights.to(torch.float64).cumsum(dim=-1)  # [B, V]
    target = (uniforms.to(torch.float64) * cum[..., -1]).unsqueeze(-1)  # [B, 1]
    idx = torch.searchsorted(cum, target, right=True).squeeze(-1)
    return idx.clamp_max(weights.shape[-1] - 1)
