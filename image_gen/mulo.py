"""MuLo-SD local rejection and island resampling, as the repair step of the one cached decoding loop.

Paper: Peruzzo, Sautière, Habibian, "Multi-Scale Local Speculative Decoding for Image Generation"
(CVPR 2026); our reading of it is in ``docs/design/mulo_sd.md``.

Glossary:
    block       the candidate tokens of the rows being verified, raster positions [t0, t0 + m)
    accept      per token, independently, judged on the logits of the one verification forward of the
                block. Default, the bounded test (:class:`~mmspec.verify.LatentNeighbourRule` with budget
                delta, the drafted token taken as a deterministic draft): accept x with probability
                p(x) + p(A(x)), A(x) the neighbours pooled within delta; a rejected token is redrawn with x and
                A(x) excluded. Given the token's context the emitted distribution is p with at most delta moved
                onto x (delta = 0: p itself). The paper's test (``mulo_tau``,
                :class:`~mmspec.verify.PooledThresholdRule`): accept when the target's mass on x's neighbourhood
                >= tau, with no bound: it keeps a drafted token whenever its neighbours hold the mass, which
                moved the zoo's backgrounds (the white, grey and cream codes are each other's neighbours)
    uniforms    the bounded test's, keyed by (image seed, ACCEPT, raster position)
    resample    the union of the rejected tokens' neighbourhoods N(t, l) inside the block; every
                other candidate is kept
    redraw      ``"local"`` (the paper's) or ``"rest"`` (see :data:`REDRAWS`): which positions a rejection redraws
    island      an 8-connected component of the resample set; islands are redrawn in parallel: step
                s redraws each island's s-th token in raster order, all islands of all images in one
                batched forward over a fork of the target's cache
    context     the verification forward's cache slots stay: the committed prefix and the block's
                *kept* candidates (as the verification computed them) are the context of every island;
                each step feeds two slots per island, the token it drew at the previous step and, when
                that is not the token right before the next position, a copy of that token as the query
                (4-D attention mask: prefix, kept candidates before the slot, the island's own earlier
                tokens; never another island's positions nor the copies)
    keyed noise the exponential-race noise of position u depends only on (the image's seed, u), so
                resampling islands together or one by one gives the same tokens

The loop (:func:`mmspec.engine.decode` with ``repair=``) calls :class:`LocalResampling` right after the
verification forward, then drops the block's cache slots (they hold the drafts), commits the repaired
block whole (no bonus token) and feeds it as pending with the next block.
"""

from __future__ import annotations

import torch

from mmspec.config import SamplingParams
from mmspec.errors import MMSpecError
from mmspec.guidance import GuidedSession
from mmspec.rng import ACCEPT, RowRandom, keyed_exponential
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


#: what a rejection redraws: "local" (the paper: the rejected tokens' radius-l neighbourhoods; every other token
#: stays, though it was verified in the context of drafts that were then replaced) or "rest" (every token from
#: the block's first rejection on, as the chain rule requires: with delta = 0 the images are the target's)
REDRAWS = ("local", "rest")


