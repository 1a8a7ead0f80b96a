"""Counter-based random numbers per batch row: results independent of batch layout.

Glossary:
    stream     row b draws from (seed_b, counter_b); the counter advances by the number of values
               drawn, so a row's numbers never depend on which other rows share the batch or on
               when they finish
    mixer      SplitMix64's finaliser (Steele, Lea, Flood, "Fast splittable pseudorandom number
               generators", OOPSLA 2014) applied to seed + counter * golden-ratio increment, in
               vectorised int64 torch ops (wrap-around multiplication, masked logical shifts)
    uniform    53 high bits of the mix as a float64 in [0, 1), returned as float32 clamped below 1

``CounterRNG.from_generator(g, B)`` draws the B row seeds from a ``torch.Generator``, so a seeded
run is reproducible, and row b gets the same stream whether it runs alone or beside others.

Status: groundwork. The engines still draw from one ``torch.Generator`` per batch; making sampled
output independent of batch layout also needs the draws keyed by token position (the number of
values a row consumes per step depends on the batch's common draft width), and the same hash inside
the Triton kernels (DESIGN: counter-based seed + position).
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_MASK = [(1 << (64 - s)) - 1 for s in range(64)]


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & _MASK[s]


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrap-around arithmetic)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


class CounterRNG:
    """Independent, counter-based random streams for the rows of a batch."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.to(torch.long)  # [B]
        self.counters = torch.zeros_like(self.seeds)  # [B]

    @classmethod
    def from_generator(cls, generator: torch.Generator | None, batch: int, device: torch.device | str = "cpu"):
        seeds = torch.randint(-(2 ** 62), 2 ** 62, (batch,), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        return cls(seeds.to(device))

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    @property
    def batch(self) -> int:
        return self.seeds.numel()

    def _bits(self, n: int) -> torch.Tensor:
        """int64 [B, n] of mixed bits, advancing every row's counter by n."""
        idx = self.counters.unsqueeze(1) + torch.arange(n, device=self.device)  # [B, n]
        self.counters = self.counters + n
        return splitmix64(self.seeds.unsqueeze(1) + (idx + 1) * _GOLDEN)

    def uniform(self, n: int) -> torch.Tensor:
        """float32 [B, n] in [0, 1)."""
        u = _shr(self._bits(n), 11).to(torch.float64) * (2.0 ** -53)
        return u.to(torch.float32).clamp_max(1.0 - 2.0 ** -24)

    def exponential(self, n: int) -> torch.Tensor:
        """float32 [B, n] ~ Exp(1), strictly positive."""
        u = _shr(self._bits(n), 11).to(torch.float64) * (2.0 ** -53)
        return (-torch.log1p(-u)).clamp_min(1e-20).to(torch.float32)

    def randint(self, high: int, n: int) -> torch.Tensor:
        """long [B, n] uniform in [0, high)."""
        return (self.uniform(n).to(torch.float64) * high).long().clamp_max(high - 1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B'])."""
        self.seeds = self.seeds[rows]
        self.counters = self.counters[rows]


def keyed_uniform(seed: int, keys: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [N, n] uniforms that depend only on (seed, key, column): the same key always gets the
    same numbers, whatever else is drawn (e.g. a token position's resampling noise)."""
    base = splitmix64(torch.as_tensor(keys, dtype=torch.long) * _GOLDEN + int(seed))  # [N]
    idx = torch.arange(1, n + 1, device=base.device)
    bits = splitmix64(base.unsqueeze(1) + idx * _GOLDEN)
    u = _shr(bits, 11).to(torch.float64) * (2.0 ** -53)
    return u.to(torch.float32).clamp_max(1.0 - 2.0 ** -24)


def keyed_exponential(seed: int, keys: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [N, n] ~ Exp(1) keyed like :func:`keyed_uniform`."""
    u = keyed_uniform(seed, keys, n).to(torch.float64)
    return (-torch.log1p(-u)).clamp_min(1e-20).to(torch.float32)
