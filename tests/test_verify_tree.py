"""Draft-tree verification: table cases, invariants, a literal per-row oracle and statistical tests.

Oracles: hand-computed trees; a plain-Python walk of one row at a time (float64, explicit children
lists); the chain verifier on chains (parents = i - 1); and the target distribution itself
(chi-square on the first two emitted tokens with 1e5 draws per rule)."""

import pytest
import torch
from stat_helpers import chisquare_pvalue

from mmspec import SamplingParams
from mmspec.errors import NonFiniteError, ShapeError, TokenIdError
from mmspec.verify import (PLACEHOLDER_TOKEN_ID, ROOT_PARENT, DeterministicTreeRule, ExactRule, GreedyRule,
                           GreedyTreeRule, SpecInferTreeRule, WithoutReplacementTreeRule, compute_depths, verify_chain,
                           verify_chain_probs, verify_tree, verify_tree_probs)

N_DRAWS = 100_000
BACKENDS = ["generic", "torch"]
RULES = {
    "greedy": GreedyTreeRule(),
    "iid": SpecInferTreeRule(),
    "without_replacement": WithoutReplacementTreeRule(),
    "deterministic": DeterministicTreeRule(),
}


def one_row(tokens, parents, probs=None, nd=None):
    """Batch of one row: long [1, N], long [1, N], float [1, N, V] | None, long [1]."""
    t = torch.tensor([tokens])
    p = torch.tensor([parents])
    q = None if probs is None else torch.tensor([probs], dtype=torch.float32)
    return t, p, q, (None if nd is None else torch.tensor([nd]))


