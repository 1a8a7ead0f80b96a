"""Fused chain verification (greedy and exact rejection sampling): Triton kernel + torch reference.

Paper: Leviathan et al. (ICML 2023), Chen et al. (2023). Same contract as
:func:`mmspec.verify.chain.verify_chain_probs` for the two fused rules.

Glossary:
    mode        "greedy": accept x iff x == argmax target_i (first index on ties); sampled token
                is argmax target_n. "exact": accept iff u * q(x) < p(x) and q(x) > 0 (q = 1 for a
                deterministic draft); recovered token from max(0, p - q) (p with x zeroed for a
                deterministic draft), falling back to p if that residual is all zero.
    target      float32 [B, k+1, V]: processed probabilities (exact) or scores (greedy)
    noise       float32 [B, V]: Exp(1) noise; the sampled token is argmax(weights / noise)
    n           number of accepted drafts of a row; tokens[n] is the recovered/bonus token

The kernel runs one program per row, walks the k positions without host synchronisation and
scans the vocabulary in blocks; given the same uniforms and noise it returns exactly what the
reference returns (tested under ``TRITON_INTERPRET=1``).

Input contract (checked by both backends before any work, :func:`check_draft_tokens`): drafted ids
in the real columns (``col < num_draft``) lie in ``[0, V)``, else :class:`~mmspec.errors.TokenIdError`;
``0 <= num_draft <= k``. Ids in padding columns (``col >= num_draft``) are never read as token ids:
any value there, -1 or >= V included, gives the result a valid id would give. The check is the
only host synchronisation of a call.
"""

from __future__ import annotations

import torch

from mmspec.errors import InvalidDraftLengthError, TokenIdError

PLACEHOLDER = -1  # mirrors mmspec.verify.types.PLACEHOLDER_TOKEN_ID


def check_draft_tokens(draft_tokens: torch.Tensor, num_draft: torch.Tensor, vocab: int) -> torch.Tensor:
    """Raise a named error for an out-of-vocabulary id among the real drafts or a bad ``num_draft``;
    return the drafts with padding columns set to id 0 (safe to gather by, never emitted)."""
    batch, k = draft_tokens.shape
    real = torch.arange(k, device=draft_tokens.device) < num_draft.unsqueeze(1)  # [B, k]
    bad_ids = real & ((draft_tokens < 0) | (draft_tokens >= vocab))
    bad_nd = (num_draft < 0) | (num_draft > k)
    any_bad_nd, any_bad_ids = torch.stack([bad_nd.any(), bad_ids.any()]).tolist()  # one host sync
    if any_bad_nd:
        row = int(bad_nd.nonzero()[0, 0])
        raise InvalidDraftLengthError(
            f"num_draft must be in [0, k] = [0, {k}] per row, got {int(num_draft[row])} in row {row}")
    if any_bad_ids:
        row, col = bad_ids.nonzero()[0].tolist()
        raise TokenIdError(
            f"drafted token id {int(draft_tokens[row, col])} (row {row}, column {col}, inside num_draft = "
            f"{int(num_draft[row])}) is outside the vocabulary [0, {vocab})")
    return torch.where(real, draft_tokens, torch.zeros_like(draft_tokens))


