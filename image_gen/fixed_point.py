"""Fixed-point encoding: token grids that survive decode -> encode exactly.

Glossary:
    round trip g    one decode -> 8-bit image -> encode pass of a tokenizer, a map on token grids:
                    g(t) = nearest_codes(E(snap(D(t)))).  ``snap`` rounds pixels to the 8-bit grid
                    (what saving the image as PNG does), so the PIL and the tensor paths agree.
    fixed point     a grid t with g(t) == t: ``encode(decode(t)) == t`` holds exactly for it
    orbit           t0, g(t0), g(g(t0)), ... from t0 = the nearest-code encoding of the input.  The
                    set of grids is finite, so every orbit ends in a cycle: a *tail* of transient
                    grids, then a *cycle* repeated for ever (a cycle of length 1 is a fixed point)
    projection      the fixed-point encoding of an image x is the member of its orbit's cycle whose
                    8-bit decoding is closest to snap(x) (squared error; ties to the smaller grid in
                    lexicographic order)

Why the projection is stable (``encode(decode(t*)) == t*`` for every t* it returns).  Let t* be
the chosen member of cycle C.  Re-encoding x' = D(t*) starts the orbit at g(t*), a member of C, so
the new orbit runs round the same cycle C.  Inside C, t* is the unique member decoding to exactly
snap(x') (distance 0): another member with the same 8-bit decoding would have the same successor,
and in a cycle no two members share one.  So the projection returns t* again.  The argument needs g
to be a function of the grid: deterministic, and independent of the other images in the batch.
Convolutions round differently for different batch sizes (measured: 17 of 196,608 8-bit pixels of
16 zoo scenes differ between batch 16 and batch 1), so the tokenizer encodes and decodes one image
at a time in this mode, and needs float32 weights (in bf16 the round trip hardly ever settles).
Exactness is for the same weights, device and kernels.

A trained VQGAN is nearly idempotent: most orbits end in a fixed point after a few passes (the zoo
tokenizer: median 3 passes, longest tail 20 on 256 held-out scenes; 3 of them end in 2-cycles).  The price is
that an orbit's tail can drift away from the input (a few per cent of the tokens), which the cost of
the projection measures.  Plain nearest-code encoding (one pass) stays available and is what the
training scripts and MuLo-SD's resolution changes use.

Reference: the construction is the cycle structure of a map iterated on a finite set (e.g. Knuth,
TAOCP vol. 2, 3.1, exercise 6); no image-tokenizer paper is implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from mmspec.errors import MMSpecError

__all__ = ["FixedPointEncoding", "FixedPointError", "FixedPointResult", "find_fixed_points", "snap_to_8bit"]

NO_CYCLE = -1  # sentinel of FixedPointResult.cycle_length for an orbit not closed within max_passes


class FixedPointError(MMSpecError):
    """An orbit of decode -> encode did not close within the allowed number of passes."""


@dataclass(frozen=True)
class FixedPointEncoding:
    """Encoding strategy of :class:`~mmspec.image_gen.VQTokenizer`: project onto the round trip's fixed
    points (see the module docstring).  ``max_passes`` bounds the orbit length per image (each pass is
    one decode and one encode); an orbit still open after it raises :class:`FixedPointError`."""

    max_passes: int = 256

    def __post_init__(self):
        if isinstance(self.max_passes, bool) or not isinstance(self.max_passes, int) or self.max_passes < 1:
            raise FixedPointError(f"max_passes must be an int >= 1, got {self.max_passes!r}")

    def to_json(self) -> dict:
        return {"name": "fixed_point", "max_passes": self.max_passes}

    @classmethod
    def from_json(cls, d: dict | None) -> "FixedPointEncoding | None":
        if d is None:
            return None
        if not isinstance(d, dict) or d.get("name") != "fixed_point":
            raise FixedPointError(f"unknown encoding {d!r}: expected null or {{'name': 'fixed_point', ...}}")
        return cls(max_passes=d.get("max_passes", 256))


class FixedPointResult(NamedTuple):
    tokens: torch.Tensor        # long [B, H, W] on the start grids' device: fixed points / chosen cycle members
    passes: torch.Tensor        # long [B] (CPU, as the two below): round trips computed (tail + cycle length)
    tail: torch.Tensor          # long [B]: transient grids before the cycle (0: t0 is on it)
    cycle_length: torch.Tensor  # long [B]: 1 for a fixed point; NO_CYCLE never appears in a result


def snap_to_8bit(x: torch.Tensor) -> torch.Tensor:
    """float pixels in [-1, 1] -> the same values rounded to the 8-bit grid (bit-identical to
    ``pil_to_tensor(tensor_to_pil(x))``)."""
    u = ((x.to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return u / 127.5 - 1.0


def _key(grid: torch.Tensor) -> bytes:
    return grid.to("cpu", torch.long).contiguous().numpy().tobytes()


def find_fixed_points(
    start: torch.Tensor,
    round_trip: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    max_passes: int,
) -> FixedPointResult:
    """Follow every orbit from ``start`` until it repeats a grid, and pick a member of its cycle.

    Args:
        start: long [B, H, W], the first grid of every orbit (nearest-code encoding of the inputs).
        round_trip: ``(grids [n, H, W], rows [n]) -> (next [n, H, W], cost [n])``: g applied to the
            grids, and the cost of each input grid against its image ``rows[i]`` (a number in [0, B)),
            e.g. the squared error of its 8-bit decoding.  Must be deterministic per grid.
        max_passes: most round trips per orbit.

    Returns: :class:`FixedPointResult`; raises :class:`FixedPointError` for an orbit still open.
    """
    B = start.shape[0]
    history: list[dict[bytes, int]] = [{} for _ in range(B)]  # grid bytes -> pass index
    grids: list[list[torch.Tensor]] = [[] for _ in range(B)]
    costs: list[list[float]] = [[] for _ in range(B)]
    out = start.clone()
    tail = torch.zeros(B, dtype=torch.long)
    cycle = torch.full((B,), NO_CYCLE, dtype=torch.long)
    passes = torch.zeros(B, dtype=torch.long)
    current = start.clone()  # [B, H, W]; rows of finished images are left as they are
    active = list(range(B))
    for k in range(max_passes):
        rows = torch.tensor(active, dtype=torch.long)
        nxt, cost = round_trip(current[rows], rows)
        still = []
        for i, b in enumerate(active):
            key = _key(current[b])
            history[b][key] = k
            grids[b].append(current[b].clone())
            costs[b].append(float(cost[i]))
            passes[b] = k + 1
            j = history[b].get(_key(nxt[i]))
            if j is None:
                current[b] = nxt[i]
                still.append(b)
                continue
            members = range(j, k + 1)  # the cycle, in orbit order
            best = min(members, key=lambda m: (costs[b][m], grids[b][m].flatten().tolist()))
            out[b], tail[b], cycle[b] = grids[b][best], j, k + 1 - j
        active = still
        if not active:
            break
    if active:
        raise FixedPointError(
            f"decode -> encode did not return to an earlier token grid within {max_passes} pass(es) for "
            f"{len(active)} of {B} image(s) (first: index {active[0]}); raise FixedPointEncoding(max_passes=...) "
            f"or encode with nearest codes (encoding=None)"
        )
    return FixedPointResult(out, passes, tail, cycle)
