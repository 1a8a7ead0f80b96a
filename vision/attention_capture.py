"""Capture a VLM's prefill text->image attention without switching the model to eager attention.

Verifier-guided visual-token pruning (SpecVLM, Ji et al., EMNLP'25) ranks the image tokens of a prompt by how much
attention the *target* model's text positions after the image pay to them during prefill, averaged over layers,
heads and text queries.  Asking transformers for ``output_attentions=True`` needs eager attention, which
materialises every ``[B, H, L, L]`` probability matrix of every layer; instead :class:`AttentionCapture` lets the
model run with its normal attention implementation (SDPA by default in transformers 5) and, for the selected layers
only, recomputes the probabilities of just the selected query rows from the post-RoPE queries/keys the attention
function receives::

    with AttentionCapture(vlm.model.language_model, query_mask, key_mask, layers=range(4, 12)) as cap:
        out = vlm(**inputs)                       # normal (SDPA) prefill, logits unchanged
    image_scores = cap.scores                     # float32 [B, L], 0 outside key_mask

How it hooks in
---------------
In transformers >= 4.48 every decoder attention module resolves its kernel through an ``AttentionInterface``
(``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`` or
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``) and calls it as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with ``query``/``key`` already
rotated (RoPE, M-RoPE for Qwen2-VL / Qwen2.5-VL) and ``key`` possibly holding fewer (GQA) heads.

* **Non-eager implementations** (``sdpa``, ``flash_attention_*``, ``flex_attention``, custom registered ones): for
  the duration of the ``with`` block the entry of the configured implementation in the *instance-local* mapping of
  the ``AttentionInterface`` object the attention module's ``forward`` uses (``interface[name] = dispatcher``) is
  replaced by a dispatcher.  The dispatcher looks at the calling ``module``: for one of the selected layers of an
  active capture it computes ``softmax(q k^T * scaling + mask)`` for the selected query rows (float32, in chunks),
  then -- for every call -- delegates to the original function with the unchanged arguments, so the model's outputs
  are bit-identical.  Calls from any other module (vision tower, other models) are passed straight through.  The
  class-level registry (``AttentionInterface._global_mapping``) is never touched; on exit the local entry is restored
  exactly (or removed if there was none).  Several captures may be active at once (nested, on different models or
  threads, exited in any order): one dispatcher per (interface, name) is shared and reference counted under a lock.
* **Eager attention** (``"eager"`` is not a key of the interface -- the module falls back to its own
  ``eager_attention_forward``): the attention modules' own outputs already carry the probabilities
  (``(attn_output, attn_weights)``), so a forward hook on each selected attention module reads them.

Only the *next* forward of ``language_model`` is captured: a forward pre-hook on ``language_model`` arms the
capture (and records its 2-D ``attention_mask``), a forward hook disarms it, so later forwards inside the block
(e.g. decode steps of ``generate``) are ignored.  All hooks are removed in ``__exit__``, also on exceptions.

Which mask the attention function sees, and how it is reproduced (so the probabilities are those of the real,
masked softmax over *all* allowed keys -- text keys included -- exactly what eager ``output_attentions`` gives):

* 4-D ``bool`` mask ``[B|1, 1|H, Q, K']`` (SDPA with padding / sliding window): ``True`` = attend, sliced to ``K``.
* 4-D floating mask (eager-style additive, e.g. custom masks): added to the logits.
* ``None`` (SDPA ``is_causal`` fast path, flash attention without padding): causal iff the call's ``is_causal``
  kwarg / ``module.is_causal`` says so and ``Q > 1`` (SDPA's rule); the causal diagonal is top-left aligned for SDPA
  (as transformers' SDPA path crops the keys) and bottom-right aligned otherwise (identical for a prefill, Q == K);
  a ``sliding_window`` kwarg (flash) is honoured; padding is taken from the 2-D ``attention_mask`` the language
  model was called with, if any (SDPA only takes this path when there is none).
* 2-D mask ``[B, K]`` (flash attention with padding): key padding mask combined with the causal rule above.
* flex-attention ``BlockMask``: densified with ``torch.nn.attention.flex_attention.create_mask(mask.mask_mod, ...)``
  (best effort, not covered by the tests).

``softcap`` kwargs (Gemma-2 style) are applied like eager does; attention sinks (``s_aux``, gpt-oss) and learned
position biases are not supported and raise.  Attention dropout is ignored (use the model in eval mode).

Caveats
-------
* Prefill only: ``query_mask`` must cover the forward's query length ``Q`` and ``key_mask`` at most its key length
  (no past cache; with an empty static cache the extra key slots are simply not scored).
* For half-precision models the probabilities are computed in float32 from the bf16/fp16 q/k, whereas eager computes
  ``q k^T`` in the model dtype: results agree to the model dtype's precision, not bit-exactly.
* ``torch.compile``: the dispatcher is plain Python with data-dependent indexing; capture in an uncompiled prefill.
* transformers < 4.48, or attention classes that bypass ``AttentionInterface`` (e.g. the 4.4x ``*SdpaAttention``
  subclasses): nothing is observed and :attr:`AttentionCapture.scores` raises instead of returning wrong numbers.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["AttentionCapture"]

# Upper bound (elements) of one float32 logits block [H, rows, K] computed at once.
_DEFAULT_CHUNK_ELEMS = 1 << 24

_LOCK = threading.RLock()
_PATCHES: dict[tuple[int, str], "_InterfacePatch"] = {}


class _InterfacePatch:
    """One dispatcher installed in one ``AttentionInterface`` instance under one implementation name."""

    def __init__(self, interface: Any, name: str):
        self.interface = interface
        self.name = name
        local = getattr(interface, "_local_mapping", None)
        self._local = local if isinstance(local, dict) else None
        store = self._local if self._local is not None else interface
        self.had_entry = name in store
        self.old_entry = store[name] if self.had_entry else None
        self.original: Callable = interface[name]
        self.captures: list[AttentionCapture] = []
        patch = self

        def mmspec_attention_capture_dispatch(module, query, key, value, attention_mask, *args, **kwargs):
            for capture in tuple(patch.captures):
                capture._observe_call(patch, module, query, key, attention_mask, args, kwargs)
            return patch.original(module, query, key, value, attention_mask, *args, **kwargs)

        self.dispatch = mmspec_attention_capture_dispatch
        interface[name] = self.dispatch  # GeneralInterface.__setitem__: instance-local override only

    def uninstall(self) -> None:
        if self._local is not None:
            if self.had_entry:
                self._local[self.name] = self.old_entry
            else:
                self._local.pop(self.name, None)
        elif self.had_entry:  # plain mapping
            self.interface[self.name] = self.old_entry
        else:
            del self.interface[self.name]


def _acquire_patch(interface: Any, name: str, capture: "AttentionCapture") -> _InterfacePatch:
    with _LOCK:
        key = (id(interface), name)
        patch = _PATCHES.get(key)
        if patch is None:
            patch = _InterfacePatch(interface, name)
            _PATCHES[key] = patch
        patch.captures.append(capture)
        return patch


def _release_patch(patch: _InterfacePatch, capture: "AttentionCapture") -> None:
    with _LOCK:
        if capture in patch.captures:
            patch.captures.remove(capture)
        if not patch.captures and _PATCHES.get((id(patch.interface), patch.name)) is patch:
            del _PATCHES[(id(patch.interface), patch.name)]
            patch.uninstall()


def _attention_interface_of(module: nn.Module) -> Any | None:
    """The ``ALL_ATTENTION_FUNCTIONS`` object the module's ``forward`` looks its kernel up in."""
    try:
        fn = inspect.unwrap(type(module).forward)
        interface = getattr(fn, "__globals__", {}).get("ALL_ATTENTION_FUNCTIONS")
    except Exception:  # pragma: no cover - exotic wrappers
        interface = None
    if interface is None:
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as interface
        except ImportError:  # pragma: no cover - transformers < 4.48
            return None
    if not (hasattr(interface, "__getitem__") and hasattr(interface, "__setitem__")):
        return None
    return interface


