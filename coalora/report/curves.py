"""Training curves from a run's CSV log: loss and every validation metric against the step."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coalora.io import atomic_write  # noqa: E402


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] for the non-empty cells of Lightning's ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                series.setdefault(k, []).append((step, float(v)))
    return series


def plot_run_curves(run_dir: str | Path) -> Path | None:
    """Write ``curves.png`` (train loss; validation metrics) next to the CSV log, if any."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("csv/**/metrics.csv"))
    if not files:
        return None
    series = read_metrics_csv(files[-1])
    val = {k: v for k, v in series.items() if k.startswith("val/")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "train/loss" in series:
        s, v = zip(*series["train/loss"])
        axes[0].plot(s, v, lw=0.8)
    axes[0].set(title="train/loss", xlabel="step")
    for k, pts in sorted(val.items()):
        s, v = zip(*pts)
        axes[1].plot(s, v, marker="o", ms=3, label=k)
    axes[1].set(title="validation", xlabel="step")
    if val:
        axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
