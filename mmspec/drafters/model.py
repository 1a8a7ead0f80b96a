"""Drafting with a smaller causal LM (classic two-model speculative decoding).

Paper: Leviathan et al. (ICML 2023); Chen et al. (2023).

Glossary:
    pending   committed tokens the drafter has not fed to its own cache yet (right aligned,
              long [B, P] with a valid mask); 1 token normally, 2 after a fully accepted step
    fed       drafted tokens that went into the drafter's cache while drafting (all but the
              last one); those beyond the accepted prefix are rolled back in ``observe``

The drafter keeps its own session, so its context length may differ from the target's (e.g. a
VLM drafter that saw fewer image tokens): a :class:`~mmspec.cache.CacheSession`, or, when the
target runs with classifier-free guidance (AR image models), a
:class:`~mmspec.guidance.GuidedSession` with the same guidance, so drafts are sampled from the
drafter's guided distribution. One class serves HF causal LMs, VLM drafters (pruned prefill, in
:mod:`mmspec.vision`) and AR image models.

Randomness: the token drafted for position t of row b is drawn by inverse CDF with the row's keyed
uniform (``rng.uniform(DRAFT, t)``), so drafts never depend on the batch layout.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache import CacheSession, right_align
from ..config import SamplingParams
from ..errors import DeviceMismatchError, VocabularyMismatchError
from ..guidance import Guidance, open_session
from ..rng import DRAFT, RowRandom
from ..sampling import logits_to_probs, sample_inverse_cdf
from .adaptive import DraftLengthPolicy, as_policy
from .base import Draft, Drafter, StepOutcome, widest_budget
from .tree import DynamicTree, StaticTree, observe_tree, propose_tree


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """Output vocabulary size of a HF causal LM (its LM-head rows)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(model, "config", None)
    if getattr(config, "codebook_size", None) is not None:  # AR image models: logits over the codebook
        return int(config.codebook_size)
    size = getattr(config, "vocab_size", None)
    if size is None and config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    return None if size is None else int(size)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def check_same_tokenizer(target_tokenizer: Any, drafter_tokenizer: Any) -> None:
    """Raise :class:`VocabularyMismatchError` unless both tokenizers map the same strings to the same ids."""
    a, b = target_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
    if a == b:
        return
    only_t = sorted(set(a) - set(b))[:3]
    only_d = sorted(set(b) - set(a))[:3]
    moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:3]
    raise VocabularyMismatchError(
        f"the drafter uses another tokenizer than the target ({len(b)} vs {len(a)} entries; "
        f"only in target: {only_t}, only in drafter: {only_d}, different ids: {moved})"
    )


