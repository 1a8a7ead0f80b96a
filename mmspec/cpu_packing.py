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


def _pack(layer: nn.Linear) -> None:
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
    layer.__dict__[_ATTR] = (packed, layer.weight._version, layer.weight.data_ptr())


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed, version, ptr = self.__dict__[_ATTR]
    w = self.weight
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or w.dtype != torch.float32:
        return nn.Linear.forward(self, x)
    if w._version != version or w.data_ptr() != ptr:  # the weight changed (training, load_state_dict)
        _pack(self)
        packed = self.__dict__[_ATTR][0]
    lead = x.shape[:-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, self.bias,
                                             "none", [], "")
    return out.reshape(*lead, out.shape[-1])


def is_packed(model: nn.Module) -> bool:
    """Whether any linear layer of ``model`` is packed."""
    return any(isinstance(m, nn.Linear) and _ATTR in m.__dict__ for m in model.modules())


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every float32 CPU ``nn.Linear`` of ``model`` in place; returns how many were packed (0 when
    this torch build cannot). Outputs match the unpacked model up to float rounding."""
    if not packing_available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            _pack(module)
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
