"""The target-session protocol: everything the one loop (:func:`mmspec.engine.decode`) asks of its target.

Paper: Leviathan et al. (ICML 2023) for the chain step; Miao et al., SpecInfer (ASPLOS 2024) for the tree step.

Glossary:
    session     the loop's only handle on the target: it owns the target's cache (or caches) for a batch of
                rows and returns processed-to-be logits; the loop never touches a model
    row         one sequence of the batch; rows keep their own lengths (a row accepts any number of drafts)
    extend      feed a block of tokens long [B, w] (optionally with a validity mask long [B, w] whose 0 columns
                become holes) and get logits float [B, n, V] of its last n columns (n = ``num_logits`` or w);
                ``hidden_layers`` asks for the target's hidden states of those layers (:attr:`last_hidden`,
                layer -> float [B, w, d]) for feature drafters
    rollback    drop the last ``num_remove[b]`` fed tokens of each row (the rejected drafts)
    tree        ``begin_tree`` / ``extend_tree`` (nodes long [B, N] with parents long [B, N], -1 = child of the
                committed context, verified in one forward under an ancestor mask) / ``keep_path`` (keep the
                accepted root-to-leaf nodes as contiguous slots, drop the rest); a session that cannot verify
                trees keeps the defaults, which raise :class:`~mmspec.errors.MethodParameterError`
    calls       target forwards so far (the stats' ``target_calls``)

Implementations: :class:`~mmspec.cache.CacheSession` (a causal LM's KV cache),
:class:`~mmspec.guidance.GuidedSession` (classifier-free guidance: conditional and unconditional halves),
:class:`~mmspec.collaborative.session.CollaborativeSession` (a combination of several models) and
:class:`~mmspec.pipeline.session.PipelineSession` (the target split over pipeline stages). A new kind of target
(another modality, another system) plugs into the loop by implementing this class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from .errors import MethodParameterError


class TargetSession(ABC):
    """What the one decoding loop needs from a target (see the module glossary)."""

    #: hidden states of the last forward that asked for them (layer -> float [B, w, d]), else None
    last_hidden: dict[int, torch.Tensor] | None = None

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Rows in the batch now (finished rows leave through :meth:`select_rows`)."""

    @property
    @abstractmethod
    def calls(self) -> int:
        """Target forwards so far."""

    @abstractmethod
    def extend(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, num_logits: int | None = None,
               hidden_layers: tuple[int, ...] = (), **model_inputs: Any) -> torch.Tensor:
        """Feed tokens long [B, w] (``valid`` long [B, w]: 0 columns become holes); logits float [B, n, V] of the
        last n = ``num_logits`` (default w) columns."""

    @abstractmethod
    def rollback(self, num_remove: torch.Tensor) -> None:
        """Remove the last ``num_remove[b]`` fed tokens of row b (long [B])."""

    @abstractmethod
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B']) of the batch."""

    # -- draft trees (optional) ---------------------------------------------------------------------------------
    def begin_tree(self) -> None:
        """Start a draft tree: the nodes fed from now on by :meth:`extend_tree` are numbered 0, 1, ..."""
        raise MethodParameterError(f"{type(self).__name__} verifies chains only; draft trees are not supported")

    def extend_tree(self, tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor | None = None,
                    hidden_layers: tuple[int, ...] = (), **model_inputs: Any) -> torch.Tensor:
        """Feed tree nodes long [B, w] with parents long [B, w] in one forward; logits float [B, w, V]."""
        raise MethodParameterError(f"{type(self).__name__} verifies chains only; draft trees are not supported")

    def keep_path(self, path: torch.Tensor, num_keep: torch.Tensor) -> None:
        """End the tree: keep the first ``num_keep[b]`` nodes of ``path`` (long [B, D], root to leaf, -1 padded)."""
        raise MethodParameterError(f"{type(self).__name__} verifies chains only; draft trees are not supported")


__all__ = ["TargetSession"]
