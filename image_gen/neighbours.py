"""Latent-neighbour tables of a VQ codebook (for LANTERN / MuLo-SD style relaxed acceptance).

Papers: Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative
Decoding" (ICLR 2025); MuLo-SD (CVPR 2026).

Glossary:
    B_k(x)   the k codebook entries nearest to entry x in latent space (Euclidean distance between
             codebook vectors), x itself excluded, nearest first; ties broken by the lower index
    table    LongTensor [V, k] with row x = B_k(x); built once per tokenizer, passed into rules as a
             tensor (callers may cache it to disk; rules never load files)
    live     optional bool [V]: the codes the tokenizer actually produces. With a fixed lattice (FSQ)
             most lattice points next to a used code may never occur, and pooling the target's mass
             over them adds nothing; ``live=`` restricts every row's neighbours to live codes
"""

from __future__ import annotations

import torch

from mmspec.errors import MMSpecError


def build_latent_neighbours(codebook: torch.Tensor, k: int, *, live: torch.Tensor | None = None,
                            chunk: int = 4096) -> torch.Tensor:
    """codebook float [V, d] -> neighbour table long [V, k] (nearest first, self excluded; among the
    ``live`` codes only, when given).

    Distances are computed in float64 in row chunks (``torch.cdist``) so that V of 16k+ fits in memory;
    ``k = 0`` gives an empty [V, 0] table.
    """
    if codebook.dim() != 2:
        raise MMSpecError(f"codebook must be [V, d], got shape {tuple(codebook.shape)}")
    vocab = codebook.shape[0]
    if not isinstance(k, int) or k < 0 or k > vocab - 1:
        raise MMSpecError(f"k must be an int in [0, V-1] = [0, {vocab - 1}], got {k!r}")
    if live is not None:
        if live.dtype != torch.bool or tuple(live.shape) != (vocab,):
            raise MMSpecError(f"live must be a bool tensor [{vocab}], got {live!r:.60}")
        if k > int(live.sum()) - 1:
            raise MMSpecError(f"k={k} but only {int(live.sum())} live codes (k must be < live codes)")
    cb = codebook.detach().to(torch.float64)
    out = torch.empty((vocab, k), dtype=torch.long, device=codebook.device)
    if k == 0:
        return out
    idx = torch.arange(vocab, device=codebook.device)
    for start in range(0, vocab, chunk):
        rows = slice(start, min(start + chunk, vocab))
        dist = torch.cdist(cb[rows], cb)  # [c, V]
        dist[torch.arange(dist.shape[0], device=dist.device), idx[rows]] = float("inf")  # exclude self
        if live is not None:
            dist[:, ~live.to(dist.device)] = float("inf")
        # stable sort: equal distances keep index order
        out[rows] = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return out
