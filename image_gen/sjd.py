"""Speculative Jacobi Decoding (SJD): training-free self-drafting for AR image models.

Paper: Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free
Speculative Jacobi Decoding" (ICLR 2025).

Glossary:
    window     the L not-yet-accepted tokens an image keeps guessing (L = draft length)
    q          for each window token, the distribution it was sampled from: the target's own
               (guided, processed) distribution at that position in the *previous* iteration,
               whose context still held the then-current guesses; fresh positions start from a
               uniform q (random initialisation)
    iteration  one target forward over [pending, window]; the exact rule accepts the longest
               prefix with u < min(1, p_t(x) / q_{t-1}(x)) and resamples the first rejection from
               norm(max(0, p_t - q_{t-1})) — lossless, since every guess x was drawn from its q
    refine     window positions after the emitted token are redrawn from this iteration's p_t
               (Jacobi update), then the window is topped up with new random guesses

In greedy mode (temperature 0) this is plain Jacobi decoding: guesses are argmaxes, accepted
while they equal the target's argmax.

SJD is a :class:`~mmspec.drafters.base.Drafter` of the one decoding loop: it needs no model, and
``observe`` refines the window from the target logits of the verification forward
(``StepOutcome.target_logits``). Guesses for position t of a row are drawn with the row's keyed
uniform ``rng.uniform(JACOBI, t)`` (fresh guesses: a uniform code; refined ones: inverse CDF of p_t),
so a row's images never depend on its batch neighbours.
"""

from __future__ import annotations

from typing import Any

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.base import Draft, Drafter, StepOutcome, widest_budget
from mmspec.drafters.model import model_vocab_size
from mmspec.errors import InvalidDraftLengthError
from mmspec.rng import JACOBI, RowRandom
from mmspec.sampling import logits_to_probs, sample_inverse_cdf


class JacobiDrafter(Drafter):
    """SJD's self-drafting window; needs no second model (the target refines its own guesses)."""

    def __init__(self, window: int = 16, vocab_size: int | None = None):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise InvalidDraftLengthError(f"SJD window must be an int >= 1, got {window!r}")
        self.window = window
        self.vocab_size = vocab_size

    def check_compatible(self, target: torch.nn.Module) -> None:
        if self.vocab_size is None:
            self.vocab_size = model_vocab_size(target)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: SamplingParams,
              rng: RowRandom, guidance: Any = None, **model_inputs: Any) -> None:
        if self.vocab_size is None:
            raise RuntimeError("JacobiDrafter needs vocab_size (the codebook size)")
        self.sampling, self.rng = sampling, rng
        self.device = input_ids.device
        batch = input_ids.shape[0]
        self.position = torch.zeros((batch,), dtype=torch.long)  # committed tokens per row
        self.tokens = self._fresh(self.position.unsqueeze(1) + torch.arange(self.window))  # [B, W]
        self.q = None if sampling.is_greedy else torch.full(
            (batch, self.window, self.vocab_size), 1.0 / self.vocab_size, device=self.device)  # [B, W, V]

    def _fresh(self, positions: torch.Tensor) -> torch.Tensor:
        """Random initial guesses (uniform q) for positions long [B, n] -> long [B, n]."""
        if self.sampling.is_greedy:
            return torch.zeros(positions.shape, dtype=torch.long, device=self.device)
        u = self.rng.uniform(JACOBI, positions, device=self.device)
        return (u.to(torch.float64) * self.vocab_size).long().clamp_max(self.vocab_size - 1)

    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        k = max(1, min(self.window, widest_budget(max_tokens)))
        probs = None if self.q is None else self.q[:, :k]
        num = torch.full((self.tokens.shape[0],), k, dtype=torch.long, device=self.device)
        return Draft(tokens=self.tokens[:, :k], probs=probs, num_draft=num)

    def observe(self, outcome: StepOutcome) -> None:
        k = outcome.draft.k
        batch, W, V = self.tokens.shape[0], self.window, self.vocab_size
        p = logits_to_probs(outcome.target_logits, self.sampling)  # [B, k+1, V]: column j predicts position + j
        n = outcome.result.num_accepted.to(self.device)  # [B]
        emitted = torch.tensor([len(c) for c in outcome.committed], dtype=torch.long)
        # candidates per row: refined guesses for every column (position + j), the old guesses beyond the
        # block, fresh guesses for the new window's slots (next + s); the new window picks from them
        cols = self.position.unsqueeze(1) + torch.arange(k + 1)  # [B, k+1]
        if self.sampling.is_greedy:
            refined = p.argmax(dim=-1)
        else:
            u = self.rng.uniform(JACOBI, cols, device=self.device)
            refined = sample_inverse_cdf(p.reshape(-1, V), u.reshape(-1)).view(batch, k + 1)
        tail = self.tokens[:, k + 1:]  # [B, W-k-1] (empty when the window was fully used)
        nxt = self.position + emitted
        fresh = self._fresh(nxt.unsqueeze(1) + torch.arange(W))  # [B, W]
        cand = torch.cat([refined, tail, fresh], dim=1)  # [B, k+1 + T + W]
        n_ref = (k - n).clamp_min(0)  # [B]: refined guesses kept (columns n+1 .. k)
        T = tail.shape[1]
        s = torch.arange(W, device=self.device).unsqueeze(0)  # [1, W]
        idx = torch.where(s < n_ref.unsqueeze(1), n.unsqueeze(1) + 1 + s,  # refined
                          torch.where(s < (n_ref + T).unsqueeze(1), k + 1 + s - n_ref.unsqueeze(1),  # tail
                                      k + 1 + T + s))  # fresh, keyed by its own position
        self.tokens = cand.gather(1, idx)
        if self.q is not None:
            uniform = torch.full((batch, W, V), 1.0 / V, device=self.device)
            qc = torch.cat([p, self.q[:, k + 1:], uniform], dim=1)
            self.q = qc.gather(1, idx.unsqueeze(-1).expand(-1, -1, V))
        self.position = nxt

    def select_rows(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens[rows]
        self.q = None if self.q is None else self.q[rows]
        self.position = self.position[rows.cpu()]
