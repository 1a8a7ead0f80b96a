"""EAGLE-3's training-time test (TTT) loss: the head scored on its own drafts, step after step.

Paper: Li et al., EAGLE-3 (arXiv 2503.01840), section 3.2.

Glossary:
    HeadBatch    one batch of teacher-forced examples: tokens, their validity, the answer positions the loss
                 scores, the target's fused low/mid/high features and its final hidden state at every position
    teacher      the target's distribution at each position, restricted to the draft vocabulary and
                 renormalised: softmax(final @ lm_head[d2t].T)
    TTT step j   the head run on its own hidden states j times (:meth:`Eagle3Head.forward_ttt`); its row t
                 predicts token t + j + 2, scored by soft cross-entropy against the teacher there, weighted
                 ``decay ** j``; only answer tokens are scored
    accuracy     per step, how often the head's top draft token equals the teacher's top token: the chain
                 acceptance the head would reach at that depth, given the prefix

Offline training (:mod:`mmspec.distill.train_head`), the zoo's image head and Test-Time Speculation's online
updates (:mod:`mmspec.drafters.test_time_speculation`) share this loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .eagle3 import Eagle3Head


class HeadBatch(NamedTuple):
    tokens: torch.Tensor  # long [B, L]
    valid: torch.Tensor  # long [B, L]
    loss_mask: torch.Tensor  # bool [B, L]: answer tokens
    features: torch.Tensor  # float [B, L, 3d]
    final: torch.Tensor  # float [B, L, d]
    positions: torch.Tensor  # long [B, L]: each row's position (the example's own, or the count of valid rows)


def make_batch(examples: list[dict], idx: list[int], max_len: int, offsets: list[int] | None = None) -> HeadBatch:
    """Examples ``idx`` padded into one batch of at most ``max_len`` positions; ``offsets``: where each row's
    window starts in its example (0: the first ``max_len`` tokens), its positions kept as in the example."""
    rows = [examples[i] for i in idx]
    if offsets is not None:  # windows of long examples (conversations), at their own positions
        rows = [{**{k: r[k][o:o + max_len] for k in ("tokens", "loss_mask", "features", "final")},
                 "positions": (r["positions"][o:o + max_len] if "positions" in r
                               else torch.arange(o, o + min(max_len, r["tokens"].shape[0] - o)))}
                for r, o in zip(rows, offsets)]
    L = min(max_len, max(r["tokens"].shape[0] for r in rows))
    b = len(rows)
    d3 = rows[0]["features"].shape[1] * rows[0]["features"].shape[2]
    d = rows[0]["final"].shape[1]
    tokens = torch.zeros((b, L), dtype=torch.long)
    valid = torch.zeros((b, L), dtype=torch.long)
    lmask = torch.zeros((b, L), dtype=torch.bool)
    feats = torch.zeros((b, L, d3))
    final = torch.zeros((b, L, d))
    positions = torch.arange(L).repeat(b, 1)
    for i, r in enumerate(rows):
        n = min(L, r["tokens"].shape[0])
        tokens[i, :n] = r["tokens"][:n]
        valid[i, :n] = 1
        lmask[i, :n] = r["loss_mask"][:n]
        feats[i, :n] = r["features"][:n].float().reshape(n, -1)
        final[i, :n] = r["final"][:n].float()
        if "positions" in r:  # pruned VLM examples keep their rows' original positions
            positions[i, :n] = r["positions"][:n]
    return HeadBatch(tokens, valid, lmask, feats, final, positions)


def ttt_loss(head: Eagle3Head, batch: HeadBatch, steps: int, decay: float):
    """(loss, accuracy per step): pairs t = (features t, token t+1) for t < L-1, at the positions of rows t."""
    tokens, valid, lmask, feats, final, positions = batch
    ids, pv = tokens[:, 1:], valid[:, 1:]
    outs = head.forward_ttt(ids, feats[:, :-1], pv, steps, logits=False,
                            positions=positions[:, :-1])  # hidden states [B, L-1, d] per step
    L1 = ids.shape[1]
    # every step scores the same target positions p (those whose next token is a valid answer token; step j
    # row t reads p = t + j + 1), so the teacher is computed once per batch, on those positions only
    need = lmask[:, 1:] & valid[:, 1:].bool()  # [B, L-1]: position p is a teacher position
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the target's distribution in the draft vocabulary
        teacher_rows = (final[:, :-1][need].float() @ head._lm_weight.float().T).softmax(-1)  # [P, Vd], float32
    teacher_top = teacher_rows.argmax(-1)  # [P]: once per batch, not per step
    row_of = need.flatten().cumsum(0).view_as(need) - 1  # [B, L-1]: p -> its row of teacher_rows
    total, weight, acc = 0.0, 0.0, []
    for j, hidden in enumerate(outs):
        # row t predicts token t + j + 2 from the target's position t + j + 1
        n = L1 - j - 1
        if n <= 0:
            break
        score = lmask[:, j + 2: j + 2 + n] & valid[:, j + 2: j + 2 + n].bool()
        if not bool(score.any()):
            continue
        lg = head.lm_logits(hidden[:, :n][score])  # [M, Vd]: only the scored rows go through the head
        rows = row_of[:, j + 1: j + 1 + n][score]  # [M]: position t + j + 1
        teacher = teacher_rows[rows]  # [M, Vd]
        # the teacher's top token within the draft vocabulary: what greedy verification would accept
        loss = -(teacher * lg.float().log_softmax(-1)).sum(-1).mean()
        w = decay ** j
        total = total + w * loss
        weight += w
        acc.append(float((lg.argmax(-1) == teacher_top[rows]).float().mean()))
    return total / max(weight, 1e-9), acc
