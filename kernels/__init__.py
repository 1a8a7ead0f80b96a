"""Triton kernels with their PyTorch references and one dispatch point (``mmspec.kernels``)."""

from .chain_verify import HAS_TRITON, chain_verify_torch, chain_verify_triton
from .dispatch import chain_verify, pooled_acceptance, select_backend, tree_verify
from .pooled_acceptance import pooled_acceptance_torch, pooled_acceptance_triton
from .tree_verify import tree_verify_torch, tree_verify_triton

__all__ = ["HAS_TRITON", "chain_verify", "chain_verify_torch", "chain_verify_triton", "pooled_acceptance",
           "pooled_acceptance_torch", "pooled_acceptance_triton", "select_backend", "tree_verify",
           "tree_verify_torch", "tree_verify_triton"]
