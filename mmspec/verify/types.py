"""Result types and sentinels of the verification core.

Glossary (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"):
    drafted     the k tokens a drafter proposed for a row
    accepted    the longest verified prefix of the drafted tokens
    recovered   the replacement token sampled at the first rejection
    bonus       the extra target token sampled when all k drafted tokens are accepted
    emitted     accepted + 1 (the recovered or bonus token)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Fills ``VerifyResult.tokens`` after the last emitted token of a row.
PLACEHOLDER_TOKEN_ID: int = -1


class Judgement(NamedTuple):
    """What an acceptance rule says about each drafted position.

    accepted: bool [B, k]   the rule accepts drafted token i *given* all before it were accepted
    residual: float [B, k, V] unnormalised distribution to draw the recovered token from
              when position i is the first rejection
    """

    accepted: torch.Tensor
    residual: torch.Tensor


class VerifyResult(NamedTuple):
    """Outcome of verifying one block of drafted tokens per row.

    num_accepted: long [B]       accepted drafted tokens per row (0..k)
    tokens:       long [B, k+1]  emitted tokens; positions >= num_accepted + 1 hold
                                 ``PLACEHOLDER_TOKEN_ID``
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor

    @property
    def num_emitted(self) -> torch.Tensor:
        """long [B]: accepted + 1."""
        return self.num_accepted + 1
