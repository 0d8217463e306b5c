"""Error tables for budget allocation: the error of every (layer, option) pair, cached on disk.

costs[i, c] = ‖D ⊙ (W_i − Ŵ_i(c))‖²_F with D = √Fisher (or 1) and Ŵ = fake quantization, or a
caller's residual function (LQ-LoRA's decomposition-aware errors), research/algorithms.md §2.1.
Tables are saved as safetensors (atomic write) keyed by model name, space hash and kind, and carry
a fingerprint of the weights so a cached table never serves other weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coalora.io import atomic_write
from coalora.quant.config import QuantConfig, QuantSpace
from coalora.quant.nf import quantization_errors

TABLE_VERSION = "1"


@dataclass
class ErrorTable:
    """costs[i, k]: error of layer ``names[i]`` under ``options[k]`` (float64, (N, K))."""

    names: list[str]
    numels: list[int]
    options: list[QuantConfig]
    costs: Tensor  # (N, K) float64
    kind: str = "mse"
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.costs = torch.as_tensor(self.costs, dtype=torch.float64)
        n, k = len(self.names), len(self.options)
        if tuple(self.costs.shape) != (n, k):
            raise ValueError(f"costs has shape {tuple(self.costs.shape)}; expected ({n}, {k})")
        if len(self.numels) != n:
            raise ValueError(f"{len(self.numels)} numels for {n} layers")
        if not bool(torch.isfinite(self.costs).all()):
            raise ValueError("error table has non-finite costs")

    def storage_bits(self) -> np.ndarray:
        return np.array([qc.storage_bits() for qc in self.options])  # (K,)

    def min_average_bits(self) -> float:
        return float(self.storage_bits().min())

    def max_average_bits(self) -> float:
        return float(self.storage_bits().max())

    def restrict(self, space: QuantSpace) -> ErrorTable:
        """The columns of ``space``'s options, in its order (raises if one is missing)."""
        pos = {qc: k for k, qc in enumerate(self.options)}
        missing = [qc.key for qc in space.options() if qc not in pos]
        if missing:
            raise ValueError(
                f"error table lacks {len(missing)} options of the space, e.g. {missing[:3]}"
            )
        cols = [pos[qc] for qc in space.options()]
        if cols == list(range(len(self.options))):
            return self
        return ErrorTable(
            self.names,
            self.numels,
            space.options(),
            self.costs[:, cols],
            self.kind,
            self.fingerprint,
        )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        meta = {
            "version": TABLE_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "names": json.dumps(self.names),
            "options": json.dumps([qc.key for qc in self.options]),
        }
        tensors = {
            "costs": self.costs.contiguous(),
            "numels": torch.tensor(self.numels, dtype=torch.int64),
        }
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> ErrorTable:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != TABLE_VERSION:
                raise ValueError(
                    f"{path}: error table version {meta.get('version')!r}, expected {TABLE_VERSION}"
                )
            costs, numels = f.get_tensor("costs"), f.get_tensor("numels")
        return cls(
            names=json.loads(meta["names"]),
            numels=[int(n) for n in numels.tolist()],
            options=[QuantConfig.from_key(k) for k in json.loads(meta["options"])],
            costs=costs,
            kind=meta["kind"],
            fingerprint=meta.get("fingerprint", ""),
        )


def weights_fingerprint(
    weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor] | None = None
) -> str:
    """Cheap content hash (names, shapes, Σ|w|, Σw²) so a cached table never serves other weights."""
    h = hashlib.sha1()
    for src in (weights, fisher or {}):
        for name, w in src.items():
            w = w.detach().double()
            h.update(
                f"{name}:{tuple(w.shape)}:{w.abs().sum().item():.12e}:{w.square().sum().item():.12e};".encode()
            )
    return h.hexdigest()[:16]


def build_error_table(
    weights: Mapping[str, Tensor],
    space: QuantSpace | None = None,
    fisher: Mapping[str, Tensor] | None = None,
    residual_fn: Callable[[Tensor, QuantConfig], Tensor] | None = None,
    kind: str | None = None,
) -> ErrorTable:
    """Squared (Fisher-weighted) Frobenius error of every layer under every option of ``space``.

    ``residual_fn(W, qc) -> Ŵ`` replaces fake quantization (LQ-LoRA's decomposition-aware errors).
    """
    space = space or QuantSpace()
    options = space.options()
    kind = kind or ("custom" if residual_fn else "fisher" if fisher is not None else "mse")
    rows = []
    for name, W in weights.items():
        F = None
        if fisher is not None:
            if name not in fisher:
                raise ValueError(f"fisher has no entry for layer {name!r}")
            F = fisher[name].to(torch.float32)
            if F.shape != W.shape:
                raise ValueError(
                    f"fisher[{name!r}] has shape {tuple(F.shape)}; weight has {tuple(W.shape)}"
                )
        if residual_fn is None:
            rows.append(quantization_errors(W, options, F))
            continue
        Wf = W.detach().to(torch.float32)
        row = torch.empty(len(options), dtype=torch.float64)
        for k, qc in enumerate(options):
            err = (Wf - residual_fn(Wf, qc).to(torch.float32)).square()
            row[k] = (err if F is None else err * F).sum(dtype=torch.float64)
        rows.append(row)
    return ErrorTable(
        names=list(weights),
        numels=[int(W.numel()) for W in weights.values()],
        options=options,
        costs=torch.stack(rows),
        kind=kind,
        fingerprint=weights_fingerprint(weights, fisher),
    )


def table_path(cache_dir: str | Path, model_name: str, space: QuantSpace, kind: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"
    return Path(cache_dir) / f"errors-{slug}-{kind}-{space.digest()}.safetensors"


def cached_error_table(
    weights: Mapping[str, Tensor],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    fisher: Mapping[str, Tensor] | None = None,
    residual_fn: Callable[[Tensor, QuantConfig], Tensor] | None = None,
    kind: str | None = None,
) -> ErrorTable:
    """``build_error_table`` through a disk cache; a file for other weights is rebuilt.

    The file is keyed by ``model_name``, the space's digest and ``kind`` (default mse / fisher /
    custom). With a ``residual_fn`` pass a ``kind`` naming its settings (e.g. ``"lq-r64"``): the
    function itself is not part of the key.
    """
    kind = kind or ("custom" if residual_fn else "fisher" if fisher is not None else "mse")
    if cache_dir is None:
        return build_error_table(weights, space, fisher, residual_fn, kind)
    path = table_path(cache_dir, model_name, space, kind)
    if path.exists():
        table = ErrorTable.load(path)
        if table.names == list(weights) and table.fingerprint == weights_fingerprint(
            weights, fisher
        ):
            return table.restrict(space)
    table = build_error_table(weights, space, fisher, residual_fn, kind)
    table.save(path)
    return table


__all__ = [
    "ErrorTable",
    "build_error_table",
    "cached_error_table",
    "table_path",
    "weights_fingerprint",
]
