"""Comparison plots: task metric against average bits, one series per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coalora.io import atomic_write  # noqa: E402

SKIP = {"budget", "kind", "avg_bits", "adapt_ms", "seed", "fit_seconds", "run", "method"}


def plot_metric_vs_bits(
    series: dict[str, list[dict]], path: str | Path, metric: str | None = None
) -> Path:
    """``series``: method -> rows with ``avg_bits``, ``kind`` and metric columns."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in series.items():
        if not rows:
            continue
        key = metric or next(k for k in rows[0] if k not in SKIP)
        alloc = sorted(
            (r for r in rows if r.get("kind", "allocation") == "allocation"),
            key=lambda r: r["avg_bits"],
        )
        other = [r for r in rows if r.get("kind", "allocation") != "allocation"]
        xs, ys = [r["avg_bits"] for r in alloc], [r[key] for r in alloc]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name}")
        errs = [r.get(f"{key}_std") for r in alloc]
        if any(e is not None for e in errs):  # seed-aggregated rows: ± one standard deviation
            ax.errorbar(
                xs,
                ys,
                yerr=[e or 0.0 for e in errs],
                fmt="none",
                ecolor=line.get_color(),
                capsize=3,
            )
        if other:
            ax.scatter(
                [r["avg_bits"] for r in other],
                [r[key] for r in other],
                marker="x",
                color=line.get_color(),
                alpha=0.7,
                label=f"{name} (random near budget)",
            )
        ax.set_ylabel(key)
    ax.set_xlabel("average bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
