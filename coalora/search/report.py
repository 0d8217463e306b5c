"""Search outputs next to the configset (:mod:`coalora.search.session` writes it): CSV tables,
Pareto and hypervolume plots, W&B (docs/architecture.md, "coalora.search").

Every file is written atomically (temp file + rename), so an interrupted search leaves either the
previous file or none. Column meanings:

* ``observations.csv``: one row per scored configuration — ``id`` (as in ``configset.json``),
  ``source`` (``allocation@3.0``, ``search/iter2``), ``generator`` (finite_difference / discrete),
  ``iteration`` (0 = initial pool), ``avg_bits``, ``loss``, ``pareto`` (kept by the segmented
  selection = what training uses), ``front`` (globally non-dominated), ``seconds`` (score time).
* ``hypervolume.csv``: per iteration (0 = initial pool) the hypervolume w.r.t. the fixed reference
  point, the number of observations, and the fit / propose / score / total seconds.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from coalora.io import atomic_write  # noqa: E402

OBS_COLUMNS = (
    "id",
    "source",
    "generator",
    "iteration",
    "avg_bits",
    "loss",
    "pareto",
    "front",
    "seconds",
)
HV_COLUMNS = (
    "iteration",
    "hypervolume",
    "observations",
    "candidates",
    "fit_seconds",
    "propose_seconds",
    "score_seconds",
    "total_seconds",
)


def observation_rows(result) -> list[dict[str, Any]]:
    selected = set(result.selected)
    front = result.pareto_mask().tolist()
    return [
        {
            "id": f"o{i:04d}",
            "source": o.source,
            "generator": o.generator,
            "iteration": o.iteration,
            "avg_bits": round(o.bits, 6),
            "loss": o.loss,
            "pareto": i in selected,
            "front": bool(front[i]),
            "seconds": round(o.score_seconds, 4),
        }
        for i, o in enumerate(result.observations)
    ]


def hypervolume_rows(result) -> list[dict[str, Any]]:
    n0 = sum(1 for o in result.observations if o.iteration == 0)
    rows = [
        {
            "iteration": 0,
            "hypervolume": result.hypervolume[0],
            "observations": n0,
            "candidates": n0,
            "fit_seconds": "",
            "propose_seconds": "",
            "score_seconds": round(
                sum(o.score_seconds for o in result.observations if o.iteration == 0), 4
            ),
            "total_seconds": "",
        }
    ]
    n = n0
    for r in result.iterations:
        n += r.n_candidates
        rows.append(
            {
                "iteration": r.iteration,
                "hypervolume": r.hypervolume,
                "observations": n,
                "candidates": r.n_candidates,
                "fit_seconds": round(r.fit_seconds, 4),
                "propose_seconds": round(r.propose_seconds, 4),
                "score_seconds": round(r.score_seconds, 4),
                "total_seconds": round(r.total_seconds, 4),
            }
        )
    return rows


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns))
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_pareto(
    result, path: str | Path, title: str = "", bits_range: Sequence[float] | None = None
) -> Path:
    """Loss against average bits: every observation (colour = iteration), the segmented
    selection ringed, the global non-dominated front as a step line."""
    rows = observation_rows(result)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    init = [r for r in rows if r["iteration"] == 0]
    found = [r for r in rows if r["iteration"] > 0]
    ax.scatter(
        [r["avg_bits"] for r in init],
        [r["loss"] for r in init],
        s=18,
        marker="s",
        color="0.55",
        label=f"initial pool ({len(init)})",
        zorder=2,
    )
    if found:
        sc = ax.scatter(
            [r["avg_bits"] for r in found],
            [r["loss"] for r in found],
            s=18,
            c=[r["iteration"] for r in found],
            cmap="viridis",
            zorder=3,
            label=f"searched ({len(found)})",
        )
        fig.colorbar(sc, ax=ax, label="iteration")
    sel = [r for r in rows if r["pareto"]]
    ax.scatter(
        [r["avg_bits"] for r in sel],
        [r["loss"] for r in sel],
        s=70,
        facecolors="none",
        edgecolors="crimson",
        linewidths=1.2,
        zorder=4,
        label=f"selected ({len(sel)})",
    )
    front = sorted((r["avg_bits"], r["loss"]) for r in rows if r["front"])
    if front:
        xs, ys = zip(*front)
        ax.step(
            xs, ys, where="post", color="crimson", lw=1.0, alpha=0.8, zorder=3, label="global front"
        )
    if bits_range is not None:
        for b in bits_range:
            ax.axvline(b, color="0.8", lw=0.8, ls="--", zorder=1)
    ax.set_xlabel("average bits")
    ax.set_ylabel("calibration loss")
    ax.set_title(title or "Pareto search", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_hypervolume(result, path: str | Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(result.hypervolume)), result.hypervolume, marker="o")
    ax.set_xlabel("iteration (0 = initial pool)")
    ax.set_ylabel("hypervolume (bits x loss)")
    ax.set_title(title or "hypervolume", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_search_tables(
    result, run_dir: Path, title: str = "", bits_range: Sequence[float] | None = None
) -> dict[str, Path]:
    """observations.csv + hypervolume.csv + pareto.png + hypervolume.png."""
    run_dir = Path(run_dir)
    return {
        "observations": write_csv(
            run_dir / "observations.csv", observation_rows(result), OBS_COLUMNS
        ),
        "hypervolume": write_csv(run_dir / "hypervolume.csv", hypervolume_rows(result), HV_COLUMNS),
        "pareto_plot": plot_pareto(result, run_dir / "pareto.png", title, bits_range),
        "hypervolume_plot": plot_hypervolume(result, run_dir / "hypervolume.png", title),
    }


class SearchWandb:
    """A W&B run for one search: per-iteration hypervolume, then the observation table, a
    (bits, loss) scatter plot, the plots and the configset as an artifact. Offline unless the user
    configured W&B (:func:`coalora.stages.common.set_env_defaults`)."""

    def __init__(self, run, cfg: DictConfig) -> None:
        self.run = run
        self.cfg = cfg
        self._initial_logged = False

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path) -> SearchWandb:
        import wandb

        w = cfg.logger.wandb
        run = wandb.init(
            project=w.get("project", "coalora"), entity=w.get("entity"),
            group=f"{cfg.task.name}-{cfg.model.name}", job_type="search", name=w.get("name"),
            tags=list(cfg.get("tags") or []), dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
        )  # fmt: skip
        return cls(run, cfg)

    def log_initial(self, result) -> None:
        """Step 0: the initial pool's hypervolume, before any search iteration (once)."""
        if self._initial_logged or not result.hypervolume:
            return
        self._initial_logged = True
        n0 = sum(1 for o in result.observations if o.iteration == 0)
        self.run.log(
            {
                "search/hypervolume": result.hypervolume[0],
                "search/observations": n0,
                "search/candidates": n0,
            },
            step=0,
        )

    def log_iteration(self, record, result) -> None:
        self.log_initial(result)
        self.run.log(
            {
                "search/hypervolume": record.hypervolume,
                "search/observations": len(result.observations),
                "search/candidates": record.n_candidates,
                "search/iteration_seconds": record.total_seconds,
            },
            step=record.iteration,
        )

    def log_result(self, result, configset: Path, summary: dict[str, Any]) -> None:
        import wandb

        rows = observation_rows(result)
        table = wandb.Table(
            columns=list(OBS_COLUMNS), data=[[r[c] for c in OBS_COLUMNS] for r in rows]
        )
        scatter = wandb.plot.scatter(table, "avg_bits", "loss", title="loss vs average bits")
        self.log_initial(result)  # a search with zero iterations still has its step 0
        images = {  # search/plots/...: "search/hypervolume" is the scalar series
            f"search/plots/{p.stem}": wandb.Image(str(p))
            for p in (configset.parent / "pareto.png", configset.parent / "hypervolume.png")
            if p.is_file()
        }
        self.run.log(
            {"search/observations_table": table, "search/pareto_scatter": scatter, **images}
        )
        self.run.summary.update(
            {f"search/{k}": v for k, v in summary.items() if isinstance(v, (int, float, str))}
        )
        art = wandb.Artifact(
            f"configset-{self.cfg.model.name}-{self.cfg.task.name}",
            type="configset",
            metadata={"selected": len(result.selected), "observations": len(rows)},
        )
        art.add_file(str(configset))
        self.run.log_artifact(art)
