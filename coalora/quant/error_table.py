"""Error tables for budget allocation: the error of every (layer, option) pair, cached on disk.

costs[i, c] = ‖D ⊙ (W_i − Ŵ_i(c))‖²_F with D = √Fisher (or 1) and Ŵ = fake quantization, or a
caller's residual function (decomposition-aware errors of LQ-LoRA, arXiv 2311.12023). An option a
layer cannot take (a GGUF type whose block does not divide the layer's rows, docs/gguf.md) costs
+inf: ``allowed()`` is the finite mask, and the average-bit range counts only allowed options. Tables
are saved as safetensors (atomic write) keyed by model name, space hash and kind, and carry a
fingerprint of the weights, so a cached table never serves other weights, and a SHA-256 of their
content, so a truncated or edited file is detected, reported and rebuilt (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coalora.cachefile import get_or_compute, parse_safetensors
from coalora.io import atomic_write_bytes
from coalora.quant.config import LayerOption, QuantConfig, QuantSpace, option_from_key
from coalora.quant.nf import fake_quantize, quantization_errors

log = logging.getLogger(__name__)

TABLE_VERSION = "1"


def _row_min(x: Tensor) -> Tensor:
    return x.min(dim=1).values


def _row_max(x: Tensor) -> Tensor:
    return x.max(dim=1).values


@dataclass
class ErrorTable:
    """costs[i, k]: error of layer ``names[i]`` under ``options[k]`` (float64, (N, K))."""

    names: list[str]
    numels: list[int]
    options: list[LayerOption]
    costs: Tensor  # (N, K) float64; +inf = the layer cannot take the option
    kind: str = "mse"
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.costs = torch.as_tensor(self.costs, dtype=torch.float64)
        n, k = len(self.names), len(self.options)
        if tuple(self.costs.shape) != (n, k):
            raise ValueError(f"costs has shape {tuple(self.costs.shape)}; expected ({n}, {k})")
        if len(self.numels) != n:
            raise ValueError(f"{len(self.numels)} numels for {n} layers")
        if bool(torch.isnan(self.costs).any()) or bool((self.costs == -math.inf).any()):
            raise ValueError("error table has NaN or -inf costs")
        if n and not bool(self.allowed().any(dim=1).all()):
            bad = [self.names[i] for i in (~self.allowed().any(dim=1)).nonzero()[:, 0].tolist()]
            raise ValueError(f"error table: no option allowed for layer(s) {bad[:3]}")

    def allowed(self) -> Tensor:
        """(N, K) bool: the options each layer can take (a finite cost)."""
        return torch.isfinite(self.costs)

    def storage_bits(self) -> np.ndarray:
        return np.array([qc.storage_bits() for qc in self.options])  # (K,)

    def _average_bits(self, pick) -> float:
        bits = torch.as_tensor(self.storage_bits(), dtype=torch.float64)[None, :]  # (1, K)
        inf = torch.full_like(self.costs, math.inf)
        per_layer = pick(torch.where(self.allowed(), bits, inf if pick is _row_min else -inf))
        numels = torch.tensor(self.numels, dtype=torch.float64)
        return float((per_layer * numels).sum() / numels.sum())

    def min_average_bits(self) -> float:
        """Average bits when every layer takes its lightest allowed option."""
        return self._average_bits(_row_min)

    def max_average_bits(self) -> float:
        return self._average_bits(_row_max)

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

    def _content_digest(self, meta: dict[str, str]) -> str:
        """SHA-256 over the tensors and every metadata field except the digest itself."""
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in sorted(meta.items()) if k != "sha256"}).encode())
        h.update(self.costs.contiguous().numpy().tobytes())
        h.update(np.asarray(self.numels, dtype=np.int64).tobytes())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        """A safetensors file (costs, numels) whose metadata holds the layout and a SHA-256."""
        from safetensors.torch import save

        meta = {
            "version": TABLE_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "names": json.dumps(self.names),
            "options": json.dumps([qc.key for qc in self.options]),
        }
        meta["sha256"] = self._content_digest(meta)
        tensors = {
            "costs": self.costs.contiguous(),
            "numels": torch.tensor(self.numels, dtype=torch.int64),
        }
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(
        cls, data: bytes, source: str = "error table", require_checksum: bool = True
    ) -> ErrorTable:
        """Parse :meth:`to_bytes` output; ``ValueError`` naming ``source`` when the bytes are
        truncated, not a table, of another version, or fail the SHA-256 check (a table without
        a checksum, from an older coalora, is accepted only with ``require_checksum=False``)."""
        where = f"{source}: " if source else ""
        try:
            meta, tensors = parse_safetensors(data, "error table")
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        if meta.get("version") != TABLE_VERSION:
            raise ValueError(
                f"{where}error table version {meta.get('version')!r}, expected {TABLE_VERSION}"
            )
        if "sha256" not in meta and require_checksum:
            raise ValueError(f"{where}no checksum (written by an older coalora)")
        try:
            table = cls(
                names=json.loads(meta["names"]),
                numels=[int(n) for n in tensors["numels"].tolist()],
                options=[option_from_key(k) for k in json.loads(meta["options"])],
                costs=tensors["costs"],
                kind=meta["kind"],
                fingerprint=meta.get("fingerprint", ""),
            )
        except Exception as e:
            raise ValueError(f"{where}inconsistent error table ({e})") from None
        if "sha256" in meta and table._content_digest(meta) != meta["sha256"]:
            raise ValueError(f"{where}SHA-256 does not match the content (modified?)")
        return table

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, require_checksum: bool = False) -> ErrorTable:
        """A table file written by :meth:`save`; its checksum is verified when it has one."""
        return cls.from_bytes(Path(path).read_bytes(), str(path), require_checksum)


def weights_fingerprint(
    weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor] | None = None
) -> str:
    """Cheap content hash (names, shapes, Σ|w|, Σw²) so a cached table never serves other weights."""
    h = hashlib.sha1()
    with one_thread():
        for src in (weights, fisher or {}):
            for name, w in src.items():
                w = w.detach().double()
                l1, l2 = w.abs().sum().item(), w.square().sum().item()
                h.update(f"{name}:{tuple(w.shape)}:{l1:.12e}:{l2:.12e};".encode())
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
    with one_thread():
        costs = _error_rows(weights, options, fisher, residual_fn)
    return ErrorTable(
        names=list(weights),
        numels=[int(W.numel()) for W in weights.values()],
        options=options,
        costs=costs,
        kind=kind,
        fingerprint=weights_fingerprint(weights, fisher),
    )


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: torch splits a CPU sum into per-thread partial sums, so the last bits
    of every error (and then near-tie allocations) would depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def table_workers() -> int:
    """Threads that build an error table: ``COALORA_TABLE_WORKERS``, else 2 on machines with at
    least two cores. Each layer is computed whole by one thread with one intra-op thread, so the
    table is bit-identical for any number of workers (docs/quantization.md, "Error tables")."""
    env = os.environ.get("COALORA_TABLE_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"COALORA_TABLE_WORKERS={env!r} must be an integer >= 1") from None
        if n < 1:
            raise ValueError(f"COALORA_TABLE_WORKERS={env!r} must be an integer >= 1")
        return n
    return min(2, os.cpu_count() or 1)


def _error_row(name, W, options, fisher, residual_fn) -> Tensor:
    # One intra-op thread in *this* thread too: OpenMP's thread count is per calling thread, so a
    # worker thread would otherwise start with the process default (see ``one_thread``).
    torch.set_num_threads(1)
    F = None
    if fisher is not None:
        if name not in fisher:
            raise ValueError(f"fisher has no entry for layer {name!r}")
        F = fisher[name].to(torch.float32)
        if F.shape != W.shape:
            raise ValueError(
                f"fisher[{name!r}] has shape {tuple(F.shape)}; weight has {tuple(W.shape)}"
            )
    if residual_fn is None and all(isinstance(qc, QuantConfig) for qc in options):
        return quantization_errors(W, options, F)
    residual_fn = residual_fn or fake_quantize
    Wf = W.detach().to(torch.float32)
    row = torch.empty(len(options), dtype=torch.float64)
    for k, qc in enumerate(options):
        if hasattr(qc, "allows") and not qc.allows(W.shape[-1]):
            row[k] = math.inf  # the row rule: the allocation never picks it
            continue
        err = (Wf - residual_fn(Wf, qc).to(torch.float32)).square()
        row[k] = (err if F is None else err * F).sum(dtype=torch.float64)
    return row


def _error_rows(weights, options, fisher, residual_fn, workers: int | None = None) -> Tensor:
    """(N, K) errors. Layers are spread over ``workers`` threads (torch releases the GIL inside
    its kernels); a caller's ``residual_fn`` runs on one thread, as it may not be thread-safe."""
    n, t0, next_report = len(weights), time.perf_counter(), 10.0
    workers = 1 if residual_fn is not None else (workers or table_workers())
    log.info("error table: %d layers x %d options (%d threads) ...", n, len(options), workers)
    items = list(weights.items())
    rows: list[Tensor | None] = [None] * n

    def report(done: int) -> None:
        nonlocal next_report
        elapsed = time.perf_counter() - t0
        if done < n and elapsed >= next_report:  # a line every ~10 s of work, also in train.log
            eta = elapsed / done * (n - done)
            log.info("error table: %d/%d layers (%.0fs, ETA %.0fs)", done, n, elapsed, eta)
            next_report = elapsed + 10.0

    if workers == 1:
        for i, (name, W) in enumerate(items):
            rows[i] = _error_row(name, W, options, fisher, residual_fn)
            report(i + 1)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="error-table") as pool:
            futures = {
                pool.submit(_error_row, name, W, options, fisher, residual_fn): i
                for i, (name, W) in enumerate(items)
            }
            for done, fut in enumerate(as_completed(futures), start=1):
                rows[futures[fut]] = fut.result()
                report(done)
    log.info("error table: %d layers done in %.1fs", n, time.perf_counter() - t0)
    return torch.stack(rows)  # (N, K)


