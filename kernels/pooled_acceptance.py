"""Pooled acceptance over latent neighbours (LANTERN / LANTERN++ / MuLo-SD): Triton kernel + torch reference.

Papers: LANTERN (ICLR 2025), LANTERN++ (2025), MuLo-SD (CVPR 2026); see
:mod:`mmspec.verify.latent_neighbour` and :mod:`mmspec.verify.pooled_threshold` for the rules.

Glossary (per drafted position (b, i) with drafted token x):
    nbr        neighbours[x, :K]: x's K nearest codebook entries, nearest first
    cum_j      p(nbr_0) + ... + p(nbr_j), accumulated left to right in float64
    budget     "lantern": delta; "lantern++": (lam - 1) * p(x); the pooled set A(x) is the prefix with
               cum_j <= budget, empty when its mass is 0
    pooled     p(x) + mass(A(x)) (lantern modes) or p(x) + cum_{K-1} (threshold mode)
    accept     lantern modes: u * q(x) < pooled and q(x) > 0 (q(x) = 1 for deterministic drafts);
               threshold mode: pooled >= tau
Outputs: accepted bool [B, k], pooled float64 [B, k], n_pooled long [B, k] (|A(x)|, 0 in threshold mode).
The kernel walks the neighbours sequentially, like the reference, so both round identically.
"""

from __future__ import annotations

import torch

from .chain_verify import HAS_TRITON

MODES = ("lantern", "lantern++", "threshold")


def pooled_acceptance_torch(mode, draft_tokens, q_x, target_probs, neighbours, uniforms, param):
    """Reference. draft_tokens long [B, k], q_x float [B, k] | None, target_probs float [B, k, V],
    neighbours long [V, K], uniforms float [B, k]; param = delta | lam | tau by mode."""
    if mode not in MODES:
        raise ValueError(f"unknown pooled-acceptance mode {mode!r}; expected one of {MODES}")
    nbr = neighbours[draft_tokens]  # [B, k, K]
    p64 = target_probs.to(torch.float64)
    p_x = p64.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # [B, k]
    p_nbr = p64.gather(-1, nbr)  # [B, k, K]
    cum = torch.zeros_like(p_nbr)
    acc = torch.zeros_like(p_x)
    for j in range(p_nbr.shape[-1]):  # sequential, as in the kernel
        acc = acc + p_nbr[..., j]
        cum[..., j] = acc
    if mode == "threshold":
        pooled = p_x + (cum[..., -1] if cum.shape[-1] else torch.zeros_like(p_x))
        return pooled >= param, pooled, torch.zeros_like(draft_tokens)
    budget = param if mode == "lantern" else (param - 1.0) * p_x.unsqueeze(-1)
    in_a = cum <= budget
    n = in_a.sum(dim=-1)
    mass = torch.where(in_a, cum, torch.zeros_like(cum)).amax(dim=-1) if cum.shape[-1] else torch.zeros_like(p_x)
    n = torch.where(mass > 0, n, torch.zeros_like(n))
    pooled = p_x + mass
    q = torch.ones_like(p_x) if q_x is None else q_x.to(torch.float64)
    accepted = (uniforms.to(torch.float64) * q < pooled) & (q > 0)
    return accepted, pooled, n


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pooled_kernel(draft_ptr, qx_ptr, p_ptr, nbr_ptr, u_ptr, acc_out, pooled_out, n_out,
                       V, K, param, MODE: tl.constexpr, HAS_Q: tl.constexpr):
        pos = tl.program_id(0)  # flattened (b, i)
        x = tl.load(draft_ptr + pos)
        p_row = p_ptr + pos * V
        p_x = tl.load(p_row + x).to(tl.float64)
        acc = p_x * 0.0
        mass = p_x * 0.0
        n = x * 0
        for j in range(0, K):
            y = tl.load(nbr_ptr + x * K + j)
            acc = acc + tl.load(p_row + y).to(tl.float64)
            if MODE == 0:
                inside = acc <= param
            elif MODE == 1:
                inside = acc <= (param - 1.0) * p_x
            else:
                inside = acc < 0.0
            mass = tl.where(inside, acc, mass)
            n = n + inside.to(n.dtype)
        if MODE == 2:
            pooled = p_x + acc
            ok = pooled >= param
            n = n * 0
        else:
            n = tl.where(mass > 0.0, n, 0)
            pooled = p_x + mass
            u = tl.load(u_ptr + pos).to(tl.float64)
            if HAS_Q:
                q = tl.load(qx_ptr + pos).to(tl.float64)
            else:
                q = p_x * 0.0 + 1.0
            ok = (u * q < pooled) & (q > 0.0)
        tl.store(acc_out + pos, ok.to(tl.int8))
        tl.store(pooled_out + pos, pooled)
        tl.store(n_out + pos, n)


def pooled_acceptance_triton(mode, draft_tokens, q_x, target_probs, neighbours, uniforms, param):
    """Triton implementation; same signature and results as :func:`pooled_acceptance_torch`."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs the 'triton' extra: pip install 'mmspec[triton]'")
    if mode not in MODES:
        raise ValueError(f"unknown pooled-acceptance mode {mode!r}; expected one of {MODES}")
    B, k = draft_tokens.shape
    V, K = target_probs.shape[-1], neighbours.shape[1]
    dev = target_probs.device
    accepted = torch.empty((B, k), dtype=torch.int8, device=dev)
    pooled = torch.empty((B, k), dtype=torch.float64, device=dev)
    n = torch.empty((B, k), dtype=torch.long, device=dev)
    if B * k == 0:
        return accepted.bool(), pooled, n
    q = q_x.contiguous() if q_x is not None else uniforms
    _pooled_kernel[(B * k,)](
        draft_tokens.contiguous(), q, target_probs.contiguous(), neighbours.contiguous(), uniforms.contiguous(),
        accepted, pooled, n, V, K, float(param), MODE=MODES.index(mode), HAS_Q=q_x is not None,
    )
    return accepted.bool(), pooled, n
