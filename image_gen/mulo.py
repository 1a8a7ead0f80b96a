"""MuLo-SD local rejection and island resampling, as the repair step of the one cached decoding loop.

Paper: Peruzzo, Sautière, Habibian, "Multi-Scale Local Speculative Decoding for Image Generation"
(CVPR 2026); our reading of it is in ``docs/design/mulo_sd.md``.

Glossary:
    block       the candidate tokens of the rows being verified, raster positions [t0, t0 + m)
    accept      per token, independently: the target's mass on the token's latent neighbourhood
                >= tau (:class:`~mmspec.verify.PooledThresholdRule`), judged on the logits of the one
                verification forward of the block
    resample    the union of the rejected tokens' neighbourhoods N(t, l) inside the block; every
                other candidate is kept
    island      an 8-connected component of the resample set; islands are redrawn in parallel: step
                s redraws each island's s-th token in raster order, all islands of all images in one
                batched forward of the block over a fork of the target's cache (the committed prefix
                is shared, never recomputed); while island A is redrawn, the positions of the *other*
                islands and A's not-yet-redrawn tokens are attention holes that keep their positions
    keyed noise the exponential-race noise of position u depends only on (the image's seed, u), so
                resampling islands together or one by one gives the same tokens

The loop (:func:`mmspec.engine.decode` with ``repair=``) drops the block's cache slots after the
verification forward (they were computed with the drafts), calls :class:`LocalResampling`, commits
the repaired block whole (no bonus token) and feeds it as pending with the next block.
"""

from __future__ import annotations

import torch

from mmspec.config import SamplingParams
from mmspec.guidance import GuidedSession
from mmspec.rng import RowRandom, keyed_exponential
from mmspec.sampling import logits_to_probs
from mmspec.verify.rule import AcceptRule

from .locality import expand_rejections, rejection_islands


def draw_keyed(probs: torch.Tensor, sampling: SamplingParams, seed: int, key: int) -> int:
    """One token from processed probs [V]: argmax when greedy, else the exponential race with noise keyed
    by (seed, key) (the same key always gets the same noise)."""
    if sampling.is_greedy:
        return int(probs.argmax())
    noise = keyed_exponential(seed, torch.tensor([key]), probs.shape[-1])[0]
    return int((probs / noise).argmax())


def local_resample_set(rejected: torch.Tensor, l: int, t0: int) -> torch.Tensor:
    """The positions MuLo-SD redraws: ∪ N(t, l) over rejected tokens t, restricted to u >= t0."""
    return expand_rejections(rejected, l, t0)


def _block_logits(base, which: torch.Tensor, last: torch.Tensor, rows: torch.Tensor,
                  visible: torch.Tensor) -> torch.Tensor:
    """Logits [R, m, V] predicting the first m tokens of each block, for candidate blocks ``rows`` long [R, m]
    with key visibility ``visible`` bool [R, m], on a fork of rows ``which`` long [R] of ``base`` (which holds
    the committed prefix but its last token ``last`` long [R])."""
    r, m = rows.shape
    tokens = torch.cat([last.unsqueeze(1), rows[:, :-1]], dim=1)  # column j predicts block token j
    valid = torch.cat([torch.ones((r, 1), dtype=torch.long, device=rows.device), visible[:, :-1].long()], dim=1)
    ar = torch.arange(m, device=rows.device).unsqueeze(0)
    f = base.fork(which)
    if isinstance(f, GuidedSession):
        return f.extend(tokens, valid, positions=f.fed.unsqueeze(1) + ar)
    return f.extend(tokens, valid, position_ids=f.next_pos.unsqueeze(1) + ar)


class LocalResampling:
    """MuLo-SD's repair step: pooled per-token acceptance, then local island resampling (see glossary)."""

    def __init__(self, rule: AcceptRule, grid: int, l: int, sampling: SamplingParams):
        self.rule, self.grid, self.l, self.sampling = rule, grid, l, sampling

    @torch.no_grad()
    def __call__(self, session, block: torch.Tensor, logits: torch.Tensor, position: torch.Tensor,
                 rng: RowRandom, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block long [B, m] (raster positions t0 .. t0+m-1, t0 = position[b]), logits [B, m, V] from the
        verification forward; ``session`` holds every committed token, the last of which is ``last``
        long [B]. Returns (repaired block long [B, m], kept bool [B, m]: drafted tokens kept as they were)."""
        batch, m = block.shape
        device = block.device
        n = self.grid * self.grid
        probs = logits_to_probs(logits, self.sampling)  # [B, m, V]
        accepted = self.rule.judge(block, None, probs, torch.zeros((batch, m), device=device)).accepted  # [B, m]
        seeds = [int(s) for s in rng.seeds.tolist()]
        members: list[tuple[int, list[int]]] = []  # (image, block offsets of one island, raster order)
        kept = torch.ones((batch, m), dtype=torch.bool, device=device)
        for b in range(batch):
            t0 = int(position[b])
            rejected = torch.zeros(n, dtype=torch.bool)
            rejected[t0:t0 + m] = ~accepted[b].cpu()
            resample = local_resample_set(rejected.view(self.grid, self.grid), self.l, t0).flatten()
            resample[t0 + m:] = False  # only the verified block is redrawn
            kept[b] = ~resample[t0:t0 + m].to(device)
            labels = rejection_islands(resample.view(self.grid, self.grid)).flatten()[t0:t0 + m]
            for i in range(int(labels.max()) + 1 if bool(resample.any()) else 0):
                members.append((b, torch.nonzero(labels == i).flatten().tolist()))
        final = block.clone()
        if not members:
            return final, kept
        images = torch.tensor([b for b, _ in members], dtype=torch.long, device=device)
        # the fork drops each image's last committed token: its output predicts the block's first token
        base = session.fork(images)
        base.rollback(torch.ones(images.numel(), dtype=torch.long, device=device))
        rows = block[images].clone()  # [R, m]: each island's own view (other islands keep their drafts)
        visible = kept[images].clone()  # [R, m]: kept tokens only, until an island's own tokens are redrawn
        steps = max(len(offs) for _, offs in members)
        for s in range(steps):
            # only the islands with an s-th token, and only the columns up to the furthest one they redraw
            active = [r for r, (_, offs) in enumerate(members) if s < len(offs)]
            width = max(members[r][1][s] for r in active) + 1
            act = torch.tensor(active, dtype=torch.long, device=device)
            step_logits = _block_logits(base, act, last[images][act], rows[act, :width],
                                        visible[act, :width])  # [A, width, V]
            for a, r in enumerate(active):
                b, offs = members[r]
                j = offs[s]
                u = int(position[b]) + j
                tok = draw_keyed(logits_to_probs(step_logits[a, j], self.sampling), self.sampling, seeds[b], u)
                rows[r, j] = tok
                visible[r, j] = True
                final[b, j] = tok
        (session.inner if isinstance(session, GuidedSession) else session).calls += steps
        return final, kept
