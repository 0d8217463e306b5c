"""Decomposition-aware error tables for LQ-LoRA's budget allocation.

LQ-LoRA (Guo et al., arXiv 2311.12023) §3.2-3.3 (docs/quantization.md, "Allocation"): the
integer program's cost of option ``c`` for matrix ``i`` is the error left *after* the low-rank +
quantized decomposition, ``‖D ⊙ (W_i − (Q + L1 L2))‖²_F`` (``D = √Fisher`` or 1), not the plain
quantization error.  That means one decomposition per (layer, option): 432 × 36 on MiniLM.

Two cost controls (measured in docs/benchmarks.md, "Baselines at step 0"):

* **few iterations** for the table (``table_iters``, default 2; the model itself uses ``iters``).
  The first SVD does not depend on the option, later ones do;
* **dominance pruning** (``prune``): per layer, only options on the *plain-quantization* Pareto
  front (no other option has ≤ bits and ≤ error) are decomposed, ~100 of 432 on MiniLM.  A pruned
  option ``k`` is dominated by a kept option ``k'`` (bits ≤, plain error ≤); it gets the cost
  ``max(plain_k, lq_k' · (1 + 1e-6))``, so it is never strictly better than an option the solver
  could take instead at no more bits.  The assumption is that the decomposition does not reorder
  options a plain quantizer ranks as dominated; LQ errors are ≤ plain errors in practice, so the
  pruned options keep a (pessimistic) plain cost.

Tables are cached on disk like ``coalora.quant.allocation.cached_error_table`` (same file format,
keyed by model name, space digest and a ``kind`` naming rank, iterations and weighting).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coalora.quant import ErrorTable, QuantSpace, fake_quantize, prune_dominated
from coalora.quant.error_table import cached_table, table_path, weights_fingerprint
from coalora.quant.lq import lq_decompose

log = logging.getLogger(__name__)

__all__ = ["cached_lq_error_table", "lq_error_table", "lq_table_kind"]


def lq_table_kind(
    rank: int,
    iters: int,
    *,
    randomized: bool = True,
    weighted_error: bool = False,
    weighted_svd: str | None = None,
    prune: bool = True,
) -> str:
    """File-name tag of a table: everything that changes its values besides weights/space."""
    kind = f"lq-r{rank}-i{iters}" + ("" if randomized else "-fullsvd")
    if weighted_error:
        kind += "-fw"
    if weighted_svd:
        kind += f"-fd{weighted_svd}"
    return kind + ("-pruned" if prune else "")


@torch.no_grad()
def lq_error_table(
    weights: Mapping[str, Tensor],
    space: QuantSpace,
    rank: int,
    iters: int = 2,
    *,
    randomized: bool = True,
    oversampling: int = 10,
    fisher: Mapping[str, Tensor] | None = None,
    weighted_error: bool = False,
    weighted_svd: str | None = None,
    plain: ErrorTable | None = None,
    seed: int = 0,
    kind: str | None = None,
) -> ErrorTable:
    """Costs ``‖D ⊙ (W − Q − L1 L2)‖²`` of every (layer, option), best of ``iters`` alternations.

    Args:
        weights: target name -> full-precision weight (d_out, d_in).
        space: the option grid (columns in ``space.options()`` order).
        rank / iters / randomized / oversampling / seed: passed to ``lq_decompose``.
        fisher: diagonal Fisher per layer; used for the error when ``weighted_error`` and for the
            SVD (row/col/two-sided heuristic named by ``weighted_svd``) when that is set.
        plain: the plain-quantization table of the same weights/space (same weighting); when
            given, only its per-layer non-dominated options are decomposed (module docstring).
    """
    options = space.options()
    bits = np.array([qc.storage_bits() for qc in options])  # (K,)
    if plain is not None:
        plain = plain.restrict(space)
        if plain.names != list(weights):
            raise ValueError("plain error table layers do not match the weights")
    if (weighted_error or weighted_svd) and fisher is None:
        raise ValueError("a Fisher-weighted LQ table needs the Fisher diagonal")
    rows = []
    t0 = time.perf_counter()
    n_decomp = 0
    for i, (name, w) in enumerate(weights.items()):
        w = w.detach().to(torch.float32)
        f = None if fisher is None else fisher[name].to(w)
        err_scale = f if weighted_error else None
        svd_fisher = f if weighted_svd else None
        heuristic = weighted_svd or "none"
        if plain is None:
            kept = np.arange(len(options))
        else:
            kept = prune_dominated(plain.costs[i : i + 1].numpy(), bits[None, :])[0]
        row = torch.empty(len(options), dtype=torch.float64)
        for k in kept.tolist():
            qc = options[k]
            res = lq_decompose(
                w,
                rank,
                lambda m, qc=qc: fake_quantize(m, qc),
                iters=iters,
                randomized=randomized,
                oversampling=oversampling,
                fisher=svd_fisher,
                heuristic=heuristic,
                seed=seed,
            )
            resid = (w - res.q - res.l1 @ res.l2).square()  # (d_out, d_in)
            row[k] = (resid if err_scale is None else resid * err_scale).sum(dtype=torch.float64)
            n_decomp += 1
        if plain is not None:
            _fill_pruned(row, kept, bits, plain.costs[i])
        rows.append(row)
        log.info(
            "lq table: layer %d/%d (%s), %d options, %.0fs",
            i + 1,
            len(weights),
            name,
            len(kept),
            time.perf_counter() - t0,
        )
    return ErrorTable(
        names=list(weights),
        numels=[int(w.numel()) for w in weights.values()],
        options=options,
        costs=torch.stack(rows),
        kind=kind or "lq",
        fingerprint=weights_fingerprint(
            weights, fisher if weighted_error or weighted_svd else None
        ),
    )


def _fill_pruned(row: Tensor, kept: np.ndarray, bits: np.ndarray, plain_row: Tensor) -> None:
    """Costs of the options pruned from ``row`` (in place): never below their dominator's.

    ``kept`` is sorted by bits ascending with plain cost strictly decreasing, so the dominator of
    a pruned option is the last kept option with bits ≤ its bits.
    """
    kept_bits = bits[kept]  # ascending
    is_kept = np.zeros(len(bits), dtype=bool)
    is_kept[kept] = True
    for k in np.nonzero(~is_kept)[0].tolist():
        pos = int(np.searchsorted(kept_bits, bits[k], side="right")) - 1
        dominated_by = float(row[kept[max(pos, 0)]])
        row[k] = max(float(plain_row[k]), dominated_by * (1.0 + 1e-6))


def cached_lq_error_table(
    weights: Mapping[str, Tensor],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    rank: int,
    iters: int = 2,
    **kwargs,
) -> tuple[ErrorTable, float]:
    """``lq_error_table`` through the on-disk cache; returns ``(table, seconds spent building)``
    (0 when the cached file matched the weights)."""
    kind = lq_table_kind(
        rank,
        iters,
        randomized=kwargs.get("randomized", True),
        weighted_error=kwargs.get("weighted_error", False),
        weighted_svd=kwargs.get("weighted_svd"),
        prune=kwargs.get("plain") is not None,
    )
    fisher = kwargs.get("fisher")
    weighted = kwargs.get("weighted_error") or kwargs.get("weighted_svd")
    fingerprint = weights_fingerprint(weights, fisher if weighted else None)
    path = None if cache_dir is None else table_path(cache_dir, model_name, space, kind)
    spent = [0.0]

    def build() -> ErrorTable:
        t0 = time.perf_counter()
        table = lq_error_table(weights, space, rank, iters, kind=kind, **kwargs)
        spent[0] = time.perf_counter() - t0
        return table

    # checksummed, locked and self-healing like every quant cache (docs/reliability.md)
    table = cached_table(path, list(weights), fingerprint, build)
    return table.restrict(space), spent[0]