def _decoder_attention_modules(language_model: nn.Module) -> list[nn.Module]:
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or len(layers) == 0:
        raise TypeError(
            f"{type(language_model).__name__} has no `.layers` list of decoder layers; pass the VLM's decoder text "
            "model (e.g. `vlm.model.language_model`), not the whole VLM")
    modules = []
    for i, layer in enumerate(layers):
        attn = None
        for name in ("self_attn", "self_attention", "attention", "attn"):
            cand = getattr(layer, name, None)
            if isinstance(cand, nn.Module):
                attn = cand
                break
        if attn is None:
            raise TypeError(f"decoder layer {i} ({type(layer).__name__}) has no self-attention submodule")
        modules.append(attn)
    return modules


def _as_bool_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [batch, length] tensor")
    return mask if mask.dtype == torch.bool else mask != 0


class AttentionCapture:
    """Context manager measuring the prefill attention of selected queries onto selected keys.

    Args:
        language_model: the decoder text model of a HF VLM (``vlm.model.language_model``: ``LlamaModel``,
            ``Qwen2Model``, ``Qwen2VLTextModel``, ``Qwen2_5_VLTextModel``, ...), with any attention implementation.
        query_mask: bool ``[B, L]`` -- query positions (text after the image) of the next forward to average over.
        key_mask: bool ``[B, L]`` -- key positions (image tokens) to report.
        layers: decoder layer indices to average over (negative indices allowed); ``None`` = all layers.
        chunk_elems: max elements of one float32 ``[H, rows, K]`` logits block (memory bound).

    After the first forward of ``language_model`` inside the block, :attr:`scores` is a float32 ``[B, L]`` tensor
    (on ``key_mask``'s device): for each key position the attention probability from row ``b``'s query positions,
    averaged over the selected layers, all query heads and those query positions, ``0`` where ``key_mask`` is
    False (and for rows without query positions).  This equals
    ``mean_{l in layers, h, q in query_mask[b]} attentions[l][b, h, q, k]`` of an eager ``output_attentions`` run.
    """

    def __init__(self, language_model: nn.Module, query_mask: torch.Tensor, key_mask: torch.Tensor,
                 layers: Sequence[int] | None = None, *, chunk_elems: int = _DEFAULT_CHUNK_ELEMS):
        self.language_model = language_model
        self.query_mask = _as_bool_mask(query_mask, "query_mask")
        self.key_mask = _as_bool_mask(key_mask, "key_mask")
        if self.query_mask.shape[0] != self.key_mask.shape[0]:
            raise ValueError("query_mask and key_mask must have the same batch size")
        attn_modules = _decoder_attention_modules(language_model)
        n = len(attn_modules)
        if layers is None:
            idx = list(range(n))
        else:
            idx = []
            for i in layers:
                i = int(i)
                if not -n <= i < n:
                    raise IndexError(f"layer index {i} out of range for {n} decoder layers")
                idx.append(i % n)
            idx = sorted(set(idx))
            if not idx:
                raise ValueError("layers must select at least one decoder layer")
        self.layers: tuple[int, ...] = tuple(idx)
        self._modules = {i: attn_modules[i] for i in self.layers}
        self._by_id = {id(m): i for i, m in self._modules.items()}
        self.chunk_elems = int(chunk_elems)
        self._active = False
        self._handles: list[Any] = []
        self._patches: list[_InterfacePatch] = []
        self._reset()

    # ------------------------------------------------------------------ context management
    def _reset(self) -> None:
        self._armed = False
        self._done = False
        self._seen: set[int] = set()
        self._sums: torch.Tensor | None = None
        self._num_heads: int | None = None
        self._lm_padding: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._mask_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> "AttentionCapture":
        if self._active:
            raise RuntimeError("AttentionCapture is not re-entrant")
        self._reset()
        self._active = True
        try:
            lm = self.language_model
            self._handles.append(lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
            self._handles.append(lm.register_forward_hook(self._lm_post_hook, always_call=True))
            for module in self._modules.values():
                impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
                interface = _attention_interface_of(module)
                use_dispatch = False
                if isinstance(impl, str) and interface is not None:
                    try:
                        use_dispatch = impl in interface
                    except Exception:  # pragma: no cover
                        use_dispatch = False
                if use_dispatch:
                    if not any(p.interface is interface and p.name == impl for p in self._patches):
                        self._patches.append(_acquire_patch(interface, impl, self))
                else:  # eager (module-local eager_attention_forward): read the weights the module returns
                    self._handles.append(module.register_forward_hook(self._eager_hook))
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._teardown()

    def _teardown(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._patches:
            _release_patch(p, self)
        self._patches.clear()
        self._armed = False
        self._active = False

    def _lm_pre_hook(self, module, args, kwargs):
        if self._done or self._armed:
            return None
        self._armed = True
        am = kwargs.get("attention_mask")
        if am is None and len(args) > 1:
            am = args[1]
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            self._lm_padding = am != 0
        return None

    def _lm_post_hook(self, module, args, output):
        if self._armed:
            self._armed = False
            self._done = True
        return None

    # ------------------------------------------------------------------ observation
    def _masks_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._mask_cache.get(device)
        if m is None:
            m = (self.query_mask.to(device), self.key_mask.to(device))
            self._mask_cache[device] = m
        return m

    def _accumulate(self, layer: int, contrib: torch.Tensor, num_heads: int) -> None:
        if self._num_heads is None:
            self._num_heads = num_heads
        elif self._num_heads != num_heads:
            raise RuntimeError("selected layers have different numbers of attention heads")
        contrib = contrib.to(self.key_mask.device, torch.float32)
        self._sums = contrib if self._sums is None else self._sums + contrib
        self._seen.add(layer)

    def _check_shapes(self, B: int, Q: int, K: int) -> None:
        if tuple(self.query_mask.shape) != (B, Q):
            raise ValueError(f"query_mask has shape {tuple(self.query_mask.shape)} but the captured forward has "
                             f"batch {B} and query length {Q} (AttentionCapture expects a prefill without cache)")
        if self.key_mask.shape[0] != B or self.key_mask.shape[1] > K:
            raise ValueError(f"key_mask has shape {tuple(self.key_mask.shape)} but the captured forward has "
                             f"batch {B} and key length {K}")

    @torch.no_grad()
    def _observe_call(self, patch: _InterfacePatch, module, query, key, attention_mask, args, kwargs) -> None:
        layer = self._by_id.get(id(module))
        if layer is None or not self._armed or layer in self._seen or self._modules[layer] is not module:
            return
        if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
            raise NotImplementedError("AttentionCapture does not support attention sinks / position biases")
        B, H, Q, D = query.shape
        K = key.shape[2]
        Hkv = key.shape[1]
        if H % Hkv:
            raise ValueError(f"query heads {H} not a multiple of key heads {Hkv}")
        self._check_shapes(B, Q, K)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None)
        if scaling is None:
            scaling = D ** -0.5
        softcap = kwargs.get("softcap")
        qmask, kmask = self._masks_on(query.device)
        Kw = kmask.shape[1]
        rep = H // Hkv
        contrib = torch.zeros(B, Kw, dtype=torch.float32, device=query.device)
        rows_per_chunk = max(1, self.chunk_elems // max(1, H * K))
        for b in range(B):
            qidx = qmask[b].nonzero().squeeze(1)
            if qidx.numel() == 0:
                continue
            kb = key[b].to(torch.float32).unsqueeze(1).transpose(-1, -2)  # [Hkv, 1, D, K]
            total = torch.zeros(K, dtype=torch.float32, device=query.device)
            for start in range(0, qidx.numel(), rows_per_chunk):
                rows = qidx[start:start + rows_per_chunk]
                qb = query[b, :, rows].to(torch.float32).reshape(Hkv, rep, rows.numel(), D)
                logits = torch.matmul(qb, kb).reshape(H, rows.numel(), K) * scaling
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                bias = self._mask_bias(patch, module, attention_mask, kwargs, b, rows, Q, K, B, H, query.device)
                if bias is not None:
                    logits = logits + bias
                probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # fully masked rows -> 0
                total += probs.sum(dim=(0, 1))
            contrib[b] = total[:Kw]
        self._accumulate(layer, contrib, H)

    def _mask_bias(self, patch, module, mask, kwargs, b, rows, Q, K, B, H, device) -> torch.Tensor | None:
        """Additive float32 bias broadcastable to [H, len(rows), K] (-inf = not allowed), or None."""
        if mask is not None and type(mask).__name__ == "BlockMask":
            from torch.nn.attention.flex_attention import create_mask

            dense = create_mask(mask.mask_mod, B, 1, Q, K, device=device)  # [B, 1, Q, K] bool
            mask = dense
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = mask[b if mask.shape[0] > 1 else 0][:, rows, :K].to(device)
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=torch.float32, device=device).masked_fill_(~m, float("-inf"))
            return m.to(torch.float32)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise TypeError(f"unsupported attention mask passed to the attention function: {type(mask).__name__} "
                            f"{getattr(mask, 'shape', '')}")
        allowed = None
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(module, "is_causal", True)
        if causal and Q > 1:
            offset = 0 if patch.name == "sdpa" else K - Q  # sdpa: top-left (keys cropped); others bottom-right
            q_pos = rows.to(device).unsqueeze(1) + offset
            k_pos = torch.arange(K, device=device).unsqueeze(0)
            allowed = k_pos <= q_pos
            window = kwargs.get("sliding_window")
            if window is not None:
                allowed = allowed & (k_pos > q_pos - int(window))
        padding = mask if isinstance(mask, torch.Tensor) else self._lm_padding
        if padding is not None and padding.shape[0] == B and padding.shape[1] >= K:
            keep = (padding[b, :K] != 0).to(device).unsqueeze(0)
            allowed = keep if allowed is None else allowed & keep
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))

    @torch.no_grad()
    def _eager_hook(self, module, args, output) -> None:
        layer = self._by_id.get(id(module))
        if layer is None or not self._armed or layer in self._seen:
            return None
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
            raise RuntimeError(
                f"{type(module).__name__} (layer {layer}) returned no attention weights; its attention "
                f"implementation {getattr(getattr(module, 'config', None), '_attn_implementation', None)!r} is "
                "neither eager nor routed through transformers' AttentionInterface")
        B, H, Q, K = weights.shape
        self._check_shapes(B, Q, K)
        qmask, kmask = self._masks_on(weights.device)
        contrib = torch.zeros(B, kmask.shape[1], dtype=torch.float32, device=weights.device)
        for b in range(B):
            rows = qmask[b].nonzero().squeeze(1)
            if rows.numel():
                contrib[b] = weights[b][:, rows, : kmask.shape[1]].to(torch.float32).sum(dim=(0, 1))
        self._accumulate(layer, contrib, H)
        return None

    # ------------------------------------------------------------------ results
    @property
    def scores(self) -> torch.Tensor:
        """float32 ``[B, L]``: mean attention probability per key position (0 outside ``key_mask``)."""
        if self._scores is not None:
            return self._scores
        if not self._done or self._sums is None:
            raise RuntimeError("no forward of the language model was captured inside the AttentionCapture block")
        missing = [i for i in self.layers if i not in self._seen]
        if missing:
            raise RuntimeError(
                f"decoder layers {missing} were not observed: their attention did not go through transformers' "
                "AttentionInterface nor return eager attention weights (unsupported model / transformers version)")
        kmask = self.key_mask
        n_q = self.query_mask.to(kmask.device).sum(dim=1).to(torch.float32)
        denom = (n_q * (len(self.layers) * self._num_heads)).clamp_min(1.0).unsqueeze(1)
        self._scores = (self._sums / denom).masked_fill_(~kmask, 0.0)
        return self._scores
