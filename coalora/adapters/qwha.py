"""QWHA: the Walsh-Hadamard adapter wrapping a frozen (quantized) base linear.

QWHA (arXiv 2509.17428), Eq. 4: ``ΔW = F Ĥ⁻¹`` with a single transform over the input dimension and
a sparse ``F`` whose ``p`` non-zeros are the only trainable parameters.  Here

    ΔW = s · F · Ĥ            (d_out, d_in);  Ĥ orthonormal, symmetric (so Ĥ⁻¹ = Ĥ)
    F[indices[0], indices[1]] = spectrum     (p trainable values at fixed positions)
    y  = base_layer(x) + x ΔWᵀ               (the base bias is kept)

Ĥ is the block-diagonal Walsh-Hadamard matrix of :mod:`coalora.adapters.wht`.  The default
``p = r·(d_in + d_out)`` matches LoRA rank ``r``'s parameter count (QWHA Table 10).

Compute choice: ΔW is materialised once per forward (scatter into a dense ``F``, then ``wht`` over
its rows: ``O(d_out·d_in·log d_in)``), then one matmul with ``x``.  Transforming ``x`` instead
(``(x Ĥ) Fᵀ``) costs ``O(N·d_in·log d_in)`` for ``N`` tokens and needs the same dense matmul, so
materialising ΔW is cheaper whenever ``N > d_out`` — every training batch here — and keeps the cost
independent of the batch size.  A sparse matmul does not pay off on CPU at these densities
(``p / (d_out·d_in) = r·(1/d_in + 1/d_out)``, 4% at r = 8 on MiniLM).

Scale: unlike the reference code (``s/√d_out`` times an unnormalised inverse, effective scale
``s/√(d_in·d_out)``), ``scaling`` here multiplies the orthonormal ΔW directly.  Under Adam, ``s`` acts
as a learning-rate multiplier for ΔW (the stored spectrum is ``values / s``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from coalora.adapters.base import AdapterLayer
from coalora.adapters.wht import wht
from coalora.errors import ConfigError

__all__ = ["WHTAdapterLinear", "n_coeffs_for_rank", "random_indices"]


def n_coeffs_for_rank(rank: int, d_in: int, d_out: int) -> int:
    """Spectrum size with the parameter count of a rank-``rank`` LoRA: ``r·(d_in + d_out)``."""
    if rank <= 0:
        raise ConfigError(f"method.rank must be a positive integer, got {rank}")
    return min(rank * (d_in + d_out), d_in * d_out)


def random_indices(d_out: int, d_in: int, n_coeffs: int, seed: int = 777) -> Tensor:
    """``n_coeffs`` distinct random positions of a ``[d_out, d_in]`` matrix, as ``[2, p]`` int64.

    Row 0 = output channel, row 1 = transform index; sorted channel-major.  This is the
    un-initialised default (the reference's seeded random permutation); QWHA's initialisation
    (:mod:`coalora.adapters.qwha_init`) replaces it.
    """
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:n_coeffs].sort().values  # (p,)
    return torch.stack((flat // d_in, flat % d_in))  # (2, p)


def _check_indices(indices: Tensor, d_out: int, d_in: int) -> Tensor:
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ValueError(f"indices must have shape [2, p], got {tuple(indices.shape)}")
    indices = indices.to(torch.long)
    if indices.numel() and (
        int(indices[0].min()) < 0
        or int(indices[0].max()) >= d_out
        or int(indices[1].min()) < 0
        or int(indices[1].max()) >= d_in
    ):
        raise ValueError(f"indices out of range for a [{d_out}, {d_in}] spectrum")
    flat = indices[0] * d_in + indices[1]
    if flat.unique().numel() != flat.numel():
        raise ValueError("indices contain duplicate positions")
    return indices


class WHTAdapterLinear(AdapterLayer):
    """``base_layer`` (frozen) plus the QWHA delta ``x (s·F·Ĥ)ᵀ``.

    Args:
        base_layer: ``nn.Linear`` / ``QuantLinear`` with ``in_features``/``out_features``; frozen here.
        n_coeffs: number of trainable spectrum values ``p``; default ``rank·(d_in + d_out)``.
        scaling: ``s`` in ``ΔW = s·F·Ĥ``.
        indices: ``[2, p]`` fixed positions (row 0 output channel, row 1 transform index);
            default: ``p`` seeded random distinct positions.
        seed: seed of the default random positions.
        rank: used only to derive ``n_coeffs`` when it is not given.

    The spectrum starts at zero, so a fresh adapter reproduces the base output exactly.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        n_coeffs: int | None = None,
        scaling: float = 1.0,
        indices: Tensor | None = None,
        seed: int = 777,
        rank: int | None = None,
    ) -> None:
        super().__init__(base_layer)
        d_in, d_out = self.in_features, self.out_features
        if indices is not None:
            indices = _check_indices(indices, d_out, d_in)
            if n_coeffs is not None and n_coeffs != indices.shape[1]:
                raise ValueError(
                    f"n_coeffs={n_coeffs} but indices hold {indices.shape[1]} positions"
                )
            n_coeffs = indices.shape[1]
        elif n_coeffs is None:
            if rank is None:
                raise ConfigError("QWHA needs method.n_coeffs or method.rank")
            n_coeffs = n_coeffs_for_rank(rank, d_in, d_out)
        if not 0 < n_coeffs <= d_in * d_out:
            raise ConfigError(
                f"method.n_coeffs must be in [1, d_in*d_out = {d_in * d_out}], got {n_coeffs}"
            )
        if indices is None:
            indices = random_indices(d_out, d_in, n_coeffs, seed)
        self.n_coeffs = int(n_coeffs)
        self.scaling = float(scaling)
        self.register_buffer("indices", indices.clone())  # (2, p) int64, saved in state_dict
        self.spectrum = nn.Parameter(torch.zeros(self.n_coeffs))  # (p,)

    # -- the delta -------------------------------------------------------------------------
    def coefficient_matrix(self) -> Tensor:
        """Dense ``F`` (d_out, d_in) with the spectrum scattered at ``indices`` (differentiable)."""
        f = self.spectrum.new_zeros(self.out_features, self.in_features)  # (d_out, d_in)
        return f.index_put((self.indices[0], self.indices[1]), self.spectrum)

    def delta_weight(self) -> Tensor:
        """Dense ``ΔW = s·F·Ĥ``, shape (d_out, d_in): what a merge/export adds to the base weight."""
        return wht(self.coefficient_matrix()) * self.scaling  # (d_out, d_in)

    def delta(self, x: Tensor) -> Tensor:
        return F.linear(x, self.delta_weight().to(x.dtype))  # (..., d_out)

    # -- parameters / initialisation -------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"spectrum": self.spectrum}

    @torch.no_grad()
    def set_coefficients(self, indices: Tensor, values: Tensor) -> None:
        """Load an initialisation: ``F[indices] = values`` in ΔW units (``ΔW = F_values·Ĥ``).

        Stores ``spectrum = values / s`` so that ``delta_weight()`` equals ``values`` scattered and
        transformed, independent of ``scaling``.  ``indices`` must keep the size ``p``.
        """
        indices = _check_indices(indices, self.out_features, self.in_features)
        if indices.shape[1] != self.n_coeffs or values.shape != (self.n_coeffs,):
            raise ValueError(
                f"expected {self.n_coeffs} positions/values, got {indices.shape[1]} and "
                f"{tuple(values.shape)}"
            )
        self.indices.copy_(indices.to(self.indices.device))
        self.spectrum.copy_(values.to(self.spectrum) / self.scaling)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, n_coeffs={self.n_coeffs}, "
            f"scaling={self.scaling}"
        )