# ---- tier 1: hand-computed trees ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_table(backend):
    # root children 3 (node 0) and 1 (node 1); node 1's children 0 (node 2) and 2 (node 3); node 0's child 2
    scores = torch.tensor([[[0.0, 5.0, 1.0, 5.0],  # root: tie 1/3 -> first index 1
                            [9.0, 0.0, 0.0, 0.0],  # after node 0
                            [0.0, 0.0, 3.0, 1.0],  # after node 1: argmax 2 -> node 3
                            [0.0, 0.0, 0.0, 0.0],  # after node 2
                            [0.0, 1.0, 0.0, 7.0],  # after node 3: bonus 3
                            [0.0, 0.0, 0.0, 0.0]]])  # after node 4
    x, par, _, _ = one_row([3, 1, 0, 2, 2], [-1, -1, 1, 1, 0])
    res = verify_tree_probs(x, par, None, scores, GreedyTreeRule(), torch.zeros(1, 5), torch.ones(1, 4),
                            backend=backend)
    assert res.num_accepted.tolist() == [2]
    assert res.accepted_nodes.tolist() == [[1, 3]]
    assert res.tokens.tolist() == [[1, 2, 3]]
    # node 3 is padding: the walk stops at node 1 and emits argmax there (2), padding ids are ignored
    x2 = x.clone(); x2[0, 3:] = torch.tensor([-1, 99])
    res = verify_tree_probs(x2, par, None, scores, GreedyTreeRule(), torch.zeros(1, 5), torch.ones(1, 4),
                            torch.tensor([3]), backend=backend)
    assert res.tokens.tolist() == [[1, 2, -1]] and res.accepted_nodes.tolist() == [[1, -1]]
    assert res.num_accepted.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_iid_table(backend):
    """SpecInfer: a rejected sibling replaces p by norm(max(p - q, 0)) before the next one is tried."""
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]])  # root, node 0, node 1
    q = [[0.6, 0.2, 0.2]] * 2  # both root children drawn from q
    x, par, qq, _ = one_row([0, 2], [-1, -1], q)
    # node 0: p/q = 1 -> always accepted; then node 0 has no children: bonus from p[1] (unit noise: 2)
    res = verify_tree_probs(x, par, qq, p, SpecInferTreeRule(), torch.tensor([[0.99, 0.0]]), torch.ones(1, 3),
                            backend=backend)
    assert res.tokens.tolist() == [[0, 2]] and res.accepted_nodes.tolist() == [[0]]
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]])
    # node 0 (token 0): u * 0.6 = 0.54 >= 0.5 rejects; residual (0, 0.1, 0) -> (0, 1, 0).
    # node 1 (token 2): p_1(2) = 0 rejects (the stale p would accept: 0 * 0.2 < 0.2); emit 1
    for u1 in (0.0, 0.5):
        res = verify_tree_probs(x, par, qq, p, SpecInferTreeRule(), torch.tensor([[0.9, u1]]),
                                torch.tensor([[1.0, 1.0, 1e-3]]), backend=backend)
        assert res.num_accepted.tolist() == [0] and res.tokens.tolist() == [[1, -1]]
    # u0 = 0.8: 0.48 < 0.5 accepts node 0
    res = verify_tree_probs(x, par, qq, p, SpecInferTreeRule(), torch.tensor([[0.8, 0.0]]), torch.ones(1, 3),
                            backend=backend)
    assert res.accepted_nodes.tolist() == [[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_replacement_table(backend):
    """q is renormalised without the rejected sibling's token: the same draws differ from i.i.d."""
    p = torch.tensor([[[0.1, 0.5, 0.4], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    x, par, qq, _ = one_row([0, 2], [-1, -1], [[0.6, 0.2, 0.2]] * 2)
    u = torch.tensor([[0.5, 0.9]])
    # node 0: 0.5 * 0.6 = 0.3 >= 0.1 rejects; residual (0, 0.3, 0.2) / 0.5 = (0, 0.6, 0.4).
    # node 1 (token 2): i.i.d. q(2) = 0.2 -> ratio 0.4 / 0.2 > 1 accepts; without replacement
    # q_1 = (0, 0.5, 0.5): 0.9 * 0.5 = 0.45 >= 0.4 rejects; residual (0, 0.1, 0) -> emit 1
    iid = verify_tree_probs(x, par, qq, p, SpecInferTreeRule(), u, torch.ones(1, 3), backend=backend)
    assert iid.accepted_nodes.tolist() == [[1]] and iid.tokens.tolist() == [[2, 2]]
    wor = verify_tree_probs(x, par, qq, p, WithoutReplacementTreeRule(), u, torch.ones(1, 3), backend=backend)
    assert wor.num_accepted.tolist() == [0] and wor.tokens.tolist() == [[1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_table_with_duplicates(backend):
    """q = 1: accept x with p(x); a rejected x is zeroed, so its duplicate is rejected even with u = 0."""
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    x, par, _, _ = one_row([0, 0, 1], [-1, -1, -1])
    res = verify_tree_probs(x, par, None, p, DeterministicTreeRule(), torch.tensor([[0.6, 0.0, 0.5]]),
                            torch.ones(1, 3), backend=backend)
    # node 0: 0.6 >= 0.5 rejects -> p = (0, 0.6, 0.4); node 1 (dup): p(0) = 0; node 2: 0.5 < 0.6 accepts
    assert res.accepted_nodes.tolist() == [[2]] and res.tokens.tolist() == [[1, 1]]
    # all rejected: the token comes from the residual (0, 0, 1) whatever the noise
    res = verify_tree_probs(x, par, None, p, DeterministicTreeRule(), torch.tensor([[0.6, 0.0, 0.9]]),
                            torch.tensor([[1e-6, 1e-6, 1.0]]), backend=backend)
    assert res.num_accepted.tolist() == [0] and res.tokens.tolist() == [[2, -1]]
    # SpecInfer without draft probabilities is the deterministic rule
    res2 = verify_tree_probs(x, par, None, p, SpecInferTreeRule(), torch.tensor([[0.6, 0.0, 0.9]]),
                             torch.tensor([[1e-6, 1e-6, 1.0]]), backend=backend)
    assert torch.equal(res.tokens, res2.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_no_real_nodes_emits_from_root(backend, rule):
    p = torch.tensor([[[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], [[0.8, 0.1, 0.1], [0.3, 0.3, 0.4]]])
    x, par = torch.tensor([[-1], [7]]), torch.tensor([[5], [-9]])  # padding: anything goes
    q = torch.full((2, 1, 3), float("nan"))
    res = verify_tree_probs(x, par, q, p, RULES[rule], torch.zeros(2, 1), torch.ones(2, 3), torch.tensor([0, 0]),
                            backend=backend)
    assert res.num_accepted.tolist() == [0, 0]
    assert res.tokens.tolist() == [[2], [0]] and res.accepted_nodes.shape == (2, 0)


def test_tree_depths():
    par = torch.tensor([[-1, -1, 0, 2, 1, 3], [-1, 0, 1, 2, 3, 4]])
    assert compute_depths(par, torch.tensor([6, 4])).tolist() == [[1, 1, 2, 3, 2, 4], [1, 2, 3, 4, 0, 0]]


def test_bad_input_raises():
    x = torch.zeros(2, 3, dtype=torch.long)
    par = torch.tensor([[-1, 0, 1]] * 2)
    logits = torch.zeros(2, 4, 5)
    with pytest.raises(ShapeError, match="topologically ordered"):
        verify_tree(x, torch.tensor([[-1, 2, 1]] * 2), None, logits)
    with pytest.raises(ShapeError, match="topologically ordered"):
        verify_tree(x, torch.tensor([[-1, -2, 1]] * 2), None, logits)
    with pytest.raises(ShapeError, match="parents must be a long tensor"):
        verify_tree(x, par[:, :2], None, logits)
    with pytest.raises(ShapeError, match="target_logits must be"):
        verify_tree(x, par, None, logits[:, :3])
    with pytest.raises(ShapeError, match="draft_probs must be"):
        verify_tree(x, par, torch.zeros(2, 3, 4), logits)
    with pytest.raises(ShapeError, match="draft_tokens must be a long"):
        verify_tree(x.float(), par, None, logits)
    with pytest.raises(ShapeError, match="num_draft must lie"):
        verify_tree(x, par, None, logits, num_draft=torch.tensor([4, 0]))
    with pytest.raises(ShapeError, match="uniforms must be"):
        verify_tree_probs(x, par, None, logits.softmax(-1), SpecInferTreeRule(), torch.zeros(2, 2), torch.ones(2, 5))
    # a padding node may have any parent
    verify_tree(x, torch.tensor([[-1, 0, 7]] * 2), None, logits, num_draft=torch.tensor([2, 2]))


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("bad", [-1, 5, 10**9])
def test_token_ids_checked_on_every_backend(backend, bad):
    x = torch.tensor([[0, 1, 2], [3, 4, 0]])
    par = torch.tensor([[-1, 0, 1], [-1, -1, 0]])
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    x_bad = x.clone(); x_bad[1, 2] = bad
    for rule in (GreedyTreeRule(), SpecInferTreeRule()):
        with pytest.raises(TokenIdError, match=r"\[0, 5\)"):
            verify_tree(x_bad, par, None, logits, rule, SamplingParams(1.0), backend=backend)
        # the same id in a padding node is ignored
        res = verify_tree(x_bad, par, None, logits, rule, SamplingParams(1.0), torch.Generator().manual_seed(1),
                          num_draft=torch.tensor([3, 2]), backend=backend)
        ok = verify_tree(x, par, None, logits, rule, SamplingParams(1.0), torch.Generator().manual_seed(1),
                         num_draft=torch.tensor([3, 2]), backend=backend)
        assert torch.equal(res.tokens, ok.tokens)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise(value):
    x = torch.tensor([[0, 1]])
    par = torch.tensor([[-1, 0]])
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = value
    with pytest.raises(NonFiniteError, match="NaN or \\+inf"):
        verify_tree(x, par, None, logits, sampling=SamplingParams(1.0))
    with pytest.raises(NonFiniteError):
        verify_tree_probs(x, par, None, logits, SpecInferTreeRule(), torch.zeros(1, 2), torch.ones(1, 4))
    # -inf (a filtered token) is fine, and so is a non-finite row after a padding node
    logits[0, 1, 2] = float("-inf")
    verify_tree(x, par, None, logits, sampling=SamplingParams(1.0))
    logits[0, 2, 0] = value
    verify_tree(x, par, None, logits, sampling=SamplingParams(1.0), num_draft=torch.tensor([1]))


# ---- tier 2: invariants, the per-row oracle, chains ----------------------------------------

def random_tree(gen, B, N, V, *, ragged=True):
    """Random topologically ordered trees with garbage in the padding nodes."""
    parents = torch.stack([torch.randint(-1, max(i, 0), (B,), generator=gen) if i > 0
                           else torch.full((B,), -1) for i in range(N)], dim=1) if N else torch.zeros(B, 0, dtype=torch.long)
    nd = torch.randint(0, N + 1, (B,), generator=gen) if ragged else torch.full((B,), N)
    # a few duplicate siblings: a small vocabulary makes them frequent
    x = torch.randint(0, V, (B, N), generator=gen)
    pad = torch.arange(N) >= nd[:, None]
    x = torch.where(pad, torch.randint(-3, V + 3, (B, N), generator=gen), x)
    parents = torch.where(pad, torch.randint(-5, N + 5, (B, N), generator=gen), parents)
    return x, parents, nd


def random_probs(gen, shape, zero_frac=0.3):
    p = torch.rand(*shape, generator=gen).pow(2)
    p[p < zero_frac] = 0.0  # tokens with zero mass
    p[..., 0] += 1e-3
    return p / p.sum(-1, keepdim=True)


def oracle_row(rule, x, par, q, p, u, e, nd):
    """Literal per-row walk (float64 Python lists); returns (path node list, final token)."""
    V = len(p[0])
    cur, path = -1, []
    while True:
        target = [float(v) for v in p[cur + 1]]
        children = [i for i in range(nd) if par[i] == cur]
        pj = list(target)  # normalised p_j
        tried = set()
        accepted = None
        for i in children:
            xi = x[i]
            if rule == "greedy":
                if xi == max(range(V), key=lambda t: (target[t], -t)):
                    accepted = i
                    break
                continue
            if rule == "deterministic" or q is None:
                qj = [1.0 if t == xi else 0.0 for t in range(V)]
            elif rule == "iid":
                qj = [float(v) for v in q[i]]
            else:
                kept = [0.0 if t in tried else float(q[i][t]) for t in range(V)]
                z = sum(kept)
                qj = [k / z if z > 0 else 0.0 for k in kept]
            if u[i] * qj[xi] < pj[xi] and qj[xi] > 0:
                accepted = i
                break
            r = [max(a - b, 0.0) for a, b in zip(pj, qj)]
            z = sum(r)
            pj = [v / z for v in r] if z > 0 else list(target)
            tried.add(xi)
        if accepted is None:
            if rule == "greedy":
                return path, max(range(V), key=lambda t: (target[t], -t))
            return path, max(range(V), key=lambda t: (pj[t] / e[t], -t))
        path.append(accepted)
        cur = accepted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("with_q", [True, False])
def test_matches_literal_oracle_and_invariants(backend, rule, with_q):
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        B, N, V = 24, int(torch.randint(0, 9, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen))
        x, par, nd = random_tree(gen, B, N, V)
        p = random_probs(gen, (B, N + 1, V))
        q = random_probs(gen, (B, N, V)) if with_q else None
        u = torch.rand(B, N, generator=gen)
        e = torch.empty(B, V).exponential_(generator=gen)
        res = verify_tree_probs(x, par, q, p, RULES[rule], u, e, nd, backend=backend)
        depth = compute_depths(par, nd)
        D = int(depth.max()) if N else 0
        assert res.tokens.shape == (B, D + 1) and res.accepted_nodes.shape == (B, D)
        for b in range(B):
            n = int(res.num_accepted[b])
            path, final = oracle_row(rule, x[b].tolist(), par[b].tolist(), None if q is None else q[b].tolist(),
                                     p[b].tolist(), u[b].tolist(), e[b].tolist(), int(nd[b]))
            assert res.accepted_nodes[b, :n].tolist() == path
            assert res.tokens[b].tolist() == [int(x[b, i]) for i in path] + [final] + [-1] * (D - n)
            assert res.accepted_nodes[b, n:].eq(PLACEHOLDER_TOKEN_ID).all()
            # the path runs from the root through real nodes, each the child of the previous one
            parent = ROOT_PARENT
            for i in path:
                assert i < nd[b] and par[b, i] == parent
                parent = i


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_and_padding_is_ignored(backend):
    gen = torch.Generator().manual_seed(11)
    B, N, V = 64, 9, 6
    x, par, nd = random_tree(gen, B, N, V)
    p = random_probs(gen, (B, N + 1, V))
    q = random_probs(gen, (B, N, V))
    u = torch.rand(B, N, generator=gen)
    e = torch.empty(B, V).exponential_(generator=gen)
    pad = torch.arange(N) >= nd[:, None]
    p2 = p.clone(); p2[:, 1:][pad] = float("nan")  # rows after padding nodes: never read
    q2 = q.clone(); q2[pad] = float("nan")
    u2 = torch.where(pad, 0.0, u)
    for rule in RULES.values():
        a = verify_tree_probs(x, par, q, p, rule, u, e, nd, backend=backend)
        b = verify_tree_probs(x, par, q2, p2, rule, u2, e, nd, backend=backend)
        ref = verify_tree_probs(x, par, q, p, rule, u, e, nd, backend="torch")
        for t1, t2, t3 in zip(a, b, ref):
            assert torch.equal(t1, t2) and torch.equal(t1, t3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["greedy", "exact", "exact-deterministic", "without-replacement"])
def test_chain_equals_verify_chain_probs(backend, case):
    """parents = i - 1: every lossless tree rule equals the chain rule on the same uniforms and noise."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        B, k, V = 32, int(torch.randint(0, 6, (1,), generator=gen)), int(torch.randint(2, 30, (1,), generator=gen))
        p = random_probs(gen, (B, k + 1, V))
        q = random_probs(gen, (B, k, V))
        x = torch.randint(0, V, (B, k), generator=gen)
        nd = torch.randint(0, k + 1, (B,), generator=gen)
        u = torch.rand(B, k, generator=gen)
        e = torch.empty(B, V).exponential_(generator=gen)
        par = torch.arange(k).expand(B, k) - 1
        chain_rule, tree_rule, qq = {
            "greedy": (GreedyRule(), GreedyTreeRule(), None),
            "exact": (ExactRule(), SpecInferTreeRule(), q),
            "exact-deterministic": (ExactRule(), DeterministicTreeRule(), None),
            "without-replacement": (ExactRule(), WithoutReplacementTreeRule(), q),
        }[case]
        noise = torch.ones_like(e) if case == "greedy" else e
        chain = verify_chain_probs(x, qq, p, chain_rule, u, noise, nd, backend="torch")
        tree = verify_tree_probs(x, par, qq, p, tree_rule, u, noise, nd, backend=backend)
        D = tree.accepted_nodes.shape[1]
        assert torch.equal(tree.num_accepted, chain.num_accepted)
        assert torch.equal(tree.tokens, chain.tokens[:, : D + 1])
        assert chain.tokens[:, D + 1:].eq(PLACEHOLDER_TOKEN_ID).all()
        cols = torch.arange(D)
        assert torch.equal(tree.accepted_nodes, torch.where(cols < tree.num_accepted[:, None], cols, -1))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_verify_tree_on_a_chain_equals_verify_chain(temperature):
    """Same generator seed: the tree draws the same uniforms and noise as the chain."""
    gen = torch.Generator().manual_seed(4)
    B, k, V = 16, 4, 9
    logits = torch.randn(B, k + 1, V, generator=gen) * 2
    q = torch.softmax(torch.randn(B, k, V, generator=gen), -1)
    x = torch.multinomial(q.view(-1, V), 1, generator=gen).view(B, k)
    par = torch.arange(k).expand(B, k) - 1
    sp = SamplingParams(temperature)
    chain = verify_chain(x, q, logits, None, sp, torch.Generator().manual_seed(9))
    tree = verify_tree(x, par, q, logits, None, sp, torch.Generator().manual_seed(9))
    assert torch.equal(tree.num_accepted, chain.num_accepted)
    assert torch.equal(tree.tokens, chain.tokens[:, : tree.tokens.shape[1]])


def test_lossless_rules_reduce_to_greedy_at_temperature_zero():
    gen = torch.Generator().manual_seed(5)
    B, N, V = 32, 8, 5
    x, par, nd = random_tree(gen, B, N, V)
    logits = torch.randn(B, N + 1, V, generator=gen)
    q = random_probs(gen, (B, N, V))
    want = verify_tree(x, par, None, logits, GreedyTreeRule(), num_draft=nd)
    for rule in RULES.values():
        got = verify_tree(x, par, q, logits, rule, SamplingParams(0.0), num_draft=nd)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.accepted_nodes, want.accepted_nodes)


def test_seeded_reproducible():
    gen = torch.Generator().manual_seed(6)
    B, N, V = 16, 7, 11
    x, par, nd = random_tree(gen, B, N, V)
    logits = torch.randn(B, N + 1, V, generator=gen)
    q = random_probs(gen, (B, N, V), zero_frac=0.0)
    for rule in (SpecInferTreeRule(), WithoutReplacementTreeRule(), DeterministicTreeRule()):
        runs = [verify_tree(x, par, q, logits, rule, SamplingParams(1.0), torch.Generator().manual_seed(s),
                            num_draft=nd) for s in (5, 5, 6)]
        assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
        assert not torch.equal(runs[0].tokens, runs[2].tokens)


# ---- tier 3: statistical tests --------------------------------------------------------------
# Depth-2 tree: the root has 3 children (nodes 0-2); node 0 has 2 children, node 1 three, node 2 two.
# The target at a node depends on its path: P0 at the root, P1[a] after a, P2[a, b] after (a, b);
# the drafter proposes from Q0 at the root and Q1[a] after a.

V_STAT = 6
STAT_PARENTS = [-1, -1, -1, 0, 0, 1, 1, 1, 2, 2]


def stat_tables(seed=0, sharp=1.5):
    g = torch.Generator().manual_seed(seed)
    soft = lambda *s: torch.softmax(torch.randn(*s, V_STAT, generator=g) * sharp, -1)  # noqa: E731
    return soft(), soft(V_STAT), soft(V_STAT, V_STAT), soft(), soft(V_STAT)  # P0, P1, P2, Q0, Q1


def draw_children(q, count, how, gen):
    """long [B, count] children drawn from q [B, V]: i.i.d., without replacement, or top-k with a duplicate."""
    if how == "iid":
        return torch.multinomial(q, count, replacement=True, generator=gen)
    if how == "without_replacement":  # Gumbel top-k
        g = -torch.empty_like(q).exponential_(generator=gen).log()
        return (q.log() + g).topk(count, dim=-1).indices
    top = q.topk(count, dim=-1).indices
    return torch.cat([top[:, :1], top[:, :count - 1]], dim=1)  # the best token twice


def sample_tree(tables, how, B, gen):
    """Draft one tree per row; returns draft tokens, draft_probs (None if deterministic) and target logits."""
    P0, P1, P2, Q0, Q1 = tables
    par = torch.tensor(STAT_PARENTS)
    N = len(STAT_PARENTS)
    x = torch.empty(B, N, dtype=torch.long)
    q = torch.empty(B, N, V_STAT)
    roots = [i for i in range(N) if par[i] < 0]
    x[:, roots] = draw_children(Q0.expand(B, V_STAT), len(roots), how, gen)
    q[:, roots] = Q0
    for j in roots:
        kids = [i for i in range(N) if par[i] == j]
        qj = Q1[x[:, j]]  # [B, V]
        x[:, kids] = draw_children(qj, len(kids), how, gen)
        q[:, kids] = qj.unsqueeze(1)
    target = torch.empty(B, N + 1, V_STAT)
    target[:, 0] = P0
    for i in range(N):
        target[:, i + 1] = P1[x[:, i]] if par[i] < 0 else P2[x[:, par[i]], x[:, i]]
    return x, par.expand(B, N), (None if how == "deterministic" else q), target.log()


def first_two_tokens(tables, res, gen):
    """long [B, 2]: the first two emitted tokens; a row that emitted one draws the next from P1, as the
    next decoding step would."""
    P1 = tables[1]
    first = res.tokens[:, 0]
    nxt = torch.multinomial(P1[first], 1, generator=gen).squeeze(1)
    second = torch.where(res.num_accepted >= 1, res.tokens[:, 1], nxt)
    return torch.stack([first, second], dim=1)


def run_stat(rule, how, seed, *, ragged=False, backend=None):
    tables = stat_tables()
    gen = torch.Generator().manual_seed(seed)
    x, par, q, logits = sample_tree(tables, how, N_DRAWS, gen)
    nd = torch.randint(0, x.shape[1] + 1, (N_DRAWS,), generator=gen) if ragged else None
    res = verify_tree(x, par, q, logits, rule, SamplingParams(1.0), gen, num_draft=nd, backend=backend)
    toks = first_two_tokens(tables, res, gen)
    P0, P1 = tables[0], tables[1]
    joint = (P0[:, None] * P1).flatten()
    return chisquare_pvalue(toks[:, 0], P0), chisquare_pvalue(toks[:, 0] * V_STAT + toks[:, 1], joint), res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,how,ragged", [
    (SpecInferTreeRule(), "iid", False),
    (SpecInferTreeRule(), "iid", True),
    (WithoutReplacementTreeRule(), "without_replacement", False),
    (DeterministicTreeRule(), "deterministic", False),
    (DeterministicTreeRule(), "deterministic", True),
])
def test_first_two_tokens_follow_the_target(rule, how, ragged, backend):
    p_first, p_joint, res = run_stat(rule, how, seed=1, ragged=ragged, backend=backend)
    assert p_first > 1e-3 and p_joint > 1e-3
    assert (res.num_accepted == 2).any() and (res.num_accepted == 0).any()  # both levels were exercised


def test_greedy_first_two_tokens_are_the_target_argmax_path():
    tables = stat_tables()
    gen = torch.Generator().manual_seed(2)
    x, par, _, logits = sample_tree(tables, "iid", 4096, gen)
    res = verify_tree(x, par, None, logits, GreedyTreeRule(), SamplingParams(0.0))
    a = int(tables[0].argmax())
    b = tables[1][a].argmax()
    c = tables[2][a, b].argmax()
    toks = res.tokens
    assert toks[:, 0].eq(a).all()
    assert toks[res.num_accepted >= 1, 1].eq(b).all()
    assert toks[res.num_accepted == 2, 2].eq(c).all()
    assert set(res.num_accepted.tolist()) == {0, 1, 2}


class StaleSiblingRule(SpecInferTreeRule):
    """Deliberately wrong: a rejected sibling leaves p as it was (no norm(max(p - q, 0)) update)."""

    fused_mode = None

    def reject(self, state, tokens, draft_probs):
        return state


class NoZeroingDeterministicRule(DeterministicTreeRule):
    """Deliberately wrong: a rejected deterministic child is not zeroed (its duplicate gets a second chance)."""

    fused_mode = None

    def reject(self, state, tokens, draft_probs):
        return state


@pytest.mark.parametrize("wrong,how", [
    (StaleSiblingRule(), "iid"),
    (SpecInferTreeRule(), "without_replacement"),  # i.i.d. rule on children drawn without replacement
    (NoZeroingDeterministicRule(), "deterministic"),
])
def test_statistical_test_detects_a_wrong_rule(wrong, how):
    p_first, p_joint, res = run_stat(wrong, how, seed=1)
    P0 = stat_tables()[0]
    assert (P0[res.tokens[:, 0]] > 0).all()  # the output stays inside the support...
    assert min(p_first, p_joint) < 1e-6  # ...so it is the test's power that rejects the rule
