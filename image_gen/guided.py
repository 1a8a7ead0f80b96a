"""A KV-cache session over the conditional and unconditional halves of a CFG batch.

Glossary:
    halves     rows [0, B) carry the condition, rows [B, 2B) its unconditional twin (null class /
               null prompt); without CFG (scale 1) there is only the conditional half
    guided     uncond + s * (cond - uncond) per image row, with s from the guidance schedule at
               each token's image position; both halves always receive the same image tokens, so a
               draft is verified once per image on the guided distribution
"""

from __future__ import annotations

import torch

from mmspec.cache import CacheSession
from mmspec.drafters.model import right_align

from .model import guidance_scale, guide


class GuidedSession:
    """Owns one model's cache for B images (2B rows with CFG) and returns guided logits [B, w, V]."""

    def __init__(self, model: torch.nn.Module, cond: list[list[int]], uncond: list[list[int]] | None,
                 cfg_scale: float, schedule: str, num_tokens: int):
        self.model = model
        self.use_cfg = uncond is not None
        self.cfg_scale, self.schedule, self.num_tokens = cfg_scale, schedule, num_tokens
        self.batch = len(cond)
        rows = cond + (uncond if uncond is not None else [])
        device = next(model.parameters()).device
        ids, mask = right_align(rows, device)  # left padding
        self.session = CacheSession(model, len(rows), device)
        if ids.shape[1] > 1:
            self.session.extend(ids[:, :-1], mask[:, :-1], num_logits=1)
        # last prefix token of every row (differs between the halves until the first image token)
        self.pending = ids[:, -1:]
        self.pending_valid = torch.ones_like(self.pending)

    @property
    def calls(self) -> int:
        return self.session.calls

    def both(self, t: torch.Tensor) -> torch.Tensor:
        """Per-image tensor [B, ...] -> per-row [R, ...] (duplicated for the unconditional half)."""
        return torch.cat([t, t], dim=0) if self.use_cfg else t

    def extend(self, tokens: torch.Tensor, image_pos: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Feed per-row tokens [R, w] (R = 2B with CFG). ``image_pos`` long [B, w] is the image index
        each column's logits predict (for the guidance schedule). Returns guided logits [B, w, V]."""
        logits = self.session.extend(tokens, valid)
        if not self.use_cfg:
            return logits
        scale = guidance_scale(self.cfg_scale, self.schedule, image_pos, self.num_tokens).unsqueeze(-1)
        return guide(logits[: self.batch].float(), logits[self.batch:].float(), scale.to(logits.device))

    def extend_after_pending(self, tokens: torch.Tensor, image_pos: torch.Tensor) -> torch.Tensor:
        """Feed [pending, tokens] (tokens per image [B, w]); logits for all w + P columns."""
        block = torch.cat([self.pending, self.both(tokens)], dim=1)
        valid = torch.cat([self.pending_valid, torch.ones_like(self.both(tokens))], dim=1)
        return self.extend(block, image_pos, valid)

    def rollback(self, num_remove: torch.Tensor) -> None:
        """Remove the last num_remove[b] tokens of image b (long [B]) from both halves."""
        self.session.rollback(self.both(num_remove))

    def set_pending(self, rows: list[list[int]]) -> None:
        """Committed image tokens not yet in the cache, per image (ragged, right aligned)."""
        ids, valid = right_align(rows, self.pending.device)
        self.pending, self.pending_valid = self.both(ids), self.both(valid)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only images ``rows`` (long [B'])."""
        all_rows = torch.cat([rows, rows + self.batch]) if self.use_cfg else rows
        self.session.select_rows(all_rows)
        self.pending, self.pending_valid = self.pending[all_rows], self.pending_valid[all_rows]
        self.batch = rows.numel()
