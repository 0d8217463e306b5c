"""Fast Walsh-Hadamard transform: equals the dense (block-diagonal) Hadamard, orthonormal, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from coalora.adapters.wht import hadamard_block_size, hadamard_matrix, wht


def _dense_reference(n: int) -> torch.Tensor:
    """I_K ⊗ H_b/√b built from scipy's Sylvester matrix (independent of our butterfly)."""
    b = hadamard_block_size(n)
    hb = torch.from_numpy(scipy.linalg.hadamard(b, dtype=np.float64)) / np.sqrt(b)
    return torch.block_diag(*([hb] * (n // b)))


@pytest.mark.parametrize(
    ("n", "block"),
    [(1, 1), (2, 2), (12, 4), (384, 128), (768, 256), (1024, 1024), (1536, 512), (3072, 1024)],
)
def test_block_size(n: int, block: int) -> None:
    assert hadamard_block_size(n) == block


@pytest.mark.parametrize("n", [1, 2, 4, 16, 256, 1024, 4096])
def test_power_of_two_matches_scipy(n: int) -> None:
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = torch.from_numpy(scipy.linalg.hadamard(n, dtype=np.float64)) / np.sqrt(n)
    torch.testing.assert_close(wht(x), x @ h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [6, 12, 384, 768, 1536, 3072])
def test_non_power_of_two_is_block_diagonal(n: int) -> None:
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(wht(x), x @ _dense_reference(n), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [8, 384, 1536])
def test_hadamard_matrix_is_symmetric_orthonormal(n: int) -> None:
    h = hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(h, _dense_reference(n), rtol=0, atol=1e-14)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [64, 384, 768, 1024, 1536, 3072, 4096])
def test_self_inverse_and_norm_preserving(n: int) -> None:
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    y = wht(x)
    torch.testing.assert_close(wht(y), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_dtype_and_shape_preserved() -> None:
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    y = wht(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("n", [8, 12, 24])
def test_gradcheck(n: int) -> None:
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(wht, (x,))
    assert torch.autograd.gradgradcheck(wht, (x,))


def test_rejects_integer_input() -> None:
    with pytest.raises(TypeError):
        wht(torch.ones(4, dtype=torch.long))
