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

    tree        slots fed by :meth:`extend_tree` after :meth:`begin_tree`: each node attends the
                committed slots of its row and its own tree ancestors (a 4-D additive mask built
                here), at position (committed tokens + its number of tree ancestors); one call
                may feed a whole tree (the target) or one level (a tree drafter)
    keep path   :meth:`keep_path` ends a tree: the kept root-to-leaf nodes are gathered into
                contiguous slots right after the committed ones and every other node slot is
                dropped (a hole, or cropped at the end)

This is what lets a batch of rows accept different numbers of drafted tokens, and lets the
drafter keep its own (shorter, e.g. pruned) context: each model owns one session.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .session import TargetSession


def _supports(model: torch.nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def _pick_hidden(out: Any, layers: tuple[int, ...]) -> dict[int, torch.Tensor] | None:
    """layer -> hidden states [B, w, d] of the requested layers (negative indices count from the top)."""
    if not layers:
        return None
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError(f"{type(out).__name__} has no hidden_states: this model cannot serve a feature drafter")
    return {layer: hs[layer] for layer in layers}


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    try:
        return next(p.dtype for p in model.parameters() if p.is_floating_point())
    except StopIteration:  # pragma: no cover
        return torch.float32


class CacheSession(TargetSession):
    """Owns the KV cache, valid mask and next position of one causal LM for a batch."""

    calls: int = 0  # target forwards (a counter: set per instance)

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
        self.last_hidden: dict[int, torch.Tensor] | None = None  # hidden states of the last forward
        #: layers recorded by every ``extend`` that asks for none itself (the loop sets it around the
        #: prefill so that a feature drafter gets the prompt's hidden states)
        self.record_hidden: tuple[int, ...] = ()

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
        hidden_layers: tuple[int, ...] = (),
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Append w slots (invalid ones become holes), run the model, return logits [B, n, V].

        ``num_logits`` (default w) keeps only the logits of the last n columns. Positions default
        to (valid tokens before the slot + ``position_delta``). ``hidden_layers``: hidden states to
        keep in :attr:`last_hidden` (layer -> float [B, w, d]; 0 = embeddings, as HF counts them);
        the model is asked for hidden states only when this is non-empty.
        """
        hidden_layers = hidden_layers or self.record_hidden
        ref = tokens if tokens is not None else inputs_embeds[..., 0]
        width = ref.shape[1]
        if valid is None:  # every slot valid (every decoding step): positions count on without a cumsum
            valid = torch.ones_like(ref, dtype=torch.long)
            if position_ids is None:
                start = self.next_pos + self.position_delta  # [B]
                position_ids = (start.unsqueeze(1) + torch.arange(width, device=ref.device)).clamp_min(0)
            added = width
        else:
            valid = valid.to(torch.long)
            if position_ids is None:
                offsets = valid.cumsum(dim=1) - 1  # [B, w]
                position_ids = (self.next_pos.unsqueeze(1) + self.position_delta.unsqueeze(1) + offsets).clamp_min(0)
                # left padding convention of HF generate: padded slots get position 1
                position_ids = torch.where(valid.bool(), position_ids, torch.ones_like(position_ids))
            added = valid.sum(dim=1)
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
        if hidden_layers:
            kwargs["output_hidden_states"] = True
        kwargs.update(model_inputs)
        out = self.model(**kwargs)
        self.calls += 1
        self.last_hidden = _pick_hidden(out, hidden_layers)
        self.cache = out.past_key_values
        if isinstance(self.cache, tuple):  # legacy tuple caches (older transformers)
            from transformers import DynamicCache

            self.cache = DynamicCache.from_legacy_cache(self.cache)
        self.valid = mask
        self.next_pos = self.next_pos + added
        logits = out.logits
        if num_logits is not None:
            logits = logits[:, -num_logits:]
        return logits

    def extend_masked(
        self,
        tokens: torch.Tensor,  # long [B, w]
        allowed_tail: torch.Tensor,  # bool [B, w, S - tail_start + w]: keys each new slot may attend
        tail_start: int,
        position_ids: torch.Tensor,  # long [B, w]
    ) -> torch.Tensor:
        """Feed w slots whose attention is given per query: slots before ``tail_start`` are seen by every new
        slot when valid; slots from ``tail_start`` on (and the new ones) by ``allowed_tail`` (4-D additive
        mask). The new slots count as valid tokens. Returns logits [B, w, V]."""
        logits = self._forward_allowed(tokens, allowed_tail, tail_start, position_ids, torch.ones_like(tokens))
        self.next_pos = self.next_pos + tokens.shape[1]
        return logits

    def begin_tree(self) -> None:
        """Start a tree: the slots fed from now on by :meth:`extend_tree` are tree nodes, indexed 0, 1, ..."""
        batch = self.batch_size
        self._tree_start = self.num_slots
        self._tree_depth = torch.zeros((batch, 0), dtype=torch.long, device=self.device)  # [B, T]
        self._tree_parent = torch.zeros((batch, 0), dtype=torch.long, device=self.device)  # [B, T]

    @property
    def tree_size(self) -> int:
        return self._tree_parent.shape[1]

    def extend_tree(
        self,
        tokens: torch.Tensor,  # long [B, w]: new tree nodes T .. T+w-1
        parents: torch.Tensor,  # long [B, w]: parent tree-node index (< own index), -1: child of the committed context
        valid: torch.Tensor | None = None,  # long [B, w]; invalid nodes (padding) are attended by nobody
        hidden_layers: tuple[int, ...] = (),
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Feed tree nodes in one forward; returns logits [B, w, V]. A node attends the row's committed
        slots and its tree ancestors (4-D additive mask) at position (committed tokens + depth), where
        depth counts its tree ancestors."""
        batch, w = tokens.shape
        device = tokens.device
        t_old = self.tree_size
        valid = torch.ones_like(tokens) if valid is None else valid.to(torch.long)
        # ancestor-or-self closure of the whole tree by repeated squaring of (I + parent edges)
        par = torch.cat([self._tree_parent, parents.to(torch.long)], dim=1)  # [B, T]
        t = t_old + w
        par = torch.where((par >= 0) & (par < torch.arange(t, device=device)), par, torch.full_like(par, -1))
        edge = torch.zeros((batch, t, t), dtype=torch.float32, device=device)
        has = par >= 0
        edge[has.nonzero(as_tuple=True) + (par[has],)] = 1.0
        anc = edge + torch.eye(t, device=device)
        for _ in range(max(1, (t - 1).bit_length())):
            anc = (anc @ anc).clamp_max(1.0)
        anc = anc.bool()  # [B, T, T]: anc[b, j, i] = node i is j or one of j's ancestors
        depth = anc.sum(dim=-1) - 1  # [B, T]: tree ancestors (0 for children of the committed context)
        self._tree_parent, self._tree_depth = par, depth
        tree_valid = torch.cat([self.valid[:, self._tree_start:], valid], dim=1)  # [B, T+w]
        allowed_tree = anc[:, t_old:] & tree_valid.bool().unsqueeze(1)  # [B, w, T+w]
        allowed_tree[:, torch.arange(w), t_old + torch.arange(w)] = True  # each query sees itself
        pos = self.next_pos.unsqueeze(1) + self.position_delta.unsqueeze(1) + depth[:, t_old:]
        return self._forward_allowed(tokens, allowed_tree, self._tree_start, pos, valid, hidden_layers, **model_inputs)

    def _forward_allowed(self, tokens: torch.Tensor, allowed_tail: torch.Tensor, tail_start: int,
                         position_ids: torch.Tensor, valid: torch.Tensor, hidden_layers: tuple[int, ...] = (),
                         **model_inputs: Any) -> torch.Tensor:
        """One forward of ``tokens`` [B, w] under a 4-D additive mask: every new slot sees the valid slots before
        ``tail_start`` and, from there on, the keys ``allowed_tail`` bool [B, w, S - tail_start + w] names;
        the new slots are appended with 2-D validity ``valid`` [B, w]. Returns logits [B, w, V]."""
        batch, w = tokens.shape
        head = self.valid[:, :tail_start].bool().unsqueeze(1).expand(batch, w, tail_start)
        allowed = torch.cat([head, allowed_tail.to(torch.bool)], dim=2)  # [B, w, S + w]
        dtype = _float_dtype(self.model)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=tokens.device).masked_fill(~allowed, torch.finfo(dtype).min)
        if hidden_layers:
            model_inputs = dict(model_inputs, output_hidden_states=True)
        ids = {} if "inputs_embeds" in model_inputs else {"input_ids": tokens}  # a pipeline stage feeds hidden states
        out = self.model(**ids, attention_mask=mask.unsqueeze(1), position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True, **model_inputs)
        self.calls += 1
        self.last_hidden = _pick_hidden(out, hidden_layers)
        self.cache = out.past_key_values
        self.valid = torch.cat([self.valid, valid], dim=1)
        return out.logits

    def keep_path(self, path: torch.Tensor, num_keep: torch.Tensor) -> None:
        """End a tree: keep the tree nodes ``path`` (long [B, D], root-to-leaf, -1 padded), the first
        ``num_keep[b]`` of them, in contiguous slots right after the committed ones; drop the others."""
        start = self._tree_start
        width = self.num_slots - start
        batch, depth = path.shape
        device = self.valid.device
        src = torch.arange(width, device=device).expand(batch, width).clone()
        if depth and width:
            d = min(depth, width)
            src[:, :d] = torch.where(path[:, :d] >= 0, path[:, :d], src[:, :d])
        if self.cache is not None and width:
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)  # [B, H, S, D]
                    idx = src.view(batch, 1, width, 1).expand(-1, t.shape[1], -1, t.shape[3])
                    setattr(layer, name, torch.cat([t[:, :, :start], t[:, :, start:].gather(2, idx)], dim=2))
        cols = torch.arange(width, device=device).unsqueeze(0)
        self.valid = torch.cat([self.valid[:, :start], (cols < num_keep.unsqueeze(1)).long()], dim=1)
        self.next_pos = self.next_pos + num_keep
        self._crop_dead_tail()
        self.begin_tree()  # no tree open

    def rollback(self, num_remove: torch.Tensor) -> None:
        """Remove the last ``num_remove[b]`` valid tokens of each row b (long [B])."""
        if self._drop_uniform_tail(num_remove):
            return
        from_right = self.valid.flip(1).cumsum(dim=1).flip(1)  # [B, S]: valid slots at or after
        drop = (from_right <= num_remove.unsqueeze(1)) & self.valid.bool()
        self.valid = self.valid.masked_fill(drop, 0)
        self.next_pos = self.next_pos - num_remove
        self._crop_dead_tail()

    def _drop_uniform_tail(self, num_remove: torch.Tensor) -> bool:
        """The common rollback, as the general path would do it with fewer operations: every row removes
        the same r tokens, the last r slots are valid in every row (as after a chain step) and the slot
        before them is valid in some row (no dead column would remain to crop): crop r slots. Returns
        False, changing nothing, in every other case."""
        if num_remove.numel() == 0:
            return False
        slots = self.num_slots
        r = int(num_remove[0])
        if r < 0 or r > slots:
            return False
        checks = [(num_remove == r).all()]
        if r < slots:
            checks.append(self.valid[:, slots - r - 1].any())
        if r:
            checks.append(self.valid[:, slots - r:].all())
        if not all(torch.stack(checks).tolist()):
            return False
        if r:
            self.valid = self.valid[:, : slots - r]
            self.next_pos = self.next_pos - num_remove
            if self.cache is not None:
                self.cache.crop(-r)
        return True

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

    def fork(self, rows: torch.Tensor) -> "CacheSession":
        """A new session over copies of ``rows`` (long [R], repeats allowed) of this one: extending the
        fork never touches this session's cache (e.g. to try several continuations of one row)."""
        import copy

        fork = copy.copy(self)
        if self.cache is not None:
            fork.cache = copy.copy(self.cache)
            fork.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            fork.cache.batch_select_indices(rows)  # new tensors; layers update by concatenation
            for layer in fork.cache.layers:  # HF skips layers holding no slot: select their (empty) rows too
                keys = getattr(layer, "keys", None)
                if isinstance(keys, torch.Tensor) and keys.shape[0] != rows.numel():
                    layer.keys, layer.values = keys[rows], layer.values[rows]
        fork.valid, fork.next_pos = self.valid[rows], self.next_pos[rows]
        fork.position_delta = self.position_delta[rows]
        fork.calls = 0
        return fork

    def merge(self, other: "CacheSession") -> None:
        """Append ``other``'s rows (a session of the same model, e.g. new prompts prefilled alone) to this batch.
        The session with fewer slots is padded on the left with invalid slots, so every row keeps its own
        slots, positions and mask (continuous batching: rows joining a running batch)."""
        if self.cache is None or other.cache is None:
            raise ValueError("both sessions must hold a prefilled cache to merge")
        s, o = self.num_slots, other.num_slots
        width = max(s, o)
        mine, theirs = list(self.cache.layers), list(other.cache.layers)
        if len(mine) != len(theirs) or any(
                not isinstance(getattr(la, "keys", None), torch.Tensor) or la.keys.shape[-2] != s
                or lb.keys.shape[-2] != o for la, lb in zip(mine, theirs)):
            raise ValueError("these caches cannot be merged (another model, or layers that do not keep every slot)")

        def left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for la, lb in zip(mine, theirs):
            la.keys = torch.cat([left_pad(la.keys, width - s, -2), left_pad(lb.keys, width - o, -2)], dim=0)
            la.values = torch.cat([left_pad(la.values, width - s, -2), left_pad(lb.values, width - o, -2)], dim=0)
        self.valid = torch.cat([left_pad(self.valid, width - s, 1), left_pad(other.valid, width - o, 1)], dim=0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.position_delta = torch.cat([self.position_delta, other.position_delta])
        self.calls += other.calls

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


def right_align(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> (tokens long [B, P], valid long [B, P]) aligned to the right."""
    width = max((len(r) for r in rows), default=0)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            tokens[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            valid[b, width - len(r):] = 1
    return tokens.to(device), valid.to(device)