def chain_verify_torch(
    mode: str,
    draft_tokens: torch.Tensor,  # long [B, k]
    num_draft: torch.Tensor,  # long [B]
    draft_probs: torch.Tensor | None,  # float32 [B, k, V] | None
    target: torch.Tensor,  # float32 [B, k+1, V]
    uniforms: torch.Tensor,  # float32 [B, k]
    noise: torch.Tensor,  # float32 [B, V]
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference. Returns (tokens long [B, k+1], num_accepted long [B])."""
    if mode not in ("greedy", "exact"):
        raise ValueError(f"unknown chain-verify mode {mode!r}; expected 'greedy' or 'exact'")
    batch, k = draft_tokens.shape
    draft_tokens = check_draft_tokens(draft_tokens, num_draft, target.shape[-1])
    rows = torch.arange(batch, device=target.device)
    x = draft_tokens.unsqueeze(-1)  # [B, k, 1]
    if mode == "greedy":
        ok = draft_tokens == target[:, :k].argmax(dim=-1)
    elif mode == "exact":
        p_x = target[:, :k].gather(-1, x).squeeze(-1)
        q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(-1, x).squeeze(-1)
        ok = (uniforms * q_x < p_x) & (q_x > 0)
    ok = ok & (torch.arange(k, device=target.device) < num_draft.unsqueeze(1))
    n = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    p_n = target[rows, n]  # [B, V]
    if mode == "greedy":
        final = p_n.argmax(dim=-1)
    else:
        nc = n.clamp_max(max(k - 1, 0))
        if k == 0:
            res = p_n
        elif draft_probs is None:
            res = p_n.scatter(-1, draft_tokens[rows, nc].unsqueeze(-1), 0.0)
        else:
            res = (p_n - draft_probs[rows, nc]).clamp_min(0.0)
        use_res = (n < num_draft) & (res.amax(dim=-1) > 0)
        weights = torch.where(use_res.unsqueeze(1), res, p_n)
        final = (weights / noise).argmax(dim=-1)
    cols = torch.arange(k + 1, device=target.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), PLACEHOLDER)], dim=1)
    tokens = torch.where(cols < n.unsqueeze(1), padded, torch.full_like(padded, PLACEHOLDER))
    tokens = torch.where(cols == n.unsqueeze(1), final.unsqueeze(1), tokens)
    return tokens, n


try:  # Triton is an optional extra
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without the extra
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _chain_verify_kernel(
        draft_ptr, num_draft_ptr, q_ptr, target_ptr, u_ptr, noise_ptr, out_tokens_ptr, out_n_ptr,
        K, V,
        GREEDY: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        nd = tl.load(num_draft_ptr + row)
        n = nd * 0  # accepted so far (same dtype as num_draft)
        alive = nd * 0 + 1  # 1 while every previous position was accepted
        offs = tl.arange(0, BLOCK_V)
        for i in range(0, K):
            x = tl.load(draft_ptr + row * K + i)
            t_row = target_ptr + (row * (K + 1) + i) * V
            if GREEDY:
                best_v = tl.full((), -float("inf"), tl.float32)
                best_i = x * 0
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    vals = tl.load(t_row + idx, mask=idx < V, other=-float("inf"))
                    bv = tl.max(vals, axis=0)
                    bi = tl.min(tl.where(vals == bv, idx, V), axis=0)
                    take = bv > best_v
                    best_i = tl.where(take, bi, best_i)
                    best_v = tl.where(take, bv, best_v)
                ok = x == best_i
            else:
                # a padding column (i >= nd) may hold any id: never read outside this row
                x_ok = (i < nd) & (x >= 0) & (x < V)
                p_x = tl.load(t_row + x, mask=x_ok, other=0.0)
                if HAS_Q:
                    q_x = tl.load(q_ptr + (row * K + i) * V + x, mask=x_ok, other=0.0)
                else:
                    q_x = tl.where(x_ok, 1.0, 0.0)
                u = tl.load(u_ptr + row * K + i)
                ok = (u * q_x < p_x) & (q_x > 0.0)
            ok = ok & (i < nd)
            alive = alive * ok.to(alive.dtype)
            n = n + alive
            tl.store(out_tokens_ptr + row * (K + 1) + i, tl.where(alive > 0, x, -1))
        tl.store(out_tokens_ptr + row * (K + 1) + K, -1)
        # draw the recovered / bonus token at position n
        t_row = target_ptr + (row * (K + 1) + n) * V
        nc = tl.minimum(n, tl.maximum(K - 1, 0))
        rejected = n < nd
        best_r = tl.full((), -float("inf"), tl.float32)
        best_ri = n * 0
        best_p = best_r
        best_pi = best_ri
        res_max = tl.full((), 0.0, tl.float32)
        if not GREEDY:
            xr = tl.load(draft_ptr + row * K + nc)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            m = idx < V
            p = tl.load(t_row + idx, mask=m, other=0.0)
            if GREEDY:
                w_p = tl.where(m, p, -float("inf"))
            else:
                e = tl.load(noise_ptr + row * V + idx, mask=m, other=1.0)
                if HAS_Q:
                    q = tl.load(q_ptr + (row * K + nc) * V + idx, mask=m, other=0.0)
                    r = tl.maximum(p - q, 0.0)
                else:
                    r = tl.where(idx == xr, 0.0, p)
                res_max = tl.maximum(res_max, tl.max(tl.where(m, r, 0.0), axis=0))
                w_r = tl.where(m, r / e, -float("inf"))
                bv = tl.max(w_r, axis=0)
                bi = tl.min(tl.where(w_r == bv, idx, V), axis=0)
                take = bv > best_r
                best_ri = tl.where(take, bi, best_ri)
                best_r = tl.where(take, bv, best_r)
                w_p = tl.where(m, p / e, -float("inf"))
            bv = tl.max(w_p, axis=0)
            bi = tl.min(tl.where(w_p == bv, idx, V), axis=0)
            take = bv > best_p
            best_pi = tl.where(take, bi, best_pi)
            best_p = tl.where(take, bv, best_p)
        if GREEDY:
            final = best_pi
        else:
            final = tl.where(rejected & (res_max > 0.0), best_ri, best_pi)
        tl.store(out_tokens_ptr + row * (K + 1) + n, final)
        tl.store(out_n_ptr + row, n)


def chain_verify_triton(
    mode: str,
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    *,
    block_v: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation; same signature and results as :func:`chain_verify_torch`."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs the 'triton' extra: pip install 'mmspec[triton]'")
    if mode not in ("greedy", "exact"):
        raise ValueError(f"unknown chain-verify mode {mode!r}; expected 'greedy' or 'exact'")
    batch, k = draft_tokens.shape
    vocab = target.shape[-1]
    num_draft = num_draft.to(torch.long).contiguous()
    check_draft_tokens(draft_tokens, num_draft, vocab)  # padding ids are masked in the kernel itself
    draft_tokens = draft_tokens.contiguous()
    target = target.contiguous()
    tokens = torch.empty((batch, k + 1), dtype=torch.long, device=target.device)
    n = torch.empty((batch,), dtype=torch.long, device=target.device)
    has_q = draft_probs is not None and k > 0
    q = draft_probs.contiguous() if has_q else target  # dummy pointer when absent
    # with k == 0 the kernel still reads one draft slot (row * 0 + 0): give it a sentinel
    draft_arg = draft_tokens if k > 0 else torch.full((1,), PLACEHOLDER, dtype=torch.long, device=target.device)
    block = min(block_v, triton.next_power_of_2(max(vocab, 16)))
    _chain_verify_kernel[(batch,)](
        draft_arg, num_draft, q, target, uniforms.contiguous(), noise.contiguous(), tokens, n,
        k, vocab,
        GREEDY=(mode == "greedy"), HAS_Q=has_q, BLOCK_V=block,
    )
    return tokens, n
