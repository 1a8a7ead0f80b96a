"""What collaborative decoding samples from: a combination r = f(p_1 .. p_n) of several models' next-token
distributions over one vocabulary.

Papers: weighted ensembles as used by Fu et al., "Fast Large Language Model Collaborative Decoding via
Speculation" (CoS, ICML 2025, arXiv 2502.01662); contrastive decoding, Li et al., "Contrastive Decoding:
Open-ended Text Generation as Optimization" (ACL 2023), in CoS's logit form.

Glossary:
    combined logits  float [B, w, V]: log r up to a per-row constant. The sampling parameters (temperature,
                     top-k, top-p) then apply to them exactly as to one model's logits, so standard
                     collaborative decoding and its speculative version sample the same r
    weighted ensemble  r = sum_i w_i softmax(l_i): a mixture in probability space (weights >= 0, sum 1)
    contrastive      r = softmax(log p_e - alpha log p_a): the expert's log-probabilities minus alpha times
                     the amateur's (equal to l_e - alpha l_a after softmax); with ``plausibility`` beta, tokens
                     the expert gives less than beta * its top probability are cut (Li et al.'s adaptive
                     plausibility constraint; CoS uses none, the default here)

A combination is a pure function of the models' raw logits; it never sees a model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InvalidWeightsError, MethodParameterError, NonFiniteError

#: floor for the amateur's log-probabilities, so that a token it rules out (-inf) is not boosted to +inf
MIN_LOG_PROB = -1e4


class Combination(ABC):
    """Maps the n models' logits (each float [B, w, V]) to combined logits [B, w, V]."""

    #: how many models the combination takes
    num_models: int

    @abstractmethod
    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combined logits float32 [B, w, V] of the models' raw logits (one [B, w, V] per model, in order)."""

    def check_models(self, num_models: int) -> None:
        """:class:`InvalidWeightsError` unless the combination takes ``num_models`` models."""
        if num_models != self.num_models:
            raise InvalidWeightsError(
                f"{type(self).__name__} combines {self.num_models} models but {num_models} were given")


def _check_number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodParameterError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class WeightedEnsemble(Combination):
    """r = sum_i weights[i] * softmax(logits_i): the models' distributions mixed in probability space."""

    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        weights = tuple(self.weights) if not isinstance(self.weights, (int, float)) else (self.weights,)
        if len(weights) < 2:
            raise InvalidWeightsError(f"a weighted ensemble needs at least 2 weights, got {list(weights)}")
        for i, w in enumerate(weights):
            w = _check_number(f"weights[{i}]", w)
            if w < 0:
                raise InvalidWeightsError(f"weights must be >= 0, got weights[{i}] = {w}")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise InvalidWeightsError(f"weights must sum to 1, got {list(weights)} (sum {sum(weights):.6g})")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))

    @classmethod
    def uniform(cls, num_models: int) -> "WeightedEnsemble":
        """Equal weights 1/n."""
        return cls(tuple([1.0 / num_models] * num_models))

    @property
    def num_models(self) -> int:  # type: ignore[override]
        return len(self.weights)

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        self.check_models(len(logits))
        parts = [l.float().log_softmax(dim=-1) + math.log(w) for l, w in zip(logits, self.weights) if w > 0]
        return torch.logsumexp(torch.stack(parts), dim=0)  # [B, w, V] = log r


@dataclass(frozen=True)
class ContrastiveDecoding(Combination):
    """r = softmax(log p_expert - alpha * log p_amateur), optionally cut to the expert's plausible tokens.

    expert, amateur: indices of the two models; alpha >= 0 (CoS uses 0.1); plausibility: None (no cut) or
    beta in (0, 1]: keep tokens with p_expert >= beta * max p_expert.
    """

    alpha: float = 0.1
    plausibility: float | None = None
    expert: int = 0
    amateur: int = 1

    def __post_init__(self) -> None:
        alpha = _check_number("alpha", self.alpha)
        if alpha < 0:
            raise MethodParameterError(f"alpha must be >= 0, got {alpha}")
        if self.plausibility is not None:
            beta = _check_number("plausibility", self.plausibility)
            if not 0.0 < beta <= 1.0:
                raise MethodParameterError(f"plausibility must be in (0, 1] or None, got {beta}")
        if {self.expert, self.amateur} != {0, 1}:
            raise MethodParameterError(f"expert and amateur must be the models 0 and 1, got {self.expert}, {self.amateur}")

    num_models = 2

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        self.check_models(len(logits))
        expert = logits[self.expert].float().log_softmax(dim=-1)
        amateur = logits[self.amateur].float().log_softmax(dim=-1).clamp_min(MIN_LOG_PROB)
        scores = expert - self.alpha * amateur
        if self.plausibility is not None:
            cut = expert < expert.amax(dim=-1, keepdim=True) + math.log(self.plausibility)
            scores = scores.masked_fill(cut, float("-inf"))
        return scores
