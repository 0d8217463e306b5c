"""Loss-aware sensitivity of a model's target weights: a cached artefact of (model, task data).

``quant.sensitivity=fisher`` weights every allocation error by the diagonal empirical Fisher
F = Σ_n (∂L_n/∂W)² of the full-precision model on ``quant.sensitivity_examples`` single-example
training batches (LQ-LoRA, arXiv 2311.12023 §3.4: costs ‖√F ⊙ (W − Ŵ)‖²; ``fisher.py`` says why
every batch holds one example). ``none`` keeps the data-free squared error. docs/quantization.md
("Sensitivity") lists the keys, the per-family defaults and which callers use it.

The Fisher is computed once per (model name, task name, examples, seed, weights fingerprint,
calibration-data digest) and cached as a safetensors file under ``<cache>/sensitivity/`` whose
metadata holds that key and a SHA-256 of the content. A file that is truncated, edited, or was
computed for other weights or data is reported with a warning naming it and recomputed
(``coalora.cachefile.get_or_compute``: locked, atomic, docs/reliability.md). Computing it logs a
progress line about every 10 s (examples done / total, ETA) and one at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from coalora.cachefile import get_or_compute, parse_safetensors
from coalora.errors import ConfigError
from coalora.quant.error_table import weights_fingerprint
from coalora.quant.fisher import fisher_diagonal
from coalora.quant.model import model_weights

log = logging.getLogger(__name__)

SENSITIVITIES = ("none", "fisher")
SENSITIVITY_VERSION = "1"
REPORT_EVERY_S = 10.0

# (n batches, seed=, batch_size=) -> fixed training batches (the datamodule's calibration_batches)
Calibration = Callable[..., list[Mapping[str, Tensor]]]
LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


def check_sensitivity(value: object, key: str = "quant.sensitivity") -> str:
    """``value`` if it names a sensitivity, else one ConfigError line naming ``key``."""
    if not isinstance(value, str) or value not in SENSITIVITIES:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {list(SENSITIVITIES)}")
    return value


@dataclass(frozen=True)
class SensitivityKey:
    """What a cached sensitivity was computed from; :meth:`digest` names it in caches and records."""

    kind: str
    model: str
    task: str
    examples: int
    seed: int
    weights: str  # weights_fingerprint of the target weights
    data: str  # digest of the calibration examples

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SensitivityKey:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Sensitivity:
    """Per target layer, a non-negative weight of each parameter's squared error."""

    key: SensitivityKey
    fisher: dict[str, Tensor]  # name -> float32, the weight's shape

    @property
    def kind(self) -> str:
        return self.key.kind

    @property
    def table_kind(self) -> str:
        """The error-table kind: error tables and allocations of other data never collide."""
        return f"{self.kind}-{self.key.digest()[:12]}"

    def describe(self) -> dict:
        """What a run records about the sensitivity it allocated with."""
        return {"kind": self.kind, "digest": self.key.digest(), "key": self.key.to_dict()}

    def _content_digest(self, meta: Mapping[str, str]) -> str:
        h = hashlib.sha256(json.dumps({k: meta[k] for k in sorted(meta) if k != "sha256"}).encode())
        for name in self.fisher:
            h.update(self.fisher[name].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        """A safetensors file (one float32 tensor per layer); metadata: key, layers, SHA-256."""
        from safetensors.torch import save

        meta = {
            "version": SENSITIVITY_VERSION,
            "key": json.dumps(self.key.to_dict(), sort_keys=True),
            "names": json.dumps(list(self.fisher)),
        }
        meta["sha256"] = self._content_digest(meta)
        tensors = {n: f.detach().cpu().float().contiguous() for n, f in self.fisher.items()}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Sensitivity:
        """Parse :meth:`to_bytes`; ``ValueError`` saying what does not verify."""
        meta, tensors = parse_safetensors(data, "sensitivity file")
        if meta.get("version") != SENSITIVITY_VERSION:
            raise ValueError(f"version {meta.get('version')!r}, expected {SENSITIVITY_VERSION}")
        try:
            key = SensitivityKey.from_dict(json.loads(meta["key"]))
            names = json.loads(meta["names"])
            sens = cls(key, {n: tensors[n] for n in names})
        except Exception as e:
            raise ValueError(f"inconsistent sensitivity file ({e})") from None
        if sens._content_digest(meta) != meta.get("sha256"):
            raise ValueError("SHA-256 does not match the content (modified?)")
        return sens


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def sensitivity_path(cache_dir: str | Path, key: SensitivityKey) -> Path:
    """One file per (model, task, kind, examples, seed); weights and data are checked inside."""
    name = f"{_slug(key.model)}-{_slug(key.task)}-{key.kind}-n{key.examples}-seed{key.seed}"
    return Path(cache_dir) / "sensitivity" / f"{name}.safetensors"


def batches_digest(batches: Iterable[Mapping[str, Tensor]]) -> str:
    """SHA-256 (16 hex) of the calibration examples: field names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for batch in batches:
        for k in sorted(batch):
            v = batch[k]
            if isinstance(v, Tensor):
                t = v.detach().cpu().contiguous()
                h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
                h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()[:16]


def is_full_precision(model: nn.Module, names: Iterable[str]) -> bool:
    """Every target is still a plain ``nn.Linear`` (no quantized base, no adapter wrapper)."""
    return all(type(model.get_submodule(n)) is nn.Linear for n in names)


def _progress(batches: list, what: str) -> Iterator:
    """Yield ``batches``, logging examples done / total and an ETA about every 10 s."""
    total, t0, next_report = len(batches), time.perf_counter(), REPORT_EVERY_S
    for i, batch in enumerate(batches):
        elapsed = time.perf_counter() - t0
        if i and elapsed >= next_report:
            eta = elapsed / i * (total - i)
            log.info("%s: %d/%d examples (%.0fs, ETA %.0fs)", what, i, total, elapsed, eta)
            next_report = elapsed + REPORT_EVERY_S
        yield batch


def _task_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The task loss of one example (the fresh head for encoders, the LM head for decoders)."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def fisher_sensitivity(
    model: nn.Module | Callable[[], nn.Module],
    names: list[str],
    *,
    examples: int,
    seed: int,
    model_name: str,
    task_name: str,
    calibration: Calibration | None,
    cache_dir: str | Path | None,
    weights: Mapping[str, Tensor] | None = None,
    loss_fn: LossFn = _task_loss,
) -> Sensitivity:
    """The diagonal empirical Fisher of ``names`` on ``examples`` single-example training batches
    drawn with ``seed``, through the disk cache (``cache_dir=None``: computed, not cached).

    ``model`` is the full-precision model, or a function building it (called only on a cache
    miss: a restored run's targets are already quantized). ``weights`` (default: read off
    ``model``) key the cache. No ``calibration`` (no training data) is one ConfigError line.
    """
    where = "quant.sensitivity=fisher"
    if calibration is None:
        raise ConfigError(
            f"{where} needs the task's training data (calibration batches) and none is available "
            "here; use quant.sensitivity=none or give the run its data"
        )
    try:
        batches = calibration(int(examples), seed=int(seed), batch_size=1)
    except (ValueError, IndexError, RuntimeError) as e:
        raise ConfigError(f"{where}: cannot draw {examples} training examples ({e})") from None
    if not batches:
        raise ConfigError(f"{where}: the task has no training examples to compute it from")
    if weights is None:
        model = model if isinstance(model, nn.Module) else model()
        weights = model_weights(model, names)
    key = SensitivityKey(
        "fisher",
        str(model_name),
        str(task_name),
        int(examples),
        int(seed),
        weights_fingerprint({n: weights[n] for n in names}),
        batches_digest(batches),
    )

    def compute() -> Sensitivity:
        fp = model if isinstance(model, nn.Module) else model()
        t0 = time.perf_counter()
        what = f"sensitivity (fisher, {model_name}/{task_name})"
        log.info("%s: %d single-example batches over %d layers ...", what, len(batches), len(names))
        fisher = fisher_diagonal(fp, names, _progress(batches, what), loss_fn)
        log.info("%s: %d examples done in %.1fs", what, len(batches), time.perf_counter() - t0)
        return Sensitivity(key, {n: fisher[n].detach().cpu() for n in names})

    if cache_dir is None:
        return compute()

    def decode(data: bytes) -> Sensitivity:
        sens = Sensitivity.from_bytes(data)
        if list(sens.fisher) != list(names):
            raise ValueError("its layers differ from the model's")
        if sens.key != key:
            diff = [
                f.name for f in fields(key) if getattr(sens.key, f.name) != getattr(key, f.name)
            ]
            raise ValueError(f"it was computed for other {', '.join(diff)} (stale)")
        return sens

    path = sensitivity_path(cache_dir, key)
    sens = get_or_compute(
        path, compute, Sensitivity.to_bytes, decode, what="sensitivity", framed=False
    )
    log.info("sensitivity: fisher %s (%s)", key.digest(), path)
    return sens


__all__ = [
    "SENSITIVITIES",
    "Sensitivity",
    "SensitivityKey",
    "batches_digest",
    "check_sensitivity",
    "fisher_sensitivity",
    "is_full_precision",
    "sensitivity_path",
]