def table_path(cache_dir: str | Path, model_name: str, space: QuantSpace, kind: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"
    return Path(cache_dir) / f"errors-{slug}-{kind}-{space.digest()}.safetensors"


def cached_table(
    path: Path | None,
    names: list[str],
    fingerprint: str,
    build: Callable[[], ErrorTable],
) -> ErrorTable:
    """The table at ``path`` if it verifies and matches (``names``, ``fingerprint``), else
    ``build()`` written there. Concurrent callers build once (file lock); a corrupt or stale file
    is reported with a warning naming it and rewritten; an unwritable cache only warns."""
    if path is None:
        return build()

    def decode(data: bytes) -> ErrorTable:
        table = ErrorTable.from_bytes(data, source="")  # the caller's warning names the file
        if table.names != names:
            raise ValueError("its layers differ from the model's")
        if table.fingerprint != fingerprint:
            raise ValueError("it was computed for other weights")
        return table

    return get_or_compute(
        path, build, ErrorTable.to_bytes, decode, what="error table", framed=False
    )


def cached_error_table(
    weights: Mapping[str, Tensor],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    fisher: Mapping[str, Tensor] | None = None,
    residual_fn: Callable[[Tensor, QuantConfig], Tensor] | None = None,
    kind: str | None = None,
) -> ErrorTable:
    """``build_error_table`` through a disk cache (:func:`cached_table`).

    The file is keyed by ``model_name``, the space's digest and ``kind`` (default mse / fisher /
    custom). With a ``residual_fn`` pass a ``kind`` naming its settings (e.g. ``"lq-r64"``): the
    function itself is not part of the key.
    """
    kind = kind or ("custom" if residual_fn else "fisher" if fisher is not None else "mse")
    path = None if cache_dir is None else table_path(cache_dir, model_name, space, kind)
    table = cached_table(
        path,
        list(weights),
        weights_fingerprint(weights, fisher),
        lambda: build_error_table(weights, space, fisher, residual_fn, kind),
    )
    return table.restrict(space)


__all__ = [
    "ErrorTable",
    "build_error_table",
    "cached_error_table",
    "cached_table",
    "one_thread",
    "table_path",
    "table_workers",
    "weights_fingerprint",
]
