"""GSD's grouped acceptance (mmspec.verify.grouped): table cases, the exact rule as its one-token limit,
the residual, named errors, and the "gsd" method on the one loop."""

import pytest
import torch

from mmspec.errors import MMSpecError, MethodParameterError
from mmspec.verify import ExactRule, GroupedRule
from mmspec.verify.grouped import group_mask

P = torch.tensor([[[0.4, 0.3, 0.2, 0.1]]])  # [B=1, k=1, V=4]
Q = torch.tensor([[[0.1, 0.1, 0.7, 0.1]]])
X = torch.tensor([[2]])
NBRS = torch.tensor([[1, 2], [0, 2], [1, 3], [2, 1]])  # code 2's candidates: 1 and 3


def test_group_table_case():
    # ranks under p: 0, 1, 2, 3; candidates 1 (rank 1, p 0.3) and 3 (rank 3, p 0.1) are within one rank and 0.15
    assert group_mask(X, P, NBRS, window=1, p_similar=0.15).tolist() == [[[True, True]]]
    assert group_mask(X, P, NBRS, window=0, p_similar=0.15).tolist() == [[[False, False]]]
    assert group_mask(X, P, NBRS, window=1, p_similar=0.05).tolist() == [[[False, False]]]
    # p(G) = 0.6, q(G) = 0.9: accepted iff u * 0.9 < 0.6, i.e. u < 2/3 (the exact rule: u < 0.2 / 0.7)
    rule = GroupedRule(NBRS, window=1, p_similar=0.15)
    for u, want in ((0.6, True), (0.7, False), (0.2, True)):
        assert rule.judge(X, Q, P, torch.tensor([[u]])).accepted.item() is want
    assert ExactRule().judge(X, Q, P, torch.tensor([[0.6]])).accepted.item() is False
    assert torch.allclose(rule.judge(X, Q, P, torch.tensor([[0.9]])).residual, (P - Q).clamp_min(0))


def test_without_a_group_it_is_the_exact_rule():
    g = torch.Generator().manual_seed(0)
    V, K = 12, 3
    p = torch.rand(4, 5, V, generator=g).softmax(-1)
    q = torch.rand(4, 5, V, generator=g).pow(3).softmax(-1)
    x = torch.multinomial(q.view(-1, V), 1, generator=g).view(4, 5)
    u = torch.rand(4, 5, generator=g)
    nbrs = torch.stack([torch.roll(torch.arange(V), -i)[1:K + 1] for i in range(V)])
    alone = GroupedRule(nbrs, window=0, p_similar=0.0).judge(x, q, p, u)
    exact = ExactRule().judge(x, q, p, u)
    assert torch.equal(alone.accepted, exact.accepted)
    # every candidate in: the ratio is p(G) / q(G) over x and its K candidates
    wide = GroupedRule(nbrs, window=V, p_similar=1.0).judge(x, q, p, u)
    idx = torch.cat([x.unsqueeze(-1), nbrs[x]], dim=-1)
    ratio = p.gather(-1, idx).sum(-1) / q.gather(-1, idx).sum(-1)
    assert torch.equal(wide.accepted, u.double() < ratio.double())


def test_named_errors():
    with pytest.raises(MMSpecError, match="neighbours must be a long tensor"):
        GroupedRule(NBRS.float())
    with pytest.raises(MMSpecError, match="window must be an int >= 0"):
        GroupedRule(NBRS, window=-1)
    with pytest.raises(MMSpecError, match="p_similar must be in \\[0, 1\\]"):
        GroupedRule(NBRS, p_similar=2.0)
    with pytest.raises(MMSpecError, match="neighbour table covers 4 tokens but the vocabulary has 5"):
        GroupedRule(NBRS).judge(X, None, torch.rand(1, 1, 5), torch.rand(1, 1))


def test_gsd_method_on_the_one_loop():
    import mmspec.image_gen as ig
    from tiny_image_models import tiny_ar

    hi = tiny_ar(grid=6, codebook=16, dtype=torch.float32)
    nbrs = torch.stack([torch.roll(torch.arange(16), -i)[1:5] for i in range(16)])
    out = ig.generate(hi, condition=[1, 2], method="gsd", neighbours=nbrs, cfg_scale=2.0, seed=[3, 4])
    assert out.tokens.shape == (2, 6, 6) and out.stats.target_forwards_per_image < 36
    alone = ig.generate(hi, condition=[2], method="gsd", neighbours=nbrs, cfg_scale=2.0, seed=[4])
    assert torch.equal(alone.tokens[0], out.tokens[1])  # an image depends only on its condition and seed
    with pytest.raises(MethodParameterError, match="method 'gsd' does not use mulo_tau"):
        ig.generate(hi, condition=[1], method="gsd", neighbours=nbrs, mulo_tau=0.5)
    with pytest.raises(MethodParameterError, match="gsd_p must be in \\[0.0, 1.0\\]"):
        ig.generate(hi, condition=[1], method="gsd", neighbours=nbrs, gsd_p=1.5)
    with pytest.raises(ig.MethodError, match="needs neighbours= or a tokenizer"):
        ig.generate(hi, condition=[1], method="gsd")
