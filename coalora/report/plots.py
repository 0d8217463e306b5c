"""Comparison plots: task metric against average bits (one series per run setting), and the
training time needed to serve N configurations."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coalora.data.metrics import LOG_SCALE_METRICS  # noqa: E402
from coalora.io import atomic_write  # noqa: E402

SKIP = {
    "budget", "label", "kind", "avg_bits", "switch_ms", "adapt_ms", "seed", "fit_seconds", "run",
    "method", "model", "task", "variant", "series", "steps", "shared", "source", "n", "seeds",
    "rank",
}  # fmt: skip


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def plot_metric_vs_bits(
    series: dict[str, list[dict]],
    path: str | Path,
    metric: str | None = None,
    references: dict[str, float] | None = None,
) -> Path:
    """``series``: name -> rows with ``avg_bits``, ``kind`` and metric columns.

    Seed-aggregated rows (a ``<metric>_std`` column) get a ± one-standard-deviation band;
    ``references`` (name -> value, e.g. full-precision runs) are dotted horizontal lines.
    Perplexity (``LOG_SCALE_METRICS``) gets a log y-axis: a collapsed configuration's 1e8 would
    flatten every other point on a linear one."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, value in (references or {}).items():
        ax.axhline(value, color="0.45", ls=":", lw=1.2, label=f"{name} (full precision)")
    for name, rows in series.items():
        if not rows:
            continue
        key = metric or next(k for k in rows[0] if k not in SKIP and not k.endswith("_std"))
        alloc = sorted(
            (r for r in rows if r.get("kind", "allocation") == "allocation"),
            key=lambda r: r["avg_bits"],
        )
        other = [r for r in rows if r.get("kind", "allocation") != "allocation"]
        xs, ys = [r["avg_bits"] for r in alloc], [r[key] for r in alloc]
        color = None
        if alloc:
            (line,) = ax.plot(xs, ys, marker="o", label=f"{name}")
            color = line.get_color()
            errs = [r.get(f"{key}_std") for r in alloc]
            if any(not _missing(e) for e in errs):
                lo = [y - (0.0 if _missing(e) else e) for y, e in zip(ys, errs)]
                hi = [y + (0.0 if _missing(e) else e) for y, e in zip(ys, errs)]
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        if other:
            ax.scatter(
                [r["avg_bits"] for r in other],
                [r[key] for r in other],
                marker="x",
                color=color,
                alpha=0.7,
                label=f"{name} (random near budget)",
            )
        ax.set_ylabel(key)
        if key in LOG_SCALE_METRICS:
            ax.set_yscale("log")
    ax.set_xlabel("average bits")
    return _finish(fig, ax, path)


def plot_time_vs_configs(
    curves: dict[str, tuple[list[int], list[float], bool]], path: str | Path
) -> Path:
    """``curves``: name -> (numbers of configurations, seconds, shared). Per-configuration
    methods grow linearly; a method whose one fit serves every configuration stays flat
    (arXiv 2509.25214, Figure 1)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (ns, secs, shared) in curves.items():
        style = "-" if shared else "--"
        ax.plot(ns, [s / 60.0 for s in secs], style, marker=".", label=name)
    ax.set_xlabel("number of quantization configurations served")
    ax.set_ylabel("training time (minutes, measured fit time)")
    return _finish(fig, ax, path)


def _finish(fig, ax, path: str | Path) -> Path:
    """Grid, legend, layout; write the PNG atomically and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
