"""One dispatch point for the verification kernels.

Glossary: backend "triton" (the fused kernel; on CPU only under ``TRITON_INTERPRET=1``),
"torch" (the PyTorch reference). ``None`` picks Triton for CUDA tensors when Triton is
installed, else torch. ``MMSPEC_KERNEL_BACKEND`` overrides the automatic choice.
"""

from __future__ import annotations

import os

import torch

from .chain_verify import HAS_TRITON, chain_verify_torch, chain_verify_triton
from .pooled_acceptance import pooled_acceptance_torch, pooled_acceptance_triton
from .tree_verify import tree_verify_torch, tree_verify_triton

BACKENDS = ("triton", "torch")


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """Resolve ``backend`` (explicit > env var > device default)."""
    choice = backend or os.environ.get("MMSPEC_KERNEL_BACKEND") or None
    if choice is None:
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; expected one of {BACKENDS}")
    return choice


def chain_verify(mode, draft_tokens, num_draft, draft_probs, target, uniforms, noise, *, backend=None):
    """Fused chain verification; returns (tokens long [B, k+1], num_accepted long [B])."""
    if select_backend(target.device, backend) == "triton":
        return chain_verify_triton(mode, draft_tokens, num_draft, draft_probs, target, uniforms, noise)
    return chain_verify_torch(mode, draft_tokens, num_draft, draft_probs, target, uniforms, noise)


def pooled_acceptance(mode, draft_tokens, q_x, target_probs, neighbours, uniforms, param, *, backend=None):
    """Pooled acceptance over latent neighbours; returns (accepted bool [B, k], pooled float64 [B, k],
    n_pooled long [B, k])."""
    if select_backend(target_probs.device, backend) == "triton":
        return pooled_acceptance_triton(mode, draft_tokens, q_x, target_probs, neighbours, uniforms, param)
    return pooled_acceptance_torch(mode, draft_tokens, q_x, target_probs, neighbours, uniforms, param)


def tree_verify(mode, draft_tokens, parents, num_draft, draft_probs, target, uniforms, noise, max_depth, *,
                backend=None):
    """Fused draft-tree verification; returns (tokens long [B, D+1], accepted_nodes long [B, D],
    num_accepted long [B]) with D = ``max_depth``."""
    fn = tree_verify_triton if select_backend(target.device, backend) == "triton" else tree_verify_torch
    return fn(mode, draft_tokens, parents, num_draft, draft_probs, target, uniforms, noise, max_depth)
