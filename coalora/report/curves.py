"""Training curves from a run's CSV log: loss and every validation metric against the step."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coalora.io import atomic_write  # noqa: E402


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] for the non-empty cells of Lightning's ``metrics.csv``."""
    frame = pd.read_csv(path)
    steps = frame["step"].fillna(0).astype(float).astype(int) if "step" in frame else None
    series: dict[str, list[tuple[int, float]]] = {}
    for col in frame.columns:
        if col in ("step", "epoch"):
            continue
        values = pd.to_numeric(frame[col], errors="coerce")
        keep = values.notna()
        if keep.any():
            idx = steps[keep] if steps is not None else pd.Series(0, index=values.index)[keep]
            series[col] = list(zip(idx.tolist(), values[keep].astype(float).tolist(), strict=True))
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


def plot_loss_overlay(
    logs: dict[str, dict[str, list[tuple[int, float]]]], path: Path, smooth: float = 0.9
) -> Path | None:
    """Training loss (EMA-smoothed) of every run that logged it at two steps or more, on one
    axis; next to it the primary validation metric against the step when some run logged it
    more than once. ``logs``: label -> :func:`read_metrics_csv` output. Writes nothing and
    returns None when no run has a loss curve (a run shorter than ``log_every_n_steps``)."""
    curves = {k: s for k, s in logs.items() if len(s.get("train/loss", [])) >= 2}
    if not curves:
        return None
    val_key = next(
        (k for s in curves.values() for k in s
         if k.startswith("val/") and "@" not in k and len(s[k]) > 1),
        None,
    )  # fmt: skip
    fig, axes = plt.subplots(1, 2 if val_key else 1, figsize=(12 if val_key else 7, 4))
    ax = axes[0] if val_key else axes
    for label, series in curves.items():
        points = pd.DataFrame(series["train/loss"], columns=["step", "loss"])
        ema = points["loss"].ewm(alpha=1 - smooth, adjust=False).mean()
        (line,) = ax.plot(points["step"], ema, label=label, linewidth=1)
        if val_key and series.get(val_key):
            steps, vals = zip(*series[val_key], strict=True)
            axes[1].plot(steps, vals, marker="o", markersize=3, color=line.get_color(), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (EMA {smooth})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if val_key:
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(val_key)
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
