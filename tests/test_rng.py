"""Counter-based per-row random streams (groundwork for batch-layout-independent sampling):
exact SplitMix64, distributions, row independence."""

import torch
from scipy import stats

from mmspec.rng import CounterRNG, splitmix64

U64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    x &= U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)


def test_splitmix64_matches_python_reference():
    vals = [0, 1, 12345, 2 ** 63 - 1, 2 ** 40 + 77, 2 ** 64 - 5]
    signed = [v - (1 << 64) if v >= 1 << 63 else v for v in vals]
    got = [v & U64 for v in splitmix64(torch.tensor(signed)).tolist()]
    assert got == [splitmix64_reference(v) for v in vals]


def test_uniform_and_exponential_distributions():
    rng = CounterRNG.from_generator(torch.Generator().manual_seed(0), 3)
    u = rng.uniform(200_000)
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u[1].double().numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest(rng.exponential(200_000)[2].double().numpy(), "expon").pvalue > 1e-3
    r = rng.randint(7, 70_000)[0]
    assert stats.chisquare(torch.bincount(r, minlength=7).numpy()).pvalue > 1e-3


def test_rows_are_independent_of_each_other():
    a = CounterRNG(torch.tensor([11, 22, 33]))
    b = CounterRNG(torch.tensor([22]))
    ua, ub = a.uniform(5), b.uniform(5)
    assert torch.equal(ua[1], ub[0]) and not torch.equal(ua[0], ua[1])
    a.select(torch.tensor([1]))
    assert torch.equal(a.uniform(4)[0], b.uniform(4)[0])  # streams continue after a row selection