class LocalResampling:
    """MuLo-SD's repair step: pooled per-token acceptance, then local island resampling (see glossary)."""

    def __init__(self, rule: AcceptRule, grid: int, l: int, sampling: SamplingParams, *, parallel: bool = True,
                 redraw: str = "local"):
        if redraw not in REDRAWS:
            raise MMSpecError(f"redraw must be one of {REDRAWS}, got {redraw!r}")
        self.rule, self.grid, self.l, self.sampling, self.parallel = rule, grid, l, sampling, parallel
        self.redraw = redraw

    @torch.no_grad()
    def __call__(self, session, block: torch.Tensor, logits: torch.Tensor, position: torch.Tensor,
                 rng: RowRandom, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block long [B, m] (raster positions t0 .. t0+m-1, t0 = position[b]), logits [B, m, V] from the
        verification forward; ``session`` holds every committed token and, as its last m slots, the block
        (``last``, the last committed token long [B], is not needed). Returns (repaired block long [B, m],
        kept bool [B, m]: drafted tokens kept as they were)."""
        batch, m = block.shape
        device = block.device
        n = self.grid * self.grid
        probs = logits_to_probs(logits, self.sampling)  # [B, m, V]
        offsets = position.cpu().long().unsqueeze(1) + torch.arange(m).unsqueeze(0)  # [B, m] raster positions
        uniforms = rng.uniform(ACCEPT, offsets, device)  # [B, m]: keyed, so a block's decisions are reproducible
        judgement = self.rule.judge(block, None, probs, uniforms)
        accepted = judgement.accepted  # [B, m]
        # the first redrawn position of a block, when rejected, still has the context it was judged in: it is
        # redrawn inside its rule's residual support (the bounded test zeroes the draft and the neighbours it
        # pooled), which is exactly the rule's residual; later positions have new contexts and draw from p
        banned = torch.zeros_like(probs, dtype=torch.bool) if judgement.residual is None else \
            (judgement.residual <= 0) & (probs > 0) & ~accepted.unsqueeze(-1)  # [B, m, V]
        # (the threshold test's residual is p itself: it bans nothing)
        seeds = [int(s) for s in rng.seeds.tolist()]
        members: list[tuple[int, list[int]]] = []  # (image, block offsets of one island, raster order)
        kept = torch.ones((batch, m), dtype=torch.bool, device=device)
        for b in range(batch):
            t0 = int(position[b])
            rejected = torch.zeros(n, dtype=torch.bool)
            rejected[t0:t0 + m] = ~accepted[b].cpu()
            if self.redraw == "rest":  # the chain rule: nothing after the first rejection is kept
                resample = torch.zeros(n, dtype=torch.bool)
                if bool(rejected.any()):
                    resample[int(rejected.nonzero()[0]):] = True
            else:
                resample = local_resample_set(rejected.view(self.grid, self.grid), self.l, t0).flatten()
            resample[t0 + m:] = False  # only the verified block is redrawn
            kept[b] = ~resample[t0:t0 + m].to(device)
            if bool(resample.any()):
                first = int(resample[t0:t0 + m].nonzero()[0])
                banned[b, :first] = False
                banned[b, first + 1:] = False
            else:
                banned[b] = False
            labels = rejection_islands(resample.view(self.grid, self.grid)).flatten()[t0:t0 + m]
            for i in range(int(labels.max()) + 1 if bool(resample.any()) else 0):
                members.append((b, torch.nonzero(labels == i).flatten().tolist()))
        final = block.clone()
        if not members:
            return final, kept
        support = ~banned  # [B, m, V]
        if self.parallel:
            self._redraw(session, [members], block, logits, kept, position, seeds, final, support)
        else:  # one island after another (the serial baseline; the same tokens, more forwards)
            self._redraw(session, [[mb] for mb in members], block, logits, kept, position, seeds, final, support)
        return final, kept

    def _redraw(self, session, groups, block, logits, kept, position, seeds, final, support) -> None:
        guided = isinstance(session, GuidedSession)
        inner = session.inner if guided else session
        m = block.shape[1]
        tail_start = inner.num_slots - m  # the verification forward's block slots are the last m
        calls = 0
        for members in groups:
            calls += self._redraw_group(session, members, block, logits, kept, position, seeds, final, support,
                                        tail_start)
        inner.calls += calls

    def _redraw_group(self, session, members, block, logits, kept, position, seeds, final, support,
                      tail_start) -> int:
        device = block.device
        m = block.shape[1]
        images = torch.tensor([b for b, _ in members], dtype=torch.long, device=device)
        fork = session.fork(images)
        guided = isinstance(fork, GuidedSession)
        first = (position.to(device)[images] + 1) if guided else (fork.next_pos - m)  # [R]: position of offset 0
        rows = block[images].clone()  # [R, m]: each island's own view of the block
        kept_r = kept[images]  # [R, m]
        cols = torch.arange(m, device=device)
        app_off: list[torch.Tensor] = []  # per appended column: offset of its token, -1 for copies and pads
        alive = list(range(len(members)))  # members still in the fork, in fork row order
        calls = 0
        for s in range(max(len(offs) for _, offs in members)):
            act = [r for r in alive if s < len(members[r][1])]
            if len(act) < len(alive):  # islands that are done leave the fork
                keep = torch.tensor([alive.index(r) for r in act], dtype=torch.long, device=device)
                fork.select_rows(keep)
                app_off = [c[keep] for c in app_off]
                alive = act
            idx = torch.tensor(alive, dtype=torch.long, device=device)
            j = torch.tensor([members[r][1][s] for r in alive], dtype=torch.long, device=device)  # [A]
            prev = torch.tensor([members[r][1][s - 1] if s else -1 for r in alive], dtype=torch.long, device=device)
            from_verify = j == 0  # the query is the last committed token: the verification's column 0
            from_prev = (prev >= 0) & (prev == j - 1)  # the query is the token drawn at the previous step
            copy = ~from_verify & ~from_prev  # the query is a copy of the token right before j
            q = j - 1
            out = None
            if bool((prev >= 0).any()) or bool(copy.any()):
                own = rows[idx]  # [A, m]
                tok_a = torch.where(prev >= 0, own.gather(1, prev.clamp_min(0).unsqueeze(1))[:, 0], 0)
                tok_b = torch.where(copy, own.gather(1, q.clamp_min(0).unsqueeze(1))[:, 0], 0)
                k = kept_r[idx]
                blk = torch.stack([k & (cols < prev.unsqueeze(1)), k & (cols < q.unsqueeze(1)) & copy.unsqueeze(1)], 1)
                if app_off:
                    off = torch.stack(app_off, 1)  # [A, C]
                    seen = off >= 0
                    app = torch.stack([seen & (off < prev.unsqueeze(1)),
                                       seen & (off < q.unsqueeze(1)) & copy.unsqueeze(1)], 1)  # [A, 2, C]
                else:
                    app = torch.zeros((len(alive), 2, 0), dtype=torch.bool, device=device)
                new = torch.zeros((len(alive), 2, 2), dtype=torch.bool, device=device)
                new[:, 0, 0] = new[:, 1, 1] = True  # each slot sees itself
                new[:, 1, 0] = copy & (prev >= 0)  # the copy sees the token drawn at the previous step
                allowed = torch.cat([blk, app, new], dim=2)  # [A, 2, m + C + 2]
                tokens = torch.stack([tok_a, tok_b], 1)
                offsets = torch.stack([prev.clamp_min(0), q.clamp_min(0)], 1)  # [A, 2]
                out = fork.extend_masked(tokens, allowed, tail_start, first[idx].unsqueeze(1) + offsets)
                calls += 1
                app_off += [torch.where(prev >= 0, prev, -1), torch.full_like(prev, -1)]
            for a, r in enumerate(alive):
                b, offs = members[r]
                jj = offs[s]
                if bool(from_verify[a]):
                    lg = logits[b, 0]
                else:
                    lg = out[a, 0 if bool(from_prev[a]) else 1]
                u = int(position[b]) + jj
                p = logits_to_probs(lg, self.sampling)
                inside = p * support[b, jj]
                p = inside if float(inside.sum()) > 0 else p  # a changed context may leave no mass there
                tok = draw_keyed(p, self.sampling, seeds[b], u)
                rows[r, jj] = tok
                final[b, jj] = tok
        return calls
