"""Generation statistics.

Glossary:
    row step               one verification of one row (a batch of B rows makes B row steps)
    mean_accepted_length   emitted tokens per row step (accepted drafts + 1), the usual
                           "tau" / mean accepted length of the speculative-decoding literature
    acceptance_per_position  fraction of drafted tokens accepted at draft position i, counted
                           over row steps that drafted position i
    time split             seconds in the target prefill, target forwards (the session's ``extend``: the
                           forward plus its mask and positions), drafter (prefill + propose + observe),
                           verification and bookkeeping (cache rollback, committing tokens, dropping
                           finished rows); they add up to total_time up to the rest of the loop's Python
                           (statistics, events)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    steps: int = 0
    row_steps: int = 0
    target_calls: int = 0
    drafter_calls: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    held_row_steps: int = 0  # row steps ending on a pending draft (open-end drafts accepted whole)
    accepted_at_position: list[int] = field(default_factory=list)
    drafted_at_position: list[int] = field(default_factory=list)
    accepted_length_counts: list[int] = field(default_factory=list)  # [n]: row steps that accepted n drafts
    prefill_time: float = 0.0  # target prefill
    drafter_prefill_time: float = 0.0  # drafter start (its own, possibly pruned, prefill); part of drafter_time
    target_time: float = 0.0
    drafter_time: float = 0.0
    verify_time: float = 0.0
    bookkeeping_time: float = 0.0  # cache rollback, commit (host copies of the results), finished-row removal
    total_time: float = 0.0
    extra: dict = field(default_factory=dict)  # facts from the drafter / adapters (e.g. visual tokens)

    def record(self, num_accepted: list[int], num_draft: list[int], num_committed: list[int], held: int = 0) -> None:
        """One step; ``held``: rows that accepted an open-end draft whole (they emit no bonus token)."""
        self.steps += 1
        self.held_row_steps += held
        self.row_steps += len(num_accepted)
        self.drafted_tokens += sum(num_draft)
        self.accepted_tokens += sum(num_accepted)
        self.emitted_tokens += sum(num_committed)
        width = max(num_draft, default=0)
        for acc in (self.accepted_at_position, self.drafted_at_position):
            acc.extend([0] * (width - len(acc)))
        counts = self.accepted_length_counts
        counts.extend([0] * (max(num_accepted, default=0) + 1 - len(counts)))
        for n in num_accepted:
            counts[n] += 1
        for n, d in zip(num_accepted, num_draft):
            for i in range(d):
                self.drafted_at_position[i] += 1
                if i < n:
                    self.accepted_at_position[i] += 1

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens emitted per row step (accepted + 1, or accepted alone after an open-end draft accepted
        whole: collaborative decoding's alternate proposals)."""
        return ((self.accepted_tokens + self.row_steps - self.held_row_steps) / self.row_steps
                if self.row_steps else 0.0)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at_position, self.drafted_at_position)]

    @property
    def tokens_per_second(self) -> float:
        return self.emitted_tokens / self.total_time if self.total_time > 0 else 0.0

    def split_ms_per_step(self, wall_seconds: float | None = None) -> dict:
        """Milliseconds per decoding step (the prefill left out): the target's forwards, the drafter, verification
        and the rest (loop, cache bookkeeping) of ``wall_seconds`` (default: ``total_time``)."""
        per = 1e3 / max(self.steps, 1)
        wall = self.total_time if wall_seconds is None else wall_seconds
        rest = wall - self.prefill_time - self.target_time - self.drafter_time - self.verify_time
        return {"target": self.target_time * per, "drafter": self.drafter_time * per, "verify": self.verify_time * per,
                "rest": rest * per}

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(mean_accepted_length=self.mean_accepted_length, acceptance_rate=self.acceptance_rate,
                 acceptance_per_position=self.acceptance_per_position, tokens_per_second=self.tokens_per_second)
        return d

    def summary(self) -> str:
        return (f"{self.emitted_tokens} tokens in {self.total_time:.2f}s ({self.tokens_per_second:.1f} tok/s), "
                f"mean accepted length {self.mean_accepted_length:.2f}, acceptance {self.acceptance_rate:.2f}, "
                f"target calls {self.target_calls}, drafter calls {self.drafter_calls}")
