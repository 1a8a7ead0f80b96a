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
"""

from __future__ import annotations

import torch

from mmspec.config import SamplingParams
from mmspec.drafters.base import Draft
from mmspec.errors import InvalidDraftLengthError
from mmspec.sampling import logits_to_probs, sample

from .drafting import GuidanceSpec, ImageDrafter, ImageStepOutcome


class JacobiDrafter(ImageDrafter):
    """SJD's self-drafting window; needs no second model (the target refines its own guesses)."""

    def __init__(self, window: int = 16, vocab_size: int | None = None):
        if not isinstance(window, int) or window < 1:
            raise InvalidDraftLengthError(f"SJD window must be an int >= 1, got {window!r}")
        self.window = window
        self.vocab_size = vocab_size

    def start(self, guidance: GuidanceSpec, *, sampling: SamplingParams, generator: torch.Generator | None) -> None:
        if self.vocab_size is None:
            raise RuntimeError("JacobiDrafter needs vocab_size (the codebook size)")
        self.sampling, self.generator = sampling, generator
        self.batch = len(guidance.cond)
        self.tokens: list[torch.Tensor] = []  # per image: long [n_b] current guesses
        self.q: list[torch.Tensor | None] = []  # per image: float [n_b, V] (None when greedy)
        self.device = None

    def _fresh(self, count: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random initial guesses with uniform q."""
        V = self.vocab_size
        if self.sampling.is_greedy:
            return torch.zeros(count, dtype=torch.long, device=device), None
        toks = torch.randint(0, V, (count,), generator=self.generator, device=device)
        return toks, torch.full((count, V), 1.0 / V, device=device)

    def propose(self, max_tokens: int, next_pos: torch.Tensor) -> Draft:
        device = next_pos.device
        if not self.tokens:
            self.tokens, self.q = [], []
            for _ in range(self.batch):
                t, q = self._fresh(self.window, device)
                self.tokens.append(t)
                self.q.append(q)
        k = max(1, min(self.window, max_tokens))
        draft = torch.stack([t[:k] for t in self.tokens])
        probs = None if self.sampling.is_greedy else torch.stack([q[:k] for q in self.q])
        num = torch.full((len(self.tokens),), k, dtype=torch.long, device=device)
        return Draft(tokens=draft, probs=probs, num_draft=num)

    def observe(self, outcome: ImageStepOutcome) -> None:
        k = outcome.draft.k
        p = logits_to_probs(outcome.target_logits, self.sampling)  # [B, k+1, V]
        n = outcome.result.num_accepted.tolist()
        new_tokens, new_q = [], []
        for b in range(len(n)):
            # positions n+1 .. k of this block predict the guesses after the emitted token
            rest_p = p[b, n[b] + 1: k + 1]  # [k - n, V]
            refined = sample(rest_p, self.sampling, self.generator) if rest_p.shape[0] else rest_p.new_zeros(0, dtype=torch.long)
            tail = self.tokens[b][k + 1:]  # old guesses beyond the block's last column
            tail_q = None if self.q[b] is None else self.q[b][k + 1:]
            toks = torch.cat([refined, tail])
            q = None if self.sampling.is_greedy else torch.cat([rest_p, tail_q])
            fresh_t, fresh_q = self._fresh(self.window - toks.numel(), toks.device)
            new_tokens.append(torch.cat([toks, fresh_t]))
            new_q.append(None if q is None else torch.cat([q, fresh_q]))
        self.tokens, self.q = new_tokens, new_q

    def select_rows(self, rows: torch.Tensor) -> None:
        idx = rows.tolist()
        self.tokens = [self.tokens[i] for i in idx]
        self.q = [self.q[i] for i in idx]
