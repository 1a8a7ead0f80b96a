"""Feature-level drafting (EAGLE family): a draft head reading the target's hidden states drafts chains or
dynamic trees through the one loop.

Paper: Li et al., EAGLE (ICML 2024), EAGLE-2 (EMNLP 2024), EAGLE-3 (arXiv 2503.01840).

Glossary:
    pair          the head's input slot: (feature of position t, token t + 1), predicting token t + 2;
                  the head's cache holds one pair per committed token, built from the target's
                  hidden states (``Drafter.hidden_layers``), which the loop hands over after the prefill
                  (``observe_prefill``) and after every verification (``StepOutcome.target_hidden``)
    next          after the last pair of a row the head already knows the distribution of the first
                  draft token (``next_logits`` [B, Vd]) and the hidden state its children will read
                  (``next_feature`` [B, d]); drafting k tokens costs k - 1 head forwards
    draft slots   pairs fed while drafting use the head's own hidden state as feature; ``observe``
                  drops them all and feeds the committed tokens with the target's real features
    draft vocab   the head predicts over an FR-Spec subset; ``to_target_ids`` maps its indices through
                  ``head.d2t``; sampled drafts carry their distribution scattered onto the target
                  vocabulary (zero outside the subset), so rejection sampling stays exact

Rows whose prompt has a single token have no pair yet and draft nothing in their first step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache import CacheSession
from ..config import SamplingParams
from ..errors import DeviceMismatchError, VocabularyMismatchError
from ..guidance import Guidance
from ..heads.eagle3 import Eagle3Head
from ..rng import DRAFT, RowRandom
from ..sampling import logits_to_probs, sample_inverse_cdf
from .adaptive import DraftLengthPolicy
from .base import Draft, StepOutcome, widest_budget
from .model import ModelDrafter, model_device, model_vocab_size

_OWN = (-1,)  # the head's own output hidden state (its only "layer")


class FeatureDrafter(ModelDrafter):
    """Drafts with an :class:`~mmspec.heads.eagle3.Eagle3Head` over the target's features:
    ``FeatureDrafter(head, 5)`` (chains) or ``FeatureDrafter(head, tree=DynamicTree(...))``."""

    def __init__(self, head: Eagle3Head, draft_length: int | DraftLengthPolicy | None = None, *, tree: Any = None):
        if not isinstance(head, Eagle3Head):
            raise TypeError(f"head must be an Eagle3Head, got {type(head).__name__}")
        super().__init__(head, draft_length, tree=tree)
        self.head = head
        self.vocab_size = head.config.target_vocab_size
        self.hidden_layers = tuple(head.config.feature_layers)

    def check_compatible(self, target: torch.nn.Module) -> None:
        target_vocab = model_vocab_size(target)
        if target_vocab != self.vocab_size:
            raise VocabularyMismatchError(
                f"the head drafts for a vocabulary of {self.vocab_size}, the target has {target_vocab}")
        if model_device(self.head) != model_device(target):
            raise DeviceMismatchError(f"head is on {model_device(self.head)} but target is on {model_device(target)}")
        if not self.head.attached:
            self.head.attach(target)

    # -------------------------------------------------------------------------------------- state
    def start(self, input_ids, attention_mask, *, sampling: SamplingParams, rng: RowRandom,
              guidance: Guidance | None = None, **model_inputs: Any) -> None:
        if self.policy is None:
            raise RuntimeError("FeatureDrafter has no draft length: pass draft_length or num_draft_tokens")
        if guidance is not None:
            raise ValueError("a feature drafter cannot draft for a guided (classifier-free guidance) target")
        self.sampling, self.rng = sampling, rng
        batch = input_ids.shape[0]
        self.device = input_ids.device
        self.position = torch.zeros((batch,), dtype=torch.long)
        self.session = CacheSession(self.head, batch, input_ids.device)
        self._prompt = (input_ids, attention_mask.to(torch.long))
        self.has_context = torch.zeros((batch,), dtype=torch.bool, device=self.device)
        dtype = self.head.fc.weight.dtype
        self.next_logits = torch.zeros((batch, self.head.config.draft_vocab_size), device=self.device)
        self.next_feature = torch.zeros((batch, self.head.config.hidden_size), dtype=dtype, device=self.device)
        self.fed = 0

    def observe_prefill(self, target_hidden: dict[int, torch.Tensor] | None) -> None:
        input_ids, mask = self._prompt
        del self._prompt
        if target_hidden is None or input_ids.shape[1] < 2:
            return
        # pair t = (feature of prompt position t, prompt token t + 1); left padding: valid iff t is
        self._feed(input_ids[:, 1:], self._features(target_hidden), mask[:, :-1])

    def _features(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([hidden[layer] for layer in self.head.config.feature_layers], dim=-1)  # [B, w, 3d]

    def _feed(self, tokens: torch.Tensor, target_features: torch.Tensor, valid: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> None:
        """Append real pairs (right aligned: the last column is valid for every row that has one; explicit
        ``position_ids`` [B, w] or None for the session's count-based positions)."""
        fused = self.head.fuse(target_features)
        logits = self.session.extend(tokens, valid, features=fused, num_logits=1, hidden_layers=_OWN,
                                     position_ids=position_ids)
        has = valid[:, -1].bool()
        self.next_logits = torch.where(has.unsqueeze(1), logits[:, -1].float(), self.next_logits)
        self.next_feature = torch.where(has.unsqueeze(1), self.session.last_hidden[-1][:, -1], self.next_feature)
        self.has_context = self.has_context | has

    # ------------------------------------------------------------------------------------ drafting
    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.d2t[ids]

    def _pick(self, logits: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(draft-vocab index long [B], processed draft-vocab distribution [B, Vd] or None when greedy)."""
        if self.sampling.is_greedy:
            return logits.argmax(dim=-1), None
        p = logits_to_probs(logits, self.sampling)
        u = self.rng.uniform(DRAFT, (self.position + i).unsqueeze(1), device=self.device)[:, 0]
        return sample_inverse_cdf(p, u), p

    def _on_target_vocab(self, p: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((*p.shape[:-1], self.vocab_size), dtype=p.dtype, device=p.device)
        return full.index_copy_(-1, self.head.d2t, p)

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        assert self.session is not None and self.policy is not None
        if self.tree is not None:
            from .tree import propose_tree

            draft = propose_tree(self, self.tree, max_tokens)
            return self._without_context(draft)
        k = max(1, min(self.policy.current(), widest_budget(max_tokens)))
        logits, feature = self.next_logits, self.next_feature
        tokens, probs = [], []
        for i in range(k):
            idx, p = self._pick(logits, i)
            tok = self.to_target_ids(idx)
            tokens.append(tok)
            probs.append(p)
            if i == k - 1:
                break
            logits = self.session.extend(tok.unsqueeze(1), features=feature.unsqueeze(1), num_logits=1,
                                         hidden_layers=_OWN)[:, -1].float()
            feature = self.session.last_hidden[-1][:, -1]
        self.fed = k - 1
        num_draft = torch.where(self.has_context, k, 0)
        draft_probs = None if self.sampling.is_greedy else self._on_target_vocab(torch.stack(probs, dim=1))
        return Draft(tokens=torch.stack(tokens, dim=1), probs=draft_probs, num_draft=num_draft)

    def _without_context(self, draft: Draft) -> Draft:
        if bool(self.has_context.all()):
            return draft
        import dataclasses

        return dataclasses.replace(draft, num_draft=torch.where(self.has_context, draft.num_draft, 0))

    # tree hooks (propose_tree): the root's children come from next_logits, a node reads its parent's hidden
    def tree_root_logits(self) -> torch.Tensor:
        batch = self.session.batch_size
        self._node_hidden = self.next_feature.new_zeros((batch, 0, self.head.config.hidden_size))
        return self.next_logits

    def tree_expand(self, tokens: torch.Tensor, parent_slots: torch.Tensor) -> torch.Tensor:
        par = parent_slots.clamp_min(0).unsqueeze(-1).expand(-1, -1, self.next_feature.shape[-1])
        from_nodes = self._node_hidden.gather(1, par) if self._node_hidden.shape[1] else torch.zeros_like(
            par, dtype=self.next_feature.dtype)
        feature = torch.where((parent_slots >= 0).unsqueeze(-1), from_nodes, self.next_feature.unsqueeze(1))
        logits = self.session.extend_tree(tokens, parent_slots, features=feature, hidden_layers=_OWN)
        self._node_hidden = torch.cat([self._node_hidden, self.session.last_hidden[-1]], dim=1)
        return logits.float()

    # ----------------------------------------------------------------------------------- observing
    def observe(self, outcome: StepOutcome) -> None:
        assert self.session is not None and self.policy is not None
        committed = outcome.committed
        self.position = self.position + torch.tensor([len(c) for c in committed], dtype=torch.long)
        batch = len(committed)
        feats = self._features(outcome.target_hidden)  # [B, 1 + k, 3d] over [pending, drafts or nodes]
        if outcome.draft.is_tree:
            self.session.keep_path(torch.zeros((batch, 0), dtype=torch.long, device=self.device),
                                   torch.zeros((batch,), dtype=torch.long, device=self.device))
            nodes = outcome.result.accepted_nodes  # [B, D] node ids, -1 padded
            cols = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=self.device),
                              (nodes + 1).clamp_min(0)], dim=1)
            feats = feats.gather(1, cols.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        else:
            self.session.rollback(torch.full((batch,), self.fed, dtype=torch.long, device=self.device))
            self.policy.update(outcome.result.num_accepted, outcome.draft.num_draft)
        self.fed = 0
        # the committed tokens with the real features of the positions before them, right aligned
        width = max(len(c) for c in committed)
        tok = torch.zeros((batch, width), dtype=torch.long)
        valid = torch.zeros((batch, width), dtype=torch.long)
        index = torch.zeros((batch, width), dtype=torch.long)
        for b, c in enumerate(committed):
            m = len(c)
            if m:
                tok[b, width - m:] = torch.tensor(c, dtype=torch.long)
                valid[b, width - m:] = 1
                index[b, width - m:] = torch.arange(m)
        index = index.to(self.device)
        f = feats.gather(1, index.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        self._feed(tok.to(self.device), f, valid.to(self.device))

    def select_rows(self, rows: torch.Tensor) -> None:
        assert self.session is not None
        self.session.select_rows(rows)
        self.position = self.position[rows.cpu()]
        self.has_context = self.has_context[rows]
        self.next_logits = self.next_logits[rows]
        self.next_feature = self.next_feature[rows]
