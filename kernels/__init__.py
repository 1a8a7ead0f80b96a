"""Triton kernels with their PyTorch references and one dispatch point (``mmspec.kernels``)."""

from .chain_verify import HAS_TRITON, chain_verify_torch, chain_verify_triton
from .dispatch import chain_verify, select_backend

__all__ = ["HAS_TRITON", "chain_verify", "chain_verify_torch", "chain_verify_triton", "select_backend"]
