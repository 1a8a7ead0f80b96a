"""Latent-neighbour tables and MuLo-SD locality: exact tables and invariants."""

import pytest
import torch

from mmspec.errors import MMSpecError
from mmspec.image_gen.locality import expand_rejections, rejection_islands
from mmspec.image_gen.neighbours import build_latent_neighbours


def test_neighbour_table_exact():
    cb = torch.tensor([[0.0], [1.0], [3.0], [3.5], [10.0]])
    table = build_latent_neighbours(cb, 2)
    assert table.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1], [3, 2]]
    # ties: entries 0 and 2 are both at distance 1 from entry 1 -> lower index first
    assert build_latent_neighbours(torch.tensor([[0.0], [1.0], [2.0]]), 2)[1].tolist() == [0, 2]
    assert build_latent_neighbours(cb, 0).shape == (5, 0)


def test_neighbour_table_matches_brute_force_and_chunking():
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(300, 8, generator=g)
    table = build_latent_neighbours(cb, 5, chunk=64)
    d = torch.cdist(cb.double(), cb.double())
    d.fill_diagonal_(float("inf"))
    assert torch.equal(table, torch.sort(d, dim=1, stable=True).indices[:, :5])
    assert not (table == torch.arange(300)[:, None]).any()  # never itself


def test_neighbour_table_among_live_codes():
    cb = torch.tensor([[0.0], [1.0], [3.0], [3.5], [10.0]])
    live = torch.tensor([True, False, True, True, False])
    table = build_latent_neighbours(cb, 2, live=live)
    assert table.tolist() == [[2, 3], [0, 2], [3, 0], [2, 0], [3, 2]]  # dead codes get live neighbours too
    with pytest.raises(MMSpecError, match="k=3 but only 3 live codes"):
        build_latent_neighbours(cb, 3, live=live)
    with pytest.raises(MMSpecError, match="live must be a bool tensor \\[5\\]"):
        build_latent_neighbours(cb, 1, live=torch.ones(4, dtype=torch.bool))


def test_neighbour_table_errors():
    with pytest.raises(MMSpecError, match="k must be an int in \\[0, V-1\\]"):
        build_latent_neighbours(torch.zeros(4, 2), 4)
    with pytest.raises(MMSpecError, match="codebook must be \\[V, d\\]"):
        build_latent_neighbours(torch.zeros(4), 1)


def grid(rows):
    return torch.tensor([[c == "x" for c in r] for r in rows])


def test_expand_rejections_table():
    rejected = grid(["....", ".x..", "....", "...."])
    assert torch.equal(expand_rejections(rejected, 1), grid(["xxx.", "xxx.", "xxx.", "...."]))
    # only tokens at or after t0 (raster index 4 = row 1, col 0) may be resampled
    assert torch.equal(expand_rejections(rejected, 1, t0=4), grid(["....", "xxx.", "xxx.", "...."]))
    assert torch.equal(expand_rejections(rejected, 0), rejected)
    corner = grid(["...x", "....", "....", "...."])
    assert torch.equal(expand_rejections(corner, 2), grid([".xxx", ".xxx", ".xxx", "...."]))


def test_expand_rejections_invariants_random():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        h, w, l = 6, 7, int(torch.randint(0, 3, (1,), generator=g))
        t0 = int(torch.randint(0, h * w, (1,), generator=g))
        rejected = (torch.rand(h, w, generator=g) < 0.1) & (torch.arange(h * w).view(h, w) >= t0)
        res = expand_rejections(rejected, l, t0)
        # brute force: u is resampled iff some rejected t is within Chebyshev distance l and u >= t0
        for u in range(h * w):
            ur, uc = divmod(u, w)
            near = any(rejected[tr, tc] and abs(tr - ur) <= l and abs(tc - uc) <= l
                       for tr in range(h) for tc in range(w))
            assert bool(res[ur, uc]) == (near and u >= t0)
        assert (res | ~rejected).all()  # rejected tokens are always resampled


def test_islands_are_8_connected_components():
    mask = grid(["xx..x", ".x...", "...x.", "x...."])
    labels = rejection_islands(mask)
    assert labels.tolist() == [[0, 0, -1, -1, 1], [-1, 0, -1, -1, -1], [-1, -1, -1, 2, -1], [3, -1, -1, -1, -1]]
    diag = grid(["x..", ".x.", "..x"])  # diagonal touch connects under 8-connectivity
    assert rejection_islands(diag).max().item() == 0


def test_batched_expand_matches_per_image():
    g = torch.Generator().manual_seed(2)
    rejected = torch.rand(3, 5, 5, generator=g) < 0.15
    batched = expand_rejections(rejected, 1, 3)
    for b in range(3):
        assert torch.equal(batched[b], expand_rejections(rejected[b], 1, 3))
