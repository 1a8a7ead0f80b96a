"""Pruning strategies: exact selections on constructed evidence, and invariants."""

import pytest
import torch

from mmspec.vision.pruning import (ClsAttentionPruning, DiversityPruning, NoPruning, PruningError,
                                   PruningInputs, UniformPruning, VerifierGuidedPruning, get_strategy,
                                   keep_budget, select_max_min, select_top_mass_then_stride)


@pytest.mark.parametrize("n,r,expected", [(64, 0.1, 7), (64, 0.5, 32), (64, 0.0, 0), (64, 1.0, 64),
                                          (30, 0.1, 3), (16, 0.25, 4), (5, 0.01, 1)])
def test_keep_budget_is_ceil(n, r, expected):
    assert keep_budget(n, r) == expected


def test_uniform_stride_table():
    assert UniformPruning().select(PruningInputs(features=torch.zeros(10, 2)), 3).tolist() == [0, 3, 6]
    assert UniformPruning().select(PruningInputs(features=torch.zeros(8, 2)), 4).tolist() == [0, 2, 4, 6]
    assert NoPruning().select(PruningInputs(features=torch.zeros(5, 2)), 2).tolist() == [0, 1, 2, 3, 4]


def test_verifier_top_mass_then_stride_table():
    scores = torch.tensor([0.05, 0.30, 0.02, 0.20, 0.03, 0.10, 0.10, 0.20])
    # sorted: 1 (.30), 3 (.20), 7 (.20) ... 40% of mass is reached after {1, 3} -> top set {1, 3}
    # budget 4: fill 2 by stride over the rest [0, 2, 4, 5, 6, 7] -> positions 0 and 3 -> tokens 0, 5
    assert select_top_mass_then_stride(scores, 4).tolist() == [0, 1, 3, 5]
    # budget 1: top set is capped by the budget
    assert select_top_mass_then_stride(scores, 1).tolist() == [1]
    # all-zero scores fall back to the uniform stride
    assert select_top_mass_then_stride(torch.zeros(8), 2).tolist() == [0, 4]


def test_diversity_picks_one_per_cluster():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 16) * 10
    feats = torch.cat([centers[i] + 0.01 * torch.randn(5, 16, generator=g) for i in range(3)])  # 3 clusters of 5
    chosen = select_max_min(feats, 3)
    assert sorted((chosen // 5).tolist()) == [0, 1, 2]


def test_cls_keeps_highest_attention():
    att = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    assert ClsAttentionPruning().select(PruningInputs(cls_attention=att), 2).tolist() == [1, 3]


@pytest.mark.parametrize("name", ["uniform", "diversity", "verifier", "cls"])
def test_selection_invariants_random(name):
    g = torch.Generator().manual_seed(1)
    strat = get_strategy(name)
    for n in (1, 7, 64):
        ev = PruningInputs(features=torch.randn(n, 8, generator=g), target_attention=torch.rand(n, generator=g),
                           cls_attention=torch.rand(n, generator=g))
        for r in (0.0, 0.1, 0.5, 1.0):
            b = keep_budget(n, r)
            idx = strat.select(ev, b)
            assert idx.numel() == b and idx.unique().numel() == b
            assert torch.equal(idx, torch.sort(idx).values) and (idx >= 0).all() and (idx < n).all()


def test_strategy_errors():
    with pytest.raises(PruningError, match="unknown pruning strategy 'random'"):
        get_strategy("random")
    with pytest.raises(PruningError, match="needs the target's prefill attention"):
        VerifierGuidedPruning().select(PruningInputs(features=torch.zeros(4, 2)), 2)
    with pytest.raises(PruningError, match="needs the projected visual features"):
        DiversityPruning().select(PruningInputs(target_attention=torch.zeros(4)), 2)
