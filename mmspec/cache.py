"""Per-model KV-cache sessions with per-row lengths.

Glossary:
    slot        one column of a model's KV cache; all rows of a batch share slot columns
    valid mask  long [B, S]: 1 where a slot holds a real token of that row, 0 for padding or
                for a rolled-back (rejected) token; passed to the model as ``attention_mask``
    hole        an invalid slot with valid slots after it; attention masks it out, and explicit
                ``position_ids`` (count of valid tokens before the slot) keep positions dense,
                so each row behaves exactly like an unpadded sequence
    rollback    remove the last r valid tokens of each row (r may differ per row): their slots
                become holes, and columns that are invalid for every row are cropped off the end

This is what lets a batch of rows accept different numbers of drafted tokens, and lets the
drafter keep its own (shorter, e.g. pruned) context: each model owns one session.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def _supports(model: torch.nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


class CacheSession:
    """Owns the KV cache, valid mask and next position of one causal LM for a batch."""

    def __init__(self, model: torch.nn.Module, batch_size: int, device: torch.device):
        self.model = model
        self.device = device
        self.cache: Any = None
        self.valid = torch.zeros((batch_size, 0), dtype=torch.long, device=device)  # [B, S]
        self.next_pos = torch.zeros((batch_size,), dtype=torch.long, device=device)  # [B]
        # added to count-based positions: M-RoPE models continue text positions after the image
        # at (largest multimodal position + 1), not at the token count
        self.position_delta = torch.zeros((batch_size,), dtype=torch.long, device=device)  # [B]
        self._logits_to_keep = _supports(model, "logits_to_keep")
        self.calls = 0

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    def extend(
        self,
        tokens: torch.Tensor | None,  # long [B, w]
        valid: torch.Tensor | None = None,  # long/bool [B, w]; default all valid
        *,
        inputs_embeds: torch.Tensor | None = None,  # float [B, w, d] instead of tokens
        position_ids: torch.Tensor | None = None,  # explicit positions ([B, w] or [3, B, w])
        num_logits: int | None = None,
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Append w slots (invalid ones become holes), run the model, return logits [B, n, V].

        ``num_logits`` (default w) keeps only the logits of the last n columns. Positions default
        to (valid tokens before the slot + ``position_delta``).
        """
        ref = tokens if tokens is not None else inputs_embeds[..., 0]
        valid = torch.ones_like(ref, dtype=torch.long) if valid is None else valid.to(torch.long)
        if position_ids is None:
            offsets = valid.cumsum(dim=1) - 1  # [B, w]
            position_ids = (self.next_pos.unsqueeze(1) + self.position_delta.unsqueeze(1) + offsets).clamp_min(0)
            # left padding convention of HF generate: padded slots get position 1
            position_ids = torch.where(valid.bool(), position_ids, torch.ones_like(position_ids))
        mask = torch.cat([self.valid, valid], dim=1)
        kwargs: dict[str, Any] = dict(
            attention_mask=mask, position_ids=position_ids, past_key_values=self.cache, use_cache=True,
        )
        if tokens is not None:
            kwargs["input_ids"] = tokens
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        if num_logits is not None and self._logits_to_keep:
            kwargs["logits_to_keep"] = num_logits
        kwargs.update(model_inputs)
        out = self.model(**kwargs)
        self.calls += 1
        self.cache = out.past_key_values
        if isinstance(self.cache, tuple):  # legacy tuple caches (older transformers)
            from transformers import DynamicCache

            self.cache = DynamicCache.from_legacy_cache(self.cache)
        self.valid = mask
        self.next_pos = self.next_pos + valid.sum(dim=1)
        logits = out.logits
        if num_logits is not None:
            logits = logits[:, -num_logits:]
        return logits

    def rollback(self, num_remove: torch.Tensor) -> None:
        """Remove the last ``num_remove[b]`` valid tokens of each row b (long [B])."""
        from_right = self.valid.flip(1).cumsum(dim=1).flip(1)  # [B, S]: valid slots at or after
        drop = (from_right <= num_remove.unsqueeze(1)) & self.valid.bool()
        self.valid = self.valid.masked_fill(drop, 0)
        self.next_pos = self.next_pos - num_remove
        self._crop_dead_tail()

    def _crop_dead_tail(self) -> None:
        alive_cols = self.valid.any(dim=0)  # [S]
        if alive_cols.numel() == 0:
            return
        last = int(alive_cols.nonzero().max()) + 1 if bool(alive_cols.any()) else 0
        dead = self.num_slots - last
        if dead > 0:
            if self.cache is not None:
                self.cache.crop(-dead)
            self.valid = self.valid[:, :last]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B']) of the batch."""
        if self.cache is not None:
            self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]
        self.position_delta = self.position_delta[rows]
        # slots only the dropped rows used become dead; the tail ones are cropped, the others
        # stay as masked holes (cache layers can only be cropped at the end)
        self._crop_dead_tail()
