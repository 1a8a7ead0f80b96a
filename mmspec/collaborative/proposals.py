"""Who proposes in collaborative decoding via speculation: a fixed proposer, or alternate proposals.

Paper: Fu et al., "Fast Large Language Model Collaborative Decoding via Speculation" (CoS, ICML 2025,
arXiv 2502.01662), Sections 3.2-3.4.

Glossary:
    proposer     the model whose drafts a step verifies; its own processed distribution is q
    gamma        a model's proposal length (drafts per step when it proposes; 0: it never proposes)
    fixed        :class:`FixedProposer`: one model drafts every step; every model scores the drafts and the
                 one after them, so a row accepting all drafts gets a bonus token sampled from r (standard
                 speculative sampling with r as the target)
    alternate    :class:`AlternateProposals`: steps are open-ended; the models that score a step also
                 compute their distribution after its last draft, and when every draft is accepted the
                 next model in turn proposes from that cached distribution (its "bonus token", with its
                 own distribution as q) without a forward of its own; a rejection sends the turn back to
                 the default proposer (the model with the largest gamma)

Drafts are drawn by inverse CDF from the row's keyed uniforms (``rng.uniform(DRAFT, position)``), so a row's
output never depends on the batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import SamplingParams
from ..drafters.base import Draft, Drafter, StepOutcome, widest_budget
from ..errors import InvalidDraftLengthError, MethodParameterError
from ..rng import DRAFT, RowRandom
from ..sampling import logits_to_probs, sample_inverse_cdf
from .session import CollaborativeSession


def _check_gamma(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidDraftLengthError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class FixedProposer:
    """Model ``model`` proposes ``num_draft_tokens`` tokens every step (Naive-CoS)."""

    model: int = 0
    num_draft_tokens: int = 4

    def __post_init__(self) -> None:
        _check_gamma("num_draft_tokens", self.num_draft_tokens, 1)
        if isinstance(self.model, bool) or not isinstance(self.model, int) or self.model < 0:
            raise MethodParameterError(f"model must be a model index >= 0, got {self.model!r}")

    def gammas(self, num_models: int) -> tuple[int, ...]:
        if self.model >= num_models:
            raise MethodParameterError(f"model {self.model} is not one of the {num_models} models")
        return tuple(self.num_draft_tokens if i == self.model else 0 for i in range(num_models))

    open_end = False


@dataclass(frozen=True)
class AlternateProposals:
    """Models take turns proposing, ``num_draft_tokens[i]`` tokens each (the first of them the bonus token
    from the distribution it computed while scoring the previous step); CoS's alternate proposal framework.
    The model with the largest gamma (the first of equals; as in CoS, the cheapest model is meant to propose
    most) is the default proposer, at the start and after a rejection."""

    num_draft_tokens: tuple[int, ...] = (2, 2)

    def __post_init__(self) -> None:
        gammas = tuple(self.num_draft_tokens)
        for i, g in enumerate(gammas):
            _check_gamma(f"num_draft_tokens[{i}]", g, 0)
        if not any(gammas):
            raise InvalidDraftLengthError(f"at least one model must propose (a gamma >= 1), got {list(gammas)}")
        object.__setattr__(self, "num_draft_tokens", gammas)

    def gammas(self, num_models: int) -> tuple[int, ...]:
        if len(self.num_draft_tokens) != num_models:
            raise MethodParameterError(
                f"num_draft_tokens gives {len(self.num_draft_tokens)} proposal lengths for {num_models} models")
        return self.num_draft_tokens

    open_end = True


class ProposalDrafter(Drafter):
    """Drafts with the models of a :class:`CollaborativeSession` (their forwards are reused to verify)."""

    def __init__(self, session: CollaborativeSession, scheme: FixedProposer | AlternateProposals):
        self.session = session
        self.scheme = scheme
        self.gammas = scheme.gammas(len(session.members))
        self.default = max(range(len(self.gammas)), key=lambda i: (self.gammas[i], -i))
        self.vocab_size = None
        self.proposals = [0] * len(self.gammas)  # steps each model proposed
        self.bonus_proposals = 0  # steps whose first draft came from a cached bonus distribution

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: SamplingParams,
              rng: RowRandom, guidance: Any = None, **model_inputs: Any) -> None:
        if guidance is not None or model_inputs:
            raise ValueError("collaborative decoding takes token ids only (no guidance, no extra model inputs)")
        self.sampling, self.rng = sampling, rng
        self.pending = input_ids[:, -1:]  # [B, 1]: the last committed token
        self.position = torch.zeros((input_ids.shape[0],), dtype=torch.long)  # committed tokens per row
        self.proposer = self.default

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        who = self.proposer
        k = max(1, min(self.gammas[who], widest_budget(max_tokens)))
        batch, device = self.pending.shape[0], self.pending.device
        block = self.pending
        tokens, probs = [], []
        for i in range(k):
            logits = self.session.lookahead(who, block)[:, -1]  # [B, V]
            p = logits_to_probs(logits, self.sampling)
            if self.sampling.is_greedy:
                tok = p.argmax(dim=-1)
            else:
                u = self.rng.uniform(DRAFT, (self.position + i).unsqueeze(1), device=device)[:, 0]
                tok = sample_inverse_cdf(p, u)
            tokens.append(tok)
            probs.append(p)
            block = torch.cat([block, tok.unsqueeze(1)], dim=1)
        self.proposals[who] += 1
        self.session.open_end = self.scheme.open_end
        return Draft(tokens=torch.stack(tokens, dim=1), probs=None if self.sampling.is_greedy else torch.stack(probs, dim=1),
                     num_draft=torch.full((batch,), k, dtype=torch.long, device=device), open_end=self.scheme.open_end)

    def observe(self, outcome: StepOutcome) -> None:
        self.position = self.position + torch.tensor([len(c) for c in outcome.committed], dtype=torch.long)
        self.pending = torch.tensor([[c[-1]] for c in outcome.committed], dtype=torch.long, device=self.pending.device)
        self.proposer = self._next_proposer(outcome)

    def _next_proposer(self, outcome: StepOutcome) -> int:
        """Alternate: after a step some row accepted whole, the next model in turn that computed the
        distribution after its last draft; otherwise (and always for a fixed proposer) the default."""
        if not self.scheme.open_end:
            return self.default
        n = len(self.gammas)
        if not bool((outcome.result.num_accepted == outcome.draft.k).any()):
            return self.default
        for step in range(1, n + 1):
            cand = (self.proposer + step) % n
            if self.gammas[cand] > 0 and cand in self.session.fed_tail and cand != self.proposer:
                self.bonus_proposals += 1
                return cand
        return self.default

    def select_rows(self, rows: torch.Tensor) -> None:
        self.pending = self.pending[rows]
        self.position = self.position[rows.cpu()]

    @property
    def info(self) -> dict[str, Any]:
        return {"proposals_per_model": list(self.proposals), "bonus_proposals": self.bonus_proposals}