class ModelDrafter(Drafter):
    """Drafts autoregressively with ``model`` (any HF causal LM sharing the target's vocabulary)."""

    def __init__(self, model: torch.nn.Module, draft_length: int | DraftLengthPolicy | None = None, *,
                 tree: Any = None):
        if tree is not None and not isinstance(tree, (StaticTree, DynamicTree)):
            raise TypeError(f"tree must be a StaticTree, a DynamicTree or None (chains), got {type(tree).__name__}")
        self.model = model
        self.vocab_size = model_vocab_size(model)
        self.tree = tree  # None: chains; else the shape of the draft tree (mmspec.drafters.tree)
        if tree is not None:
            draft_length = tree.depth
        self.policy: DraftLengthPolicy | None = None if draft_length is None else as_policy(draft_length)
        self._own_policy = draft_length is not None
        self.session: CacheSession | None = None

    def check_compatible(self, target: torch.nn.Module) -> None:
        target_vocab = model_vocab_size(target)
        if target_vocab is not None and self.vocab_size is not None and target_vocab != self.vocab_size:
            raise VocabularyMismatchError(
                f"drafter vocabulary size {self.vocab_size} != target vocabulary size {target_vocab}: "
                "the drafter must use the target's tokenizer and vocabulary"
            )
        if model_device(self.model) != model_device(target):
            raise DeviceMismatchError(
                f"drafter is on {model_device(self.model)} but target is on {model_device(target)}"
            )

    def set_default_length(self, k: int | DraftLengthPolicy) -> None:
        """Use the call's draft length unless one was given at construction."""
        if not self._own_policy:
            self.policy = as_policy(k)

    @property
    def num_calls(self) -> int:
        return 0 if self.session is None else self.session.calls

    def start(self, input_ids, attention_mask, *, sampling: SamplingParams, rng: RowRandom,
              guidance: Guidance | None = None, **model_inputs: Any) -> None:
        if self.policy is None:
            raise RuntimeError("ModelDrafter has no draft length: pass draft_length or num_draft_tokens")
        self.sampling = sampling
        self.rng = rng
        self.position = torch.zeros((input_ids.shape[0],), dtype=torch.long)  # committed tokens per row
        if guidance is not None:
            self.session = open_session(self.model, input_ids, attention_mask, guidance=guidance)
            self.pending = input_ids[:, -1:]
            self.pending_valid = attention_mask[:, -1:].to(torch.long)
        else:
            self.session = CacheSession(self.model, input_ids.shape[0], input_ids.device)
            self.prefill(input_ids, attention_mask, **model_inputs)
        self.fed = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> None:
        """Feed the prompt but its last token to the drafter's cache (text drafters ignore
        ``model_inputs``); the last token stays pending."""
        assert self.session is not None
        if input_ids.shape[1] > 1:
            self.session.extend(input_ids[:, :-1], attention_mask[:, :-1], num_logits=1)
        self.pending = input_ids[:, -1:]
        self.pending_valid = attention_mask[:, -1:].to(torch.long)

    @torch.no_grad()
    def propose(self, max_tokens: torch.Tensor | int) -> Draft:
        assert self.session is not None and self.policy is not None
        if self.tree is not None:
            return propose_tree(self, self.tree, max_tokens)
        k = max(1, min(self.policy.current(), widest_budget(max_tokens)))
        batch = self.session.batch_size
        device = self.pending.device
        tokens, probs = [], []
        num_draft = torch.full((batch,), k, dtype=torch.long, device=device)
        stopped = torch.zeros((batch,), dtype=torch.bool, device=device)
        inp, valid = self.pending, self.pending_valid
        for i in range(k):
            logits = self.session.extend(inp, valid, num_logits=1)[:, -1]  # [B, V]
            p = logits_to_probs(logits, self.sampling)
            if self.sampling.is_greedy:
                tok = p.argmax(dim=-1)  # [B]
            else:
                u = self.rng.uniform(DRAFT, (self.position + i).unsqueeze(1), device=device)[:, 0]
                tok = sample_inverse_cdf(p, u)  # [B]
            tokens.append(tok)
            probs.append(p)
            if i == k - 1:
                break
            if type(self.policy).stop_rows is not DraftLengthPolicy.stop_rows:
                conf_src = logits.float().softmax(-1) if self.sampling.is_greedy else p
                conf = conf_src.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
                newly = self.policy.stop_rows(conf) & ~stopped
                num_draft = torch.where(newly, torch.full_like(num_draft, i + 1), num_draft)
                stopped |= newly
                if bool(stopped.all()):
                    break
            inp, valid = tok.unsqueeze(1), torch.ones((batch, 1), dtype=torch.long, device=device)
        self.fed = len(tokens) - 1
        draft_tokens = torch.stack(tokens, dim=1)
        draft_probs = None if self.sampling.is_greedy else torch.stack(probs, dim=1)
        return Draft(tokens=draft_tokens, probs=draft_probs, num_draft=num_draft.clamp_max(len(tokens)))

    # hooks of the tree proposal (mmspec.drafters.tree.propose_tree); feature drafters override them
    @property
    def tree_batch(self) -> int:
        """Sequences the proposal drafts trees for."""
        return self.session.batch_size

    def tree_root_logits(self) -> torch.Tensor:
        """Logits [B, V'] of the root's children: feed the pending tokens."""
        return self.session.extend(self.pending, self.pending_valid, num_logits=1)[:, -1]

    def tree_expand(self, tokens: torch.Tensor, parent_slots: torch.Tensor) -> torch.Tensor:
        """Feed frontier nodes (target ids long [B, F]; parent_slots long [B, F]: the parent's tree slot,
        -1 for the root) as tree slots; logits [B, F, V'] of their children."""
        return self.session.extend_tree(tokens, parent_slots)

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Indices into this drafter's distributions -> target token ids (the identity here)."""
        return ids

    def observe(self, outcome: StepOutcome) -> None:
        assert self.session is not None and self.policy is not None
        self.position = self.position + torch.tensor([len(c) for c in outcome.committed], dtype=torch.long)
        if outcome.draft.is_tree:
            observe_tree(self, outcome)
            return
        n = outcome.result.num_accepted
        kept = n.clamp_max(self.fed)  # drafted tokens already in the cache that stay
        self.session.rollback(self.fed - kept)
        kept_list = kept.tolist()
        rest = [row[m:] for row, m in zip(outcome.committed, kept_list)]
        self.pending, self.pending_valid = right_align(rest, self.pending.device)
        self.policy.update(n, outcome.draft.num_draft)

    def select_rows(self, rows: torch.Tensor) -> None:
        assert self.session is not None
        self.session.select_rows(rows)
        self.position = self.position[rows.cpu()]
        self.pending = self.pending[rows]
        self.pending_valid = self.pending_valid[rows]
        while self.pending_valid.shape[1] > 1 and not bool(self.pending_valid[:, 0].any()):
            self.pending, self.pending_valid = self.pending[:, 1:], self.pending_valid[:, 1:]


class TreeDrafter(ModelDrafter):
    """A :class:`ModelDrafter` drafting trees: ``TreeDrafter(model, StaticTree(...) | DynamicTree(...))``
    (equivalently ``ModelDrafter(model, tree=...)``; VLM and image drafters take ``tree=`` too)."""

    def __init__(self, model: torch.nn.Module, tree: StaticTree | DynamicTree = StaticTree()):
        super().__init__(model, tree=tree)
