"""Shared run plumbing: environment defaults, run metadata (incl. the record of the run's
configurations), checkpoint I/O, loggers, callbacks."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.io import atomic_write, atomic_write_json, atomic_write_text
from coalora.quant.record import RunRecord

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked
    fcntl = None

log = logging.getLogger(__name__)

PACKAGES = (
    "coalora",
    "torch",
    "lightning",
    "transformers",
    "hydra-core",
    "bitsandbytes",
    "botorch",
    "gpytorch",
    "datasets",
    "peft",
    "wandb",
)


def wandb_mode() -> str:
    """``offline`` unless the user configured W&B (an API key or an explicit WANDB_MODE)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file():
        return "online"
    return "offline"


class _DropTips(logging.Filter):
    """Lightning's advertisement for another logging package is not a message about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_logging() -> None:
    """One line per message: when the root logger has handlers (Hydra's console + train.log),
    Lightning's own stream handlers would print every INFO line a second time; drop them so its
    records reach the console once and the run's train.log too. Known-harmless warnings of
    dependencies (a deprecation inside Lightning, GP jitter) are silenced."""
    if logging.getLogger().handlers:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in lg.filters):
            lg.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=r"A not p\.d\., added jitter")


def set_env_defaults() -> None:
    os.environ.setdefault("WANDB_MODE", wandb_mode())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_logging()


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def is_global_zero() -> bool:
    """Rank 0 of a (possibly distributed) job: only it writes run metadata (DDP launches the
    other ranks as copies of this process with RANK / LOCAL_RANK set)."""
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


RUN_LOCK = ".coalora.lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, stage: str) -> Iterator[None]:
    """Hold ``<run_dir>/.coalora.lock`` (an exclusive, non-blocking ``flock``) for the body, so
    a second ``train.py`` or ``evaluate.py`` aimed at the same folder stops with one line instead
    of mixing its files with ours (docs/reliability.md, "One process per run directory").

    Rank 0 only: the other ranks of a distributed job are copies of the holder. The lock goes
    with the process, also on SIGKILL, so a killed run never leaves a stale lock; the file stays
    (removing it would let a third process lock a new inode while a second holds the old one).
    Where ``fcntl`` does not exist (Windows) nothing is locked."""
    if fcntl is None or not is_global_zero():
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(
                f"the run directory {run_dir} is in use by {holder}; wait for it to finish or "
                f"choose another hydra.run.dir for this {stage}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{stage} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_run_info(cfg: DictConfig, run_dir: Path, stage: str, extra: dict | None = None) -> None:
    """Resolved config + seed, git sha, versions, command: every artifact is traceable."""
    if not is_global_zero():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    info: dict[str, Any] = {
        "stage": stage,
        "seed": cfg.get("seed"),
        "git_sha": git_sha(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
    }
    info.update(extra or {})
    atomic_write_json(run_dir / "run_info.json", info)


def record_configurations(cfg: DictConfig, run_dir: Path, method, ctx) -> Path | None:
    """``<run>/allocations.json`` (``coalora.quant.record``): the configurations the run trains
    and is validated on, with their solver information and the settings (space, solver,
    sensitivity) they came from. ``evaluate.py``, ``export.py``, ``search.py ckpt=`` and the
    scripts read them back through ``MethodContext.allocations``. A run resumed in the directory
    that holds its record keeps it as is."""
    if not is_global_zero():
        return None
    old = ctx.record
    if old is not None and old.path is not None and old.path.parent.resolve() == run_dir.resolve():
        return old.path
    q = ctx.quant
    record = RunRecord(
        model=str(cfg.model.name), task=str(cfg.task.name), method=str(method.name),
        space=q.space, solver=q.solver, sensitivity=ctx.sensitivity_record(),
        allocations=dict(method.solved),
        trained=None if method.switches_configs else method.config,
        train_set=method.train_configs(),
    )  # fmt: skip
    path = record.save(run_dir)
    n_train = len(record.train_set or [])
    log.info(
        "recorded %d budget allocations%s (%s errors, solver %s) in %s",
        len(record.allocations),
        f" and {n_train} training configurations" if n_train else "",
        q.sensitivity if q.sensitivity != "none" else "squared",
        q.solver,
        path,
    )
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file and renamed; loaded with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, f"ckpt_path={path}", map_location)


def read_checkpoint(path, where: str, map_location=None) -> dict[str, Any]:
    """A checkpoint's tensors, loaded without executing anything (``weights_only=True``); a
    truncated, random or hostile file is one line naming ``where``, never advice to load it
    unsafely."""
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in first or "Unsupported global" in first:
            first = "it holds objects other than tensors and plain values; refused"
        raise ConfigError(f"{where}: not a readable coalora checkpoint ({first})") from None


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a name -> config mapping."""
    if not cfg:
        return []
    return [instantiate(v) for v in cfg.values() if isinstance(v, DictConfig) and "_target_" in v]


def log_run_to_loggers(trainer, cfg: DictConfig, results: dict[str, Any], run_dir: Path) -> None:
    """What a dashboard needs to compare runs: the resolved config (every logger), and for W&B
    the final metrics and facts as the run summary, a results table and the curves plot."""
    flat = {".".join(k): v for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
    facts = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and k != "config"}
    for lg in trainer.loggers:
        lg.log_hyperparams({**flat, **{f"run.{k}": v for k, v in facts.items()}})
        if type(lg).__name__ != "WandbLogger":
            continue
        import wandb  # only with logger=wandb

        run = lg.experiment
        run.summary.update({**results["metrics"], **facts})
        if results.get("eval_avg_bits"):
            run.summary.update({f"avg_bits@{k}": v for k, v in results["eval_avg_bits"].items()})
        rows = [[k, float(v)] for k, v in results["metrics"].items()]
        run.log({"results": wandb.Table(columns=["metric", "value"], data=rows)})
        curves = run_dir / "curves.png"
        if curves.is_file():
            run.log({"plots/curves": wandb.Image(str(curves))})


def _flatten(d: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[tuple, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, (*prefix, str(k))))
    return out


def finish_wandb() -> None:
    """End the W&B run so multirun jobs do not merge into one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
