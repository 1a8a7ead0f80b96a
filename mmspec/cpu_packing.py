"""Pre-packed oneDNN weights for the linear layers of a model run on a CPU (inference only).

Glossary:
    packed weight   a copy of an ``nn.Linear`` weight reordered once into oneDNN's blocked layout
                    (``torch.ops.mkldnn._reorder_linear_weight``); the layer's forward then calls
                    ``torch.ops.mkldnn._linear_pointwise`` instead of a BLAS call that re-packs the weight
                    on every call
    width           tokens per forward (rows of the activation matrix)

Why: on a 2-core AVX2 CPU a BLAS linear layer is a matrix-vector product at width 1 and a
matrix-matrix product with per-call packing above it, so verifying 4 tokens cost 1.85 single-token
forwards of SmolLM2-135M (``benchmarks/RESULTS.md``). Measured here (2 threads, float32), per call:
a 1536 x 576 layer 0.145 / 0.188 / 0.314 / 0.372 ms at width 1 / 2 / 4 / 16 with BLAS, 0.107 / 0.099 /
0.120 / 0.236 ms packed; the 49152 x 576 LM head 11.9 / 25.9 / 28.7 / 30.6 ms with BLAS, 7.5 / 8.4 /
9.5 / 12.2 ms packed. Speculative decoding verifies several tokens per forward, so it gains more than
plain decoding does; both get faster.

``dtype=torch.bfloat16`` packs a bfloat16 copy instead (inputs are cast to bf16, outputs back to float32): for a
*drafter* on CPUs with native bf16 (AMX / AVX512-BF16; :func:`bf16_native`), where a drafter's small matrix
products run several times faster; its drafts may change, never the output, since the target verifies every token.
The calibration measures it (:mod:`mmspec.calibration`); a target is never packed in bf16 by this library.

Packing applies to float32 ``nn.Linear`` layers on the CPU; with autograd enabled (training) or when
the weight changed since it was packed (its version counter moved) a layer runs its ordinary forward
(and a changed weight is re-packed on the next inference call).
"""

from __future__ import annotations

import types

import torch
from torch import nn

_ATTR = "_mmspec_packed"


def packing_available() -> bool:
    """Whether this torch build can pack linear weights for oneDNN (CPU builds with mkldnn)."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def bf16_native() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(packing_available() and check is not None and check())


def _pack(layer: nn.Linear, dtype: torch.dtype = torch.float32) -> None:
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach().to(dtype), None)
    layer.__dict__[_ATTR] = (packed, layer.weight._version, layer.weight.data_ptr(), dtype)


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed, version, ptr, dtype = self.__dict__[_ATTR]
    w = self.weight
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or w.dtype != torch.float32:
        return nn.Linear.forward(self, x)
    if w._version != version or w.data_ptr() != ptr:  # the weight changed (training, load_state_dict)
        _pack(self, dtype)
        packed = self.__dict__[_ATTR][0]
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if dtype == torch.float32:
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, self.bias, "none", [], "")
    else:  # a bf16 copy: bf16 inputs, float32 out, the float32 bias added after
        out = torch.ops.mkldnn._linear_pointwise(rows.to(dtype), packed, None, "none", [], "").float()
        if self.bias is not None:
            out = out + self.bias
    return out.reshape(*lead, out.shape[-1])


def is_packed(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is packed."""
    return any(isinstance(m, nn.Linear) and _ATTR in m.__dict__ for m in model.modules())


def packed_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s packed copies (None: not packed)."""
    return next((m.__dict__[_ATTR][3] for m in model.modules() if isinstance(m, nn.Linear) and _ATTR in m.__dict__),
                None)


def pack_linear_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Pack every float32 CPU ``nn.Linear`` of ``model`` in place (a ``dtype`` copy: float32, or bfloat16 for a
    drafter, see the module glossary); returns how many were packed (0 when this torch build cannot). float32:
    outputs match the unpacked model up to float rounding."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"pack_linear_weights packs float32 or bfloat16 copies, got {dtype}")
    if not packing_available() or (dtype == torch.bfloat16 and not bf16_native()):
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            _pack(module, dtype)
            module.forward = types.MethodType(_packed_forward, module)
            n += 1
    return n


def unpack_linear_weights(model: nn.Module) -> int:
    """Undo :func:`pack_linear_weights` (drops the packed copies); returns how many layers it restored."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and _ATTR in module.__dict__:
            del module.__dict__[_ATTR]
            module.__dict__.pop("forward", None)
            n += 1
    return n
