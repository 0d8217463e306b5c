"""A run's record of the configurations it trained and evaluated on: ``<run>/allocations.json``.

Versioned JSON, written atomically once the method is set up (``coalora.stages.train``):

* ``allocations``: per evaluation budget the ModelQuantConfig with the solver's ``SolveInfo``,
* ``trained``: the configuration a single-configuration method trained on (else null),
* ``train_set``: count + SHA-256 of the configurations a multi-configuration method draws from,
  held in ``train_configs.json`` beside it,
* the settings they came from: model, task, method, space, solver and sensitivity (kind,
  examples, seed and the digest of its cache key, ``coalora.quant.sensitivity``),
* ``sha256`` over all of it, so an edited file is detected.

Restoring or resuming the run reads its configurations from here (``MethodContext.allocations``)
instead of recomputing them; a record that fails verification or does not match the run's
settings is reported with a warning naming the file and ignored (recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalora.io import atomic_write_bytes
from coalora.quant.allocation import SolveInfo
from coalora.quant.build import Allocation, QuantSettings
from coalora.quant.config import ModelQuantConfig, QuantSpace

log = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORD_FILE = "allocations.json"
TRAIN_SET_FILE = "train_configs.json"


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


@dataclass
class RunRecord:
    """The configurations of one run and the settings that produced them."""

    model: str
    task: str
    method: str
    space: QuantSpace
    solver: str
    sensitivity: dict[str, Any]  # {"kind": ...} (+ examples, seed, digest, key for fisher)
    allocations: dict[float, Allocation]
    trained: ModelQuantConfig | None = None
    train_set: list[ModelQuantConfig] | None = None
    path: Path | None = None  # where it was read from / written to

    # ---------------------------------------------------------------- writing
    def to_dict(self, train_set_sha256: str | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": RECORD_VERSION,
            "model": self.model,
            "task": self.task,
            "method": self.method,
            "space": self.space.to_dict(),
            "solver": self.solver,
            "sensitivity": self.sensitivity,
            "allocations": [
                {
                    "budget": a.budget,
                    "solve": None if a.info is None else a.info.to_dict(),
                    "config": a.config.to_dict(),
                }
                for a in self.allocations.values()
            ],
            "trained": None if self.trained is None else self.trained.to_dict(),
            "train_set": None
            if self.train_set is None
            else {"count": len(self.train_set), "file": TRAIN_SET_FILE, "sha256": train_set_sha256},
        }
        d["sha256"] = _sha256(d)
        return d

    def save(self, run_dir: str | Path) -> Path:
        """``allocations.json`` (+ ``train_configs.json``), each written atomically; the train
        set first, so a record never names a file that is not there."""
        run_dir = Path(run_dir)
        digest = None
        if self.train_set is not None:
            data = _json_bytes(
                {"version": RECORD_VERSION, "configs": [c.to_dict() for c in self.train_set]}
            )
            digest = hashlib.sha256(data).hexdigest()
            atomic_write_bytes(run_dir / TRAIN_SET_FILE, data)
        self.path = atomic_write_bytes(run_dir / RECORD_FILE, _json_bytes(self.to_dict(digest)))
        return self.path

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, run_dir: str | Path, names: list[str] | None = None) -> RunRecord:
        """The record in ``run_dir``; ``ValueError`` saying what does not verify."""
        path = Path(run_dir) / RECORD_FILE
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"not readable JSON ({e})") from None
        if not isinstance(d, Mapping) or d.get("version") != RECORD_VERSION:
            version = d.get("version") if isinstance(d, Mapping) else None
            raise ValueError(f"version {version!r}, expected {RECORD_VERSION}")
        if _sha256({k: v for k, v in d.items() if k != "sha256"}) != d.get("sha256"):
            raise ValueError("SHA-256 does not match the content (modified?)")
        try:
            allocs: dict[float, Allocation] = {}
            for entry in d["allocations"]:
                b = float(entry["budget"])
                config = ModelQuantConfig.from_dict(entry["config"], f"{path} budget {b:g}")
                info = None if entry["solve"] is None else SolveInfo.from_dict(entry["solve"])
                allocs[b] = Allocation(b, config, info, "recorded")
            trained = d["trained"] and ModelQuantConfig.from_dict(d["trained"], f"{path} trained")
            rec = cls(
                model=str(d["model"]), task=str(d["task"]), method=str(d["method"]),
                space=QuantSpace.from_cfg(d["space"], prefix=f"{path} space"),
                solver=str(d["solver"]), sensitivity=dict(d["sensitivity"]),
                allocations=allocs, trained=trained or None, path=path,
            )  # fmt: skip
            if d["train_set"] is not None:
                rec.train_set = _load_train_set(Path(run_dir), d["train_set"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"inconsistent record ({type(e).__name__}: {e})") from None
        if names is not None:
            configs = [a.config for a in allocs.values()] + (rec.train_set or [])
            for config in configs + ([rec.trained] if rec.trained else []):
                config.validate_names(names)
        return rec

    def mismatch(self, quant: QuantSettings, model: str, task: str, seed: int) -> str | None:
        """Why this record is not of a run with these settings (None when it is)."""
        s = self.sensitivity
        checks = (
            ("model", self.model, model),
            ("task", self.task, task),
            ("quant.space", self.space.to_dict(), quant.space.to_dict()),
            ("quant.solver", self.solver, quant.solver),
            ("quant.sensitivity", s.get("kind"), quant.sensitivity),
        )
        for key, theirs, ours in checks:
            if theirs != ours:
                return f"it has {key}={theirs}, the run {key}={ours}"
        if quant.sensitivity != "none":
            seed = quant.fisher_seed(seed)
            if s.get("examples") != quant.sensitivity_examples or s.get("seed") != seed:
                return (
                    f"its sensitivity used {s.get('examples')} examples (seed {s.get('seed')}), "
                    f"the run {quant.sensitivity_examples} (seed {seed})"
                )
        return None


def _load_train_set(run_dir: Path, entry: Mapping) -> list[ModelQuantConfig]:
    path = run_dir / str(entry["file"])
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"its training set {path} is not readable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"its training set {path} does not match its SHA-256 (modified?)")
    configs = [
        ModelQuantConfig.from_dict(c, f"{path} entry {i}")
        for i, c in enumerate(json.loads(data)["configs"])
    ]
    if len(configs) != int(entry["count"]):
        raise ValueError(
            f"its training set {path} has {len(configs)} entries, not {entry['count']}"
        )
    return configs


def read_record(
    run_dir: str | Path | None,
    quant: QuantSettings,
    names: list[str],
    model: str,
    task: str,
    seed: int,
) -> RunRecord | None:
    """The run's record when ``run_dir`` holds one that verifies and matches these settings;
    otherwise None (a warning naming the file says why, unless there is no file)."""
    if run_dir is None or not (Path(run_dir) / RECORD_FILE).is_file():
        return None
    path = Path(run_dir) / RECORD_FILE
    try:
        rec = RunRecord.load(run_dir, names)
        why = rec.mismatch(quant, model, task, seed)
    except ValueError as e:
        why = str(e)
    if why is not None:
        log.warning(
            "ignoring recorded configurations %s: %s; recomputing with the run's settings",
            path,
            why,
        )
        return None
    return rec


__all__ = ["RECORD_FILE", "RECORD_VERSION", "TRAIN_SET_FILE", "RunRecord", "read_record"]
