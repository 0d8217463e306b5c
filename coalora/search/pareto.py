"""Pareto utilities for the (average bits, loss) trade-off, all objectives MINIMISED.

* `non_dominated_mask` / `non_dominated`: the first non-dominated front.
* `segmented_selection`: CoA-LoRA's segment-wise Pareto selection (arXiv 2509.25214): split
  the bits axis into U contiguous segments and keep every segment's own non-dominated set,
  so the training set covers the whole bit range instead of the global front's favoured part.
  Bins are half-open ``[e_i, e_{i+1})`` except the last, which is closed.
* `hypervolume_2d`: exact dominated area w.r.t. a reference point (minimisation).
* `infer_reference`: a reference point slightly worse than the worst observation
  (max + 0.1 * range). A reference of [0, 0] for negated objectives is dominated by no
  observation, which leaves the EHVI box partitioning empty.

The mask and the area come from BoTorch (`is_non_dominated`, `DominatedPartitioning`, which
maximise: objectives are negated on the way in); only the segmenting is written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from coalora.errors import ConfigError

REFERENCE_SCALE = 0.1


def _as_2d(Y: Tensor | Sequence) -> Tensor:
    Y = torch.as_tensor(Y, dtype=torch.float64)
    if Y.dim() != 2:
        raise ConfigError(
            f"objective table must be 2-D (n_points, n_objectives), got shape {tuple(Y.shape)}"
        )
    return Y


def non_dominated_mask(Y: Tensor | Sequence) -> Tensor:
    """Boolean mask (n,) of points no other point dominates; all columns minimised.

    ``a`` dominates ``b`` when a <= b everywhere and a < b somewhere, so duplicates are all kept.
    """
    Y = _as_2d(Y)  # (n, m)
    # botorch loads on first use: training reads configsets without the search stack
    from botorch.utils.multi_objective.pareto import is_non_dominated

    return is_non_dominated(Y, maximize=False, deduplicate=False)


def non_dominated(Y: Tensor | Sequence) -> Tensor:
    """Indices (ascending) of the non-dominated points of ``Y`` (minimisation)."""
    return torch.nonzero(non_dominated_mask(Y)).flatten()


def segment_edges(bits_min: float, bits_max: float, segments: int) -> Tensor:
    """``segments + 1`` equally spaced edges covering [bits_min, bits_max]."""
    if not isinstance(segments, int) or isinstance(segments, bool) or segments <= 0:
        raise ConfigError(f"search segments must be a positive integer, got {segments!r}")
    if not bits_max >= bits_min:
        raise ConfigError(f"segment range is empty: bits_min={bits_min} > bits_max={bits_max}")
    return torch.linspace(float(bits_min), float(bits_max), segments + 1, dtype=torch.float64)


def segmented_selection(
    bits: Tensor | Sequence[float],
    loss: Tensor | Sequence[float],
    edges: Tensor | Sequence[float] | None = None,
    *,
    bits_range: tuple[float, float] | None = None,
    segments: int | None = None,
) -> Tensor:
    """Indices (ascending) of the points that are non-dominated within their bits segment.

    Give either ``edges`` (strictly increasing, >= 2 values) or ``segments`` (with optional
    ``bits_range``, default the observed [min, max] of ``bits``). Points outside the edges are never
    selected. Bins are ``[e_i, e_{i+1})`` except the last, ``[e_{U-1}, e_U]``.
    """
    bits = torch.as_tensor(bits, dtype=torch.float64).flatten().contiguous()
    loss = torch.as_tensor(loss, dtype=torch.float64).flatten().contiguous()
    if bits.shape != loss.shape:
        raise ConfigError(
            f"bits and loss must have the same length, got {bits.numel()} and {loss.numel()}"
        )
    if edges is None:
        if segments is None:
            raise ConfigError("segmented_selection needs `edges` or `segments`")
        if bits.numel() == 0 and bits_range is None:
            segment_edges(0.0, 0.0, segments)  # still validate `segments`
            return torch.zeros(0, dtype=torch.long)
        lo, hi = bits_range if bits_range is not None else (bits.min().item(), bits.max().item())
        edges = segment_edges(lo, hi, segments)
    else:
        if segments is not None or bits_range is not None:
            raise ConfigError("give either `edges` or (`bits_range`, `segments`), not both")
        edges = torch.as_tensor(edges, dtype=torch.float64).flatten()
        if edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
            raise ConfigError(
                f"segment edges must be >= 2 strictly increasing values, got {edges.tolist()}"
            )
    n_bins = edges.numel() - 1
    # bucketize(right=True) - 1 gives the bin i with edges[i] <= b < edges[i+1]
    bin_of = torch.bucketize(bits, edges, right=True) - 1  # (n,)
    bin_of[bits == edges[-1]] = n_bins - 1  # the last bin is closed
    selected = []
    for b in range(n_bins):
        members = torch.nonzero(bin_of == b).flatten()
        if members.numel() == 0:
            continue
        Y = torch.stack([bits[members], loss[members]], dim=1)  # (k, 2)
        selected.append(members[non_dominated_mask(Y)])
    if not selected:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(selected).sort().values


def hypervolume_2d(points: Tensor | Sequence, ref: Tensor | Sequence[float]) -> float:
    """Exact area dominated by ``points`` (n, 2) and bounded by ``ref`` (2,); both minimised.

    Points that do not strictly dominate ``ref`` in both objectives add nothing.
    """
    P = _as_2d(points)
    ref = torch.as_tensor(ref, dtype=torch.float64).flatten()
    if P.shape[1] != 2 or ref.numel() != 2:
        raise ConfigError(
            f"hypervolume_2d needs (n, 2) points and a 2-vector ref, got {tuple(P.shape)}, {ref.numel()}"
        )
    P = P[(P < ref).all(1)]
    if P.shape[0] == 0:
        return 0.0
    # botorch loads on first use: training reads configsets without the search stack
    from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning

    return float(DominatedPartitioning(ref_point=-ref, Y=-P).compute_hypervolume())


def infer_reference(Y: Tensor | Sequence, scale: float = REFERENCE_SCALE) -> Tensor:
    """Reference point (m,) strictly worse than every observation: ``max + scale * range``.

    A column with zero range uses ``scale * max(|max|, 1)`` as its margin, so the result is always
    strictly dominated by all observations (never the degenerate [0, 0] of the reference code).
    """
    Y = _as_2d(Y)
    if Y.shape[0] == 0:
        raise ConfigError("cannot infer a reference point from zero observations")
    if not bool(torch.isfinite(Y).all()):
        raise ConfigError("cannot infer a reference point: objectives contain NaN or inf")
    hi, lo = Y.max(0).values, Y.min(0).values
    span = hi - lo
    span = torch.where(span > 0, span, hi.abs().clamp_min(1.0))
    return hi + scale * span
