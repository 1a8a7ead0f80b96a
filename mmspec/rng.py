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

Row streams (:class:`RowRandom`, what the decoding loop uses): every random number a row draws
is keyed by (row seed, purpose, token position), never by a batch-wide counter. A step that starts
at position t0 of a row draws its acceptance uniforms at keys t0 .. t0+k-1, its one sampled token's
noise at key t0, and a drafter draws the token it proposes for position t at key t. A key is only
reused for a position whose earlier number did not influence anything committed (a position
beyond the first rejection), so each decision still sees a fresh number, and a row's output
depends only on its prompt, its seed and its own draft lengths, not on its batch neighbours.

Purposes (named streams): ``DRAFT``, ``ACCEPT``, ``EMIT``, ``JACOBI`` (SJD's guesses). MuLo-SD's
island redraws use :func:`keyed_exponential` with the image's seed, keyed by raster position.
"""

from __future__ import annotations

import torch

from .errors import InvalidSamplingError

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


def _wrap(x: int) -> int:
    """A Python int as the signed int64 with the same low 64 bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


#: named streams of :class:`RowRandom`
DRAFT, ACCEPT, EMIT, JACOBI = 1, 2, 3, 4
_PURPOSE_MIX = 0x2545F4914F6CDD1D
#: a draft tree verified at row position t draws node i's acceptance uniform at key t * TREE_KEY_STRIDE + i
#: (:func:`tree_accept_keys`): keys of different steps never meet while a tree has fewer nodes than this
TREE_KEY_STRIDE = 4096


def tree_accept_keys(position: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """long [B, N]: the ``ACCEPT`` keys of the N nodes of the draft trees verified at row positions ``position``
    (long [B], each row's committed tokens), one per (row, node): every loop that verifies trees (the one loop,
    FlowSpec's step-wise decisions) draws at these keys, so both make the same decisions from the same seed."""
    if num_nodes > TREE_KEY_STRIDE:
        raise ValueError(f"a draft tree of {num_nodes} nodes exceeds the {TREE_KEY_STRIDE} keys of one step")
    return position.to(torch.long).unsqueeze(1) * TREE_KEY_STRIDE + torch.arange(num_nodes, dtype=torch.long)


class RowRandom:
    """Per-row random numbers keyed by (seed_b, purpose, position): batch-layout independent.

    ``seeds`` long [B]. Uniforms are computed by SplitMix64 in vectorised torch ops (cheap for a few
    values per row); V-sized Exp(1) noise vectors come from a ``torch.Generator`` seeded with the
    row's key (one generator per row and draw), which is much faster for large vocabularies.
    """

    def __init__(self, seeds: torch.Tensor):
        self.seeds = torch.as_tensor(seeds, dtype=torch.long).flatten().cpu()  # [B]

    @classmethod
    def from_seed(cls, seed: "int | list[int] | torch.Tensor | None", batch: int,
                  generator: torch.Generator | None = None) -> "RowRandom":
        """Row seeds from ``seed`` (one int per row, or one int: row b gets ``mix(seed, b)``), else drawn
        from ``generator`` (then a row's numbers depend on its index in the batch), else random."""
        if seed is None:
            s = torch.randint(-(2 ** 62), 2 ** 62, (batch,), generator=generator,
                              device=generator.device if generator is not None else "cpu").cpu()
            return cls(s)
        if isinstance(seed, bool):
            raise InvalidSamplingError(f"seed must be an int or one int per row, got {seed!r}")
        if isinstance(seed, int):
            return cls(splitmix64(torch.full((batch,), seed, dtype=torch.long) + torch.arange(batch) * _GOLDEN))
        seeds = list(seed.flatten().tolist()) if isinstance(seed, torch.Tensor) else list(seed)
        if len(seeds) != batch or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise InvalidSamplingError(f"seed must be an int or a list of {batch} ints (one per row), got {seed!r}")
        return cls(torch.tensor(seeds, dtype=torch.long))

    @property
    def batch(self) -> int:
        return self.seeds.numel()

    def _keys(self, purpose: int, positions: torch.Tensor) -> torch.Tensor:
        """int64 [B, ...]: the mixed key of every (row, position)."""
        base = splitmix64(self.seeds * _PURPOSE_MIX + _wrap(purpose * _GOLDEN))  # [B]
        pos = positions.to(device="cpu", dtype=torch.long)
        shape = (-1,) + (1,) * (pos.dim() - 1)
        return splitmix64(base.view(shape) + (pos + 1) * _M1)

    def uniform(self, purpose: int, positions: torch.Tensor, device: "torch.device | str" = "cpu") -> torch.Tensor:
        """float32 [B, n] in [0, 1): one number per (row, position); positions long [B, n]."""
        u = _shr(splitmix64(self._keys(purpose, positions)), 11).to(torch.float64) * (2.0 ** -53)
        return u.to(torch.float32).clamp_max(1.0 - 2.0 ** -24).to(device)

    def exponential(self, purpose: int, positions: torch.Tensor, size: int,
                    device: "torch.device | str" = "cpu") -> torch.Tensor:
        """float32 [B, size] ~ Exp(1), strictly positive: row b's vector keyed by positions[b] (long [B])."""
        keys = self._keys(purpose, positions.flatten()).tolist()
        out = torch.empty((len(keys), size), dtype=torch.float32, device=device)
        dev = torch.device(device)
        for b, key in enumerate(keys):
            g = torch.Generator(device=dev)
            g.manual_seed(key & ((1 << 63) - 1))
            out[b].exponential_(generator=g)
        return out.clamp_min_(1e-20)

    def add(self, seeds: "list[int] | torch.Tensor") -> None:
        """Append rows with ``seeds`` (rows joining a running batch keep their own streams)."""
        self.seeds = torch.cat([self.seeds, torch.as_tensor(seeds, dtype=torch.long).flatten().cpu()])

    def row(self, b: int) -> "RowRandom":
        """Row b's stream alone (a view for per-row draws)."""
        return RowRandom(self.seeds[b:b + 1])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (long [B']). The loop owns this call: drafters share the loop's object
        and must not select it again."""
        self.seeds = self.seeds[rows.cpu()]
