"""Writing a benchmark's markdown section into RESULTS.md (replace in place, keep its notes)."""

from __future__ import annotations

from pathlib import Path

NOTES_MARK = "<!-- notes -->"


def write_section(path: Path, heading: str, table: str) -> None:
    """Replace the section starting at ``heading`` (up to the next ``## ``) with ``table``; text after a
    ``<!-- notes -->`` marker inside the old section (hand-written interpretation) is kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        old = text[start:] if end < 0 else text[start:end]
        notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else ""
        text = text[:start] + table + ("\n" + notes if notes else "") + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip("\n") + "\n\n" + table
    path.write_text(text)


def pool_accepted_lengths(stats) -> list[int]:
    """Sum the ``accepted_length_counts`` of several GenerationStats (lists of different lengths)."""
    width = max((len(s.accepted_length_counts) for s in stats), default=0)
    return [sum(s.accepted_length_counts[i] for s in stats if i < len(s.accepted_length_counts)) for i in range(width)]
