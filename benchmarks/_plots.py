"""PNG figures for benchmarks/RESULTS.md (matplotlib, ``pip install -e ".[bench]"``).

Glossary:
    speed-quality   one point per image method: speedup vs plain AR (x) against prompt faithfulness
                    (left) and Fréchet distance to AR samples (right, lower is closer)
    histogram       fraction of verification steps that accepted n drafted tokens, per method
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speed_quality(summary: dict, path: Path) -> None:
    plt = _pyplot()
    have_fd = any(v.get("fd") is not None for v in summary.values())
    fig, axes = plt.subplots(1, 2 if have_fd else 1, figsize=(11 if have_fd else 6, 4.2), squeeze=False)
    panels = [("faithful", "prompt faithfulness (higher is better)")]
    if have_fd:
        panels.append(("fd", "Fréchet distance to AR samples (lower is better)"))
    for ax, (key, label) in zip(axes[0], panels):
        for i, (name, v) in enumerate(summary.items()):
            y = v.get(key)
            if y is None:
                continue
            ax.scatter(v["speedup"], y, s=40, color=f"C{i % 10}", label=name)
            ax.annotate(name.split(" (")[0], (v["speedup"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("speedup vs plain AR (wall time, this CPU)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Image generation: speed vs quality (zoo models)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accept_histogram(counts: dict[str, list[int]], path: Path, title: str = "Accepted drafted tokens per step") -> None:
    plt = _pyplot()
    counts = {n: c for n, c in counts.items() if c and sum(c)}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(counts), 1)
    for i, (name, c) in enumerate(counts.items()):
        total = sum(c)
        xs = [j + (i - (len(counts) - 1) / 2) * width for j in range(len(c))]
        ax.bar(xs, [x / total for x in c], width=width, label=name.split(" (")[0], color=f"C{i % 10}")
    ax.set_xlabel("drafted tokens accepted in one verification step")
    ax.set_ylabel("fraction of steps")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
