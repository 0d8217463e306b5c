"""Fast orthonormal Walsh-Hadamard transform over the last dimension (pure torch).

Used by the QWHA adapter (QWHA, arXiv 2509.17428, Eq. 4 and Eqs. 10-12): ΔW = F·Ĥ with Ĥ the
orthonormal Walsh-Hadamard matrix over the input dimension.

Sizes that are not a power of two
---------------------------------
For ``n = 2^m · K`` with ``K`` odd we use the **block-diagonal** Hadamard matrix
``Ĥ_n = I_K ⊗ Ĥ_{2^m}``: the last dimension is cut into ``K`` contiguous blocks of the largest
power of two ``b = 2^m`` that divides ``n``, and each block gets the orthonormal Sylvester transform
``H_b / √b``.  Examples: 384 = 3·128, 768 = 3·256, 1536 = 3·512, 3072 = 3·1024; 1024 and 4096 are
single blocks.  Consequences:

* Ĥ is square, symmetric and orthonormal on ``n`` (ĤĤ = I), so the transform is exactly its own
  inverse and its own transpose — the backward pass is the same transform.
* No zero padding (a padded transform would not be square-orthonormal on ``n``) and no stored
  Sloane matrices (the QWHA reference uses H_K ⊗ H_{2^m} with a stored Hadamard H_K, which is not
  symmetric for K = 12, and needs ``n / K`` to be a power of two for K in a fixed list).
* The price: for ``K > 1`` each basis vector is supported on one block of ``b`` inputs instead of all
  ``n``.  The adapter's span is unaffected (Ĥ is still an invertible basis of R^n), only the shape
  of the individual basis vectors changes.

Cost: ``O(n log b)`` additions per row, ``log2(b)`` vectorised butterfly stages (a loop over stages,
no loop over elements).  Ordering is Sylvester/natural order, i.e. ``scipy.linalg.hadamard``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["hadamard_block_size", "wht", "hadamard_matrix"]


def hadamard_block_size(n: int) -> int:
    """Largest power of two dividing ``n`` (the block size of the block-diagonal Ĥ_n)."""
    if n < 1:
        raise ValueError(f"transform length must be >= 1, got {n}")
    return n & (-n)


def _butterfly(x: Tensor, block: int) -> Tensor:
    """Unnormalised Sylvester WHT on contiguous blocks of size ``block`` of the last dim."""
    lead = x.shape[:-1]
    n = x.shape[-1]
    y = x.reshape(-1, n)  # (M, n)
    h = 1
    while h < block:
        # (M, n/(2h), 2, h): pairs (j, j+h) inside every group of 2h -> (a + c, a - c)
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, c = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + c, a - c), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def _wht_impl(x: Tensor) -> Tensor:
    n = x.shape[-1]
    block = hadamard_block_size(n)
    if block == 1:
        return x.clone()
    return _butterfly(x, block) * (1.0 / math.sqrt(block))


class _WHT(torch.autograd.Function):
    """y = x Ĥ with Ĥ symmetric orthonormal, so dL/dx = (dL/dy) Ĥ: the same transform."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return _wht_impl(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        # Calling .apply keeps the backward itself differentiable (double backward works).
        return _WHT.apply(grad)


def wht(x: Tensor) -> Tensor:
    """Orthonormal (block-diagonal) Walsh-Hadamard transform over the last dimension.

    Returns ``x @ Ĥ_n`` (= ``x @ Ĥ_nᵀ``, Ĥ is symmetric) for ``n = x.shape[-1]``; ``wht(wht(x)) == x``
    up to rounding.  Differentiable; works for any floating dtype and any leading shape.
    """
    if not x.is_floating_point():
        raise TypeError(f"wht expects a floating tensor, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError("wht: last dimension is empty")
    return _WHT.apply(x.contiguous())


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The dense orthonormal Ĥ_n used by :func:`wht` (``I_K ⊗ H_b/√b``), shape ``[n, n]``.

    For tests and small analyses only: ``O(n²)`` memory.
    """
    eye = torch.eye(n, dtype=dtype, device=device)
    return _wht_impl(eye)
