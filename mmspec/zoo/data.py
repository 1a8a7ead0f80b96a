"""Training and held-out data for the zoo models, drawn from the scene world (:mod:`mmspec.zoo.scenes`).

Glossary:
    step batch     the scenes of training step s are a pure function of (seed, s): resumable runs
    held-out set   ``heldout_scenes(n)``: scenes from a separate seed; training never sees a held-out
                   (caption, background) pair, so held-out scores measure generalisation
    IMAGE_SIZE     the side of every zoo image (64 px: a 16 x 16 VQ grid at factor 4, 256 CLIP patches
                   of 4 px)
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch

from mmspec.zoo.scenes import Scene, render, sample_scene, scenes

IMAGE_SIZE = 64
HELDOUT_SEED = 987_654_321


HELDOUT_MAX = 1024  # training excludes these many held-out scenes


@lru_cache(maxsize=4)
def heldout_scenes(n: int = 256) -> tuple[Scene, ...]:
    if not 0 < n <= HELDOUT_MAX:
        raise ValueError(f"held-out scenes: 1..{HELDOUT_MAX} (training excludes only the first {HELDOUT_MAX}), got {n}")
    return tuple(scenes(n, seed=HELDOUT_SEED))


@lru_cache(maxsize=1)
def _heldout_keys() -> frozenset:
    return frozenset((s.caption(), s.background) for s in heldout_scenes(HELDOUT_MAX))


def train_scenes(seed: int, step: int, batch: int) -> list[Scene]:
    """The ``batch`` training scenes of ``step`` (never a held-out scene)."""
    rng = random.Random(seed * 1_000_003 + step)
    keys = _heldout_keys()
    out: list[Scene] = []
    while len(out) < batch:
        s = sample_scene(rng)
        if (s.caption(), s.background) not in keys:
            out.append(s)
    return out


def render_batch(batch: list[Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Scenes -> float pixels [B, 3, size, size] in [-1, 1]."""
    arr = np.stack([np.asarray(render(s, size)) for s in batch])  # [B, S, S, 3] uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
