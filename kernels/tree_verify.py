"""Fused draft-tree verification (greedy and three recursive rejection rules): Triton kernel + torch reference.

Papers: Miao et al., SpecInfer (ASPLOS 2024); Jeon et al., Recursive Speculative Decoding (2024);
Chen et al., Sequoia (2024). Same contract as :func:`mmspec.verify.tree.verify_tree_probs` for the
rules of :mod:`mmspec.verify.tree_rules`; see :mod:`mmspec.verify.tree` for the tree layout.

Glossary:
    mode        "greedy": accept the child equal to argmax target at the current node (first index on
                ties), emit that argmax. "iid", "without_replacement", "deterministic": accept sibling
                x iff u * q_j(x) < p_j(x) and q_j(x) > 0; on rejection p_{j+1} = max(p_j - q_j, 0)
                (unnormalised, with its float32 mass = float64 sum cast once). q_j is q (iid); q with
                the rejected siblings' tokens zeroed, divided by its mass once any sibling was
                rejected (without_replacement); one-hot at x (deterministic, or no draft_probs)
    current     the node the walk stands at (-1 = the root); a node is tried when it is real
                (index < num_draft) and its parent is the current node
    fresh       1 while no sibling of the current node was rejected: p_j is the target row itself
                (mass 1); else p_j = resid / mass with ``resid`` a per-row float32 scratch row
    stamp       without_replacement marks a rejected token t with tried[t] = current + 2 (a per-row
                int32 scratch row, zero-initialised), so no row needs clearing when the walk descends
    empty       a residual of mass 0 falls back to the target at the current node (fresh again)
    emit        greedy: the argmax; otherwise argmax(w / noise) over w = p_j's unnormalised weights
                (the target row when fresh), first index on ties
    outputs     tokens long [B, D+1], accepted_nodes long [B, D] (-1 padded), num_accepted long [B]

The kernel runs one program per row, visits the N nodes in index order without host
synchronisation and scans the vocabulary in blocks. It never reads outside its row: a padding node
is never tried (only its parent entry is read, under a mask), and every id it gathers by is clamped
into [0, V). Divisions are correctly rounded (``div_rn``) and masses are float64 sums, so given the same
uniforms and noise it returns exactly what the reference returns (tested under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .chain_verify import HAS_TRITON

PLACEHOLDER = -1  # mirrors mmspec.verify.types.PLACEHOLDER_TOKEN_ID
ROOT = -1  # mirrors mmspec.verify.tree.ROOT_PARENT
#: kernel branch per mode name
MODES = {"greedy": 0, "iid": 1, "without_replacement": 2, "deterministic": 3}


def resolve_mode(mode: str, draft_probs: torch.Tensor | None) -> str:
    """The branch that runs: sampled children without draft probabilities are deterministic."""
    if mode not in MODES:
        raise ValueError(f"unknown tree-verify mode {mode!r}; expected one of {tuple(MODES)}")
    if mode in ("iid", "without_replacement") and draft_probs is None:
        return "deterministic"
    return mode


def _sum_mass(weights: torch.Tensor) -> torch.Tensor:
    """float32 [B]: float64 sum of weights [B, V], cast once."""
    return weights.sum(dim=-1, dtype=torch.float64).to(torch.float32)


def tree_verify_greedy_torch(
    draft_tokens: torch.Tensor,  # long [B, N]
    parents: torch.Tensor,  # long [B, N]
    num_draft: torch.Tensor,  # long [B]
    target: torch.Tensor,  # float [B, N+1, V]
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy walk without a per-node loop (same results as walking the nodes in order).

    A real node is accepted when its token is the argmax after its parent (first index on ties), no
    earlier real sibling is, and its parent was accepted (or is the root): one argmax over all rows of
    ``target``, one [B, N, N] sibling comparison and D rounds of propagation down the tree."""
    batch, n = draft_tokens.shape
    device = target.device
    num_draft = num_draft.clamp(0, n)
    best = target.argmax(dim=-1)  # [B, N+1]: argmax after the root (column 0) and after each node
    idx = torch.arange(n, device=device)
    real = idx < num_draft.unsqueeze(1)  # [B, N]
    par = torch.where(real, parents, torch.full_like(parents, ROOT)).clamp(min=ROOT)  # [B, N]
    match = real & (draft_tokens == best.gather(1, par + 1))  # [B, N]
    same_parent = par.unsqueeze(2) == par.unsqueeze(1)  # [B, N(i), N(j)]
    earlier = idx.unsqueeze(1) > idx.unsqueeze(0)  # j < i
    shadowed = (same_parent & earlier & match.unsqueeze(1)).any(dim=2)  # an earlier sibling matches
    ok = match & ~shadowed
    on_path = ok & (par == ROOT)
    for _ in range(max_depth):
        on_path = ok & ((par == ROOT) | on_path.gather(1, par.clamp_min(0)))
    depth = torch.zeros((batch, n), dtype=torch.long, device=device)  # depth of on-path nodes (1-based)
    for _ in range(max_depth):
        depth = torch.where(on_path, 1 + torch.where(par >= 0, depth.gather(1, par.clamp_min(0)), 0), 0)
    num_accepted = on_path.long().sum(dim=1)  # [B]
    slots = torch.arange(max_depth, device=device)
    nodes = torch.full((batch, max_depth), PLACEHOLDER, dtype=torch.long, device=device)
    if n and max_depth:
        at = on_path.unsqueeze(1) & (depth.unsqueeze(1) == slots.view(1, -1, 1) + 1)  # [B, D, N]
        nodes = torch.where(at.any(dim=2), at.long().argmax(dim=2), nodes)
    tokens = torch.full((batch, max_depth + 1), PLACEHOLDER, dtype=torch.long, device=device)
    tokens[:, :max_depth] = torch.where(nodes >= 0, draft_tokens.gather(1, nodes.clamp_min(0)), tokens[:, :max_depth])
    last = torch.where(num_accepted > 0, nodes.gather(1, (num_accepted - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
                       if max_depth else torch.full_like(num_accepted, ROOT), torch.full_like(num_accepted, ROOT))
    final = best.gather(1, (last + 1).unsqueeze(1)).squeeze(1)
    tokens = tokens.scatter(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    return tokens, nodes, num_accepted


def tree_verify_torch(
    mode: str,
    draft_tokens: torch.Tensor,  # long [B, N]
    parents: torch.Tensor,  # long [B, N]
    num_draft: torch.Tensor,  # long [B]
    draft_probs: torch.Tensor | None,  # float [B, N, V] | None
    target: torch.Tensor,  # float [B, N+1, V]
    uniforms: torch.Tensor,  # float [B, N]
    noise: torch.Tensor,  # float [B, V]
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference. Returns (tokens long [B, D+1], accepted_nodes long [B, D], num_accepted long [B])."""
    mode = resolve_mode(mode, draft_probs)
    if mode == "greedy":
        return tree_verify_greedy_torch(draft_tokens, parents, num_draft, target, max_depth)
    batch, n = draft_tokens.shape
    vocab = target.shape[-1]
    device = target.device
    target = target.to(torch.float32)
    uniforms, noise = uniforms.to(torch.float32), noise.to(torch.float32)
    q_all = draft_probs.to(torch.float32) if mode in ("iid", "without_replacement") else None
    rows = torch.arange(batch, device=device)
    vcols = torch.arange(vocab, device=device)
    num_draft = num_draft.clamp(0, n)
    cur = torch.full((batch,), ROOT, dtype=torch.long, device=device)
    depth = torch.zeros(batch, dtype=torch.long, device=device)
    fresh = torch.ones(batch, dtype=torch.bool, device=device)
    mass = torch.ones(batch, dtype=torch.float32, device=device)
    resid = torch.zeros((batch, vocab), dtype=torch.float32, device=device)
    tried = torch.zeros((batch, vocab), dtype=torch.long, device=device)  # stamps
    n_tried = torch.zeros(batch, dtype=torch.long, device=device)
    nodes = torch.full((batch, max_depth), PLACEHOLDER, dtype=torch.long, device=device)
    tokens = torch.full((batch, max_depth + 1), PLACEHOLDER, dtype=torch.long, device=device)
    slots = torch.arange(max_depth + 1, device=device)
    best = target[:, 0].argmax(dim=-1)  # [B] greedy: argmax at the current node
    for i in range(n):
        live = (i < num_draft) & (parents[:, i] == cur)  # [B]
        x = draft_tokens[:, i].clamp(0, vocab - 1)
        t_cur = target[rows, cur + 1]  # [B, V]
        p_w = torch.where(fresh.unsqueeze(1), t_cur, resid)  # unnormalised p_j
        if mode == "greedy":
            ok = x == best
        else:
            stamp = (cur + 2).unsqueeze(1)
            if mode == "iid":
                q_j = q_all[:, i]
            elif mode == "deterministic":
                q_j = (vcols == x.unsqueeze(1)).to(torch.float32)
            else:
                kept = torch.where(tried == stamp, 0.0, q_all[:, i])
                zq = torch.where(n_tried > 0, _sum_mass(kept), 1.0)
                q_j = torch.where((zq > 0).unsqueeze(1), kept / torch.where(zq > 0, zq, 1.0).unsqueeze(1), 0.0)
            q_x = q_j[rows, x]
            p_x = p_w[rows, x] / mass
            ok = (uniforms[:, i] * q_x < p_x) & (q_x > 0)
        accept = live & ok
        miss = live & ~ok
        if mode != "greedy":
            r = (p_w / mass.unsqueeze(1) - q_j).clamp_min(0.0)
            new_mass = _sum_mass(r)
            resid = torch.where(miss.unsqueeze(1), r, resid)
            fresh = torch.where(miss, new_mass <= 0, fresh)
            mass = torch.where(miss, torch.where(new_mass > 0, new_mass, 1.0), mass)
            if mode == "without_replacement":
                mark = miss.unsqueeze(1) & (vcols == x.unsqueeze(1))
                tried = torch.where(mark, stamp, tried)
                n_tried = n_tried + miss.long()
        here = accept.unsqueeze(1) & (slots == depth.unsqueeze(1))  # [B, D+1]
        tokens = torch.where(here, x.unsqueeze(1), tokens)
        nodes = torch.where(here[:, :max_depth], i, nodes)
        depth = depth + accept.long()
        cur = torch.where(accept, i, cur)
        fresh = fresh | accept
        mass = torch.where(accept, 1.0, mass)
        n_tried = torch.where(accept, 0, n_tried)
        if mode == "greedy":
            best = torch.where(accept, target[:, i + 1].argmax(dim=-1), best)
    if mode == "greedy":
        final = best
    else:
        w = torch.where(fresh.unsqueeze(1), target[rows, cur + 1], resid)
        final = (w / noise).argmax(dim=-1)
    tokens = tokens.scatter(1, depth.unsqueeze(1), final.unsqueeze(1))
    return tokens, nodes, depth


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _first_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
        """Index of the first maximum of row_ptr[0:V]."""
        offs = tl.arange(0, BLOCK_V)
        best_v = tl.full((), -float("inf"), tl.float32)
        best_i = tl.full((), 0, tl.int64)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            vals = tl.load(row_ptr + idx, mask=idx < V, other=-float("inf"))
            bv = tl.max(vals, axis=0)
            bi = tl.min(tl.where(vals == bv, idx, V), axis=0).to(tl.int64)
            take = bv > best_v
            best_i = tl.where(take, bi, best_i)
            best_v = tl.where(take, bv, best_v)
        return best_i

    @triton.jit
    def _load_p(t_row, r_row, fresh, idx, V):
        """Unnormalised p_j at idx < V: the target row while fresh (int32 0/1), else the residual
        scratch row; only the row in use is read."""
        lim = V * fresh
        pt = tl.load(t_row + idx, mask=idx < lim, other=0.0)
        pr = tl.load(r_row + idx, mask=idx < V - lim, other=0.0)
        return tl.where(fresh != 0, pt, pr)

    @triton.jit
    def _sibling_q(q_row, tried_row, stamp, zq, xc, idx, m, MODE: tl.constexpr):
        """q_j at idx (MODE 1 iid, 2 without replacement, 3 deterministic)."""
        if MODE == 3:
            q = (idx == xc).to(tl.float32)
        else:
            q = tl.load(q_row + idx, mask=m, other=0.0)
            if MODE == 2:
                st = tl.load(tried_row + idx, mask=m, other=0)
                kept = tl.where(st == stamp, 0.0, q)
                q = tl.where(zq > 0.0, tl.math.div_rn(kept, tl.where(zq > 0.0, zq, 1.0)), 0.0)
        return q

    @triton.jit
    def _tree_verify_kernel(
        draft_ptr, parents_ptr, num_draft_ptr, q_ptr, target_ptr, u_ptr, noise_ptr,
        resid_ptr, tried_ptr, out_tokens_ptr, out_nodes_ptr, out_n_ptr,
        N, V, D,
        MODE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        nd = tl.load(num_draft_ptr + row)
        nd = tl.minimum(tl.maximum(nd, 0), N)
        offs = tl.arange(0, BLOCK_V)
        t_base = target_ptr + row * (N + 1) * V
        r_row = resid_ptr + row * V
        tried_row = tried_ptr + row * V
        zero = nd * 0  # int64 zero
        cur = zero - 1
        n = zero
        fresh = tl.full((), 1, tl.int32)
        mass = tl.full((), 1.0, tl.float32)
        n_tried = tl.full((), 0, tl.int32)
        if MODE == 0:
            best = _first_argmax(t_base, V, BLOCK_V)
        else:
            best = zero
        for i in range(0, N):
            real = i < nd
            par = tl.load(parents_ptr + row * N + i, mask=real, other=-2)
            if real & (par == cur):
                x = tl.load(draft_ptr + row * N + i)
                xc = tl.minimum(tl.maximum(x, 0), V - 1)
                t_row = t_base + (cur + 1) * V
                q_row = q_ptr + (row * N + i) * V
                stamp = (cur + 2).to(tl.int32)
                zq = tl.full((), 1.0, tl.float32)
                if MODE == 0:
                    ok = xc == best
                else:
                    if MODE == 2:
                        if n_tried > 0:
                            acc = tl.full((), 0.0, tl.float64)
                            for start in range(0, V, BLOCK_V):
                                idx = start + offs
                                m = idx < V
                                q = tl.load(q_row + idx, mask=m, other=0.0)
                                st = tl.load(tried_row + idx, mask=m, other=0)
                                acc += tl.sum(tl.where(st == stamp, 0.0, q).to(tl.float64), axis=0)
                            zq = acc.to(tl.float32)
                    if MODE == 3:
                        q_x = tl.full((), 1.0, tl.float32)
                    else:
                        q_x = tl.load(q_row + xc)
                        if MODE == 2:
                            st_x = tl.load(tried_row + xc)
                            kept_x = tl.where(st_x == stamp, 0.0, q_x)
                            q_x = tl.where(zq > 0.0, tl.math.div_rn(kept_x, tl.where(zq > 0.0, zq, 1.0)), 0.0)
                    pt_x = tl.load(t_row + xc)
                    pr_x = tl.load(r_row + xc)
                    p_x = tl.math.div_rn(tl.where(fresh != 0, pt_x, pr_x), mass)
                    u = tl.load(u_ptr + row * N + i)
                    ok = (u * q_x < p_x) & (q_x > 0.0)
                if ok:
                    tl.store(out_tokens_ptr + row * (D + 1) + n, xc, mask=n < D)
                    tl.store(out_nodes_ptr + row * D + n, zero + i, mask=n < D)
                    n = n + 1
                    cur = zero + i
                    fresh = tl.full((), 1, tl.int32)
                    mass = tl.full((), 1.0, tl.float32)
                    n_tried = tl.full((), 0, tl.int32)
                    if MODE == 0:
                        best = _first_argmax(t_base + (zero + i + 1) * V, V, BLOCK_V)
                else:
                    if MODE != 0:
                        acc = tl.full((), 0.0, tl.float64)
                        for start in range(0, V, BLOCK_V):
                            idx = start + offs
                            m = idx < V
                            p = tl.math.div_rn(_load_p(t_row, r_row, fresh, idx, V), mass)
                            q = _sibling_q(q_row, tried_row, stamp, zq, xc, idx, m, MODE)
                            r = tl.where(m, tl.maximum(p - q, 0.0), 0.0)
                            tl.store(r_row + idx, r, mask=m)
                            acc += tl.sum(r.to(tl.float64), axis=0)
                        new_mass = acc.to(tl.float32)
                        fresh = (new_mass <= 0.0).to(tl.int32)
                        mass = tl.where(new_mass > 0.0, new_mass, 1.0)
                        if MODE == 2:
                            tl.store(tried_row + xc, stamp)
                            n_tried = n_tried + 1
        if MODE == 0:
            final = best
        else:
            t_row = t_base + (cur + 1) * V
            noise_row = noise_ptr + row * V
            best_v = tl.full((), -float("inf"), tl.float32)
            final = zero
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                m = idx < V
                w = _load_p(t_row, r_row, fresh, idx, V)
                e = tl.load(noise_row + idx, mask=m, other=1.0)
                s = tl.where(m, tl.math.div_rn(w, e), -float("inf"))
                bv = tl.max(s, axis=0)
                bi = tl.min(tl.where(s == bv, idx, V), axis=0).to(tl.int64)
                take = bv > best_v
                final = tl.where(take, bi, final)
                best_v = tl.where(take, bv, best_v)
        tl.store(out_tokens_ptr + row * (D + 1) + n, final, mask=n <= D)
        tl.store(out_n_ptr + row, n)


def tree_verify_triton(
    mode: str,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    max_depth: int,
    *,
    block_v: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation; same signature and results as :func:`tree_verify_torch`."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs the 'triton' extra: pip install 'mmspec[triton]'")
    mode = resolve_mode(mode, draft_probs)
    batch, n = draft_tokens.shape
    vocab = target.shape[-1]
    device = target.device
    tokens = torch.full((batch, max_depth + 1), PLACEHOLDER, dtype=torch.long, device=device)
    nodes = torch.full((batch, max(max_depth, 1)), PLACEHOLDER, dtype=torch.long, device=device)
    depth = torch.zeros((batch,), dtype=torch.long, device=device)
    if batch == 0:
        return tokens, nodes[:, :max_depth], depth
    sampled = mode != "greedy"
    target = target.to(torch.float32).contiguous()
    # with N == 0 the kernel reads no node, but its pointers still need storage
    keep = (lambda t: t.contiguous()) if n > 0 else (lambda t: torch.full((1,), PLACEHOLDER, dtype=t.dtype, device=device))
    has_q = mode in ("iid", "without_replacement")
    q = draft_probs.to(torch.float32).contiguous() if has_q else target  # dummy pointer when unused
    resid = torch.empty((batch, vocab) if sampled else (1,), dtype=torch.float32, device=device)
    tried = torch.zeros((batch, vocab) if mode == "without_replacement" else (1,), dtype=torch.int32, device=device)
    block = min(block_v, triton.next_power_of_2(max(vocab, 16)))
    _tree_verify_kernel[(batch,)](
        keep(draft_tokens), keep(parents), num_draft.to(torch.long).contiguous(), q, target,
        keep(uniforms.to(torch.float32)), noise.to(torch.float32).contiguous(), resid, tried, tokens, nodes, depth,
        n, vocab, max_depth,
        MODE=MODES[mode], BLOCK_V=block,
    )
    return tokens, nodes[:, :max_depth], depth
