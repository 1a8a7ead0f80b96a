"""FR-Spec: a frequency-ranked draft vocabulary and its draft -> target id map.

Paper: Zhao et al., "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked
Speculative Sampling" (arXiv 2502.14856).

Glossary:
    counts   long [V]: how often each target token occurs in a corpus (here: the target's own answers)
    d2t      long [Vd], strictly increasing: the target ids of the draft vocabulary, the ``size`` most
             frequent tokens plus the ones that must always be draftable (EOS, chat-turn markers);
             ties (unseen tokens) break towards lower ids, which byte-pair vocabularies give to
             earlier, more frequent merges
    coverage the fraction of corpus tokens inside the draft vocabulary (an upper bound on what a
             reduced-vocabulary drafter can propose)
"""

from __future__ import annotations

from typing import Iterable

import torch


def count_tokens(sequences: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """long [V]: occurrences of each id over ``sequences`` (1-D long tensors)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(seq.flatten().to(torch.long), minlength=vocab_size)[:vocab_size]
    return counts


def rank_vocabulary(counts: torch.Tensor, size: int, *, always: Iterable[int] = ()) -> torch.Tensor:
    """d2t long [min(size, V)]: the draft vocabulary, sorted by target id."""
    vocab = counts.shape[0]
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1, got {size}")
    size = min(size, vocab)
    always = sorted({int(t) for t in always if 0 <= int(t) < vocab})
    ids = torch.arange(vocab)
    # most frequent first; ties towards lower ids
    order = torch.argsort(counts.double() * vocab - ids.double() / vocab, descending=True)
    chosen = set(always)
    for t in order.tolist():
        if len(chosen) >= size:
            break
        chosen.add(t)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def coverage(counts: torch.Tensor, d2t: torch.Tensor) -> float:
    total = int(counts.sum())
    return float(counts[d2t].sum()) / total if total else 0.0
