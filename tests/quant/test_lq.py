"""LQ-LoRA decomposition W ≈ Q + L1 L2: beats plain quantization, keeps the best iterate, LoRA init."""

from __future__ import annotations

import pytest
import torch

from coalora.quant.config import QuantConfig
from coalora.quant.lq import lora_init_from_lq, lowrank_factors, lq_decompose, lq_residual_fn
from coalora.quant.nf import fake_quantize


def _quantize(w: torch.Tensor, bits: int, block0: int = 64) -> torch.Tensor:
    """Our shared NF engine (NF-bits, 8-bit scales over blocks of ``block0``, fp32 constants)."""
    return fake_quantize(w, _qc(bits, block0))


def _qc(bits: int, block0: int = 64) -> QuantConfig:
    return QuantConfig(bits, 8, "fp32", block0, 256)


def _weight(d_out: int = 96, d_in: int = 128, seed: int = 0) -> torch.Tensor:
    """Pretrained-like weight: a decaying low-rank part plus heavy-tailed noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d_out, 16, generator=g)
    v = torch.randn(16, d_in, generator=g)
    low = (u * torch.logspace(0, -1, 16)) @ v / 16**0.5
    noise = torch.distributions.StudentT(4.0).sample((d_out, d_in)) * 0.3
    return (low + noise) * 0.05


def _frob(x: torch.Tensor) -> float:
    return float(x.norm())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decomposition_beats_plain_quantization(bits: int) -> None:
    torch.manual_seed(0)
    w = _weight()
    qfn = lambda m: _quantize(m, bits)  # noqa: E731
    l1, l2, q, errors = lq_decompose(w, rank=8, quantize_fn=qfn, iters=20)
    assert l1.shape == (96, 8) and l2.shape == (8, 128) and q.shape == w.shape
    kept = min(range(len(errors)), key=errors.__getitem__)
    assert errors[: kept + 1] == sorted(errors[: kept + 1], reverse=True)  # non-increasing
    assert kept >= len(errors) - 2  # stopped right after the first non-improvement
    resid = _frob(w - q - l1 @ l2)
    assert resid == pytest.approx(errors[kept], rel=1e-5)  # the returned iterate is the kept one
    assert resid <= _frob(w - qfn(w))


def test_keeps_best_iterate_when_error_increases() -> None:
    """A quantizer that gets worse on later calls: the result must be the earlier, better iterate."""
    w = _weight(seed=1)
    calls = []

    def worsening(m: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return _quantize(m, 3) + (0.0 if len(calls) < 3 else 0.05)

    l1, l2, q, errors = lq_decompose(w, rank=4, quantize_fn=worsening, iters=10, randomized=False)
    assert len(errors) == 3 and errors[2] > errors[1]
    assert _frob(w - q - l1 @ l2) == pytest.approx(errors[1], rel=1e-5)


def test_single_iteration_is_svd_then_quantize() -> None:
    """CoA-LoRA's baseline setting: iters = 1, deterministic SVD."""
    w = _weight(seed=2)
    l1, l2, q, errors = lq_decompose(w, 4, lambda m: _quantize(m, 2), iters=1, randomized=False)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(l1 @ l2, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q, _quantize(w - l1 @ l2, 2))
    assert len(errors) == 1


def test_factors_are_balanced_and_randomized_is_accurate() -> None:
    w = _weight(seed=3)
    l1, l2 = lowrank_factors(w, 8, randomized=False)
    torch.testing.assert_close(l1.T @ l1, l2 @ l2.T, rtol=1e-4, atol=1e-5)  # both = diag(S)
    r1, r2 = lowrank_factors(w, 8, randomized=True, oversampling=10)
    best = _frob(w - l1 @ l2)
    assert _frob(w - r1 @ r2) <= 1.05 * best


@pytest.mark.parametrize("heuristic", ["two-sided", "row", "col", "none"])
def test_fisher_weighted(heuristic: str) -> None:
    w = _weight(seed=4)
    g = torch.Generator().manual_seed(5)
    fisher = torch.rand(w.shape, generator=g) * torch.logspace(0, 2, w.shape[1])  # column-skewed
    qfn = lambda m: _quantize(m, 3)  # noqa: E731
    l1, l2, q, errors = lq_decompose(w, 8, qfn, iters=10, fisher=fisher, heuristic=heuristic)
    weighted = float((fisher.sqrt() * (w - q - l1 @ l2)).norm())
    assert weighted == pytest.approx(min(errors), rel=1e-5)
    assert weighted <= float((fisher.sqrt() * (w - qfn(w))).norm())


def test_lora_init_reproduces_lowrank() -> None:
    w = _weight(seed=6)
    l1, l2, _, _ = lq_decompose(w, 8, lambda m: _quantize(m, 4), iters=3)
    for scaling in (16 / 64, 2.0, 1.0):
        a, b = lora_init_from_lq(l1, l2, scaling)
        assert a.shape == (8, 128) and b.shape == (96, 8)
        torch.testing.assert_close(scaling * b @ a, l1 @ l2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_residual_fn_uses_nf_engine(bits: int) -> None:
    w = _weight(seed=7)
    w_hat = lq_residual_fn(rank=8, iters=5)(w, _qc(bits))
    assert w_hat.shape == w.shape
    assert _frob(w - w_hat) <= _frob(w - _quantize(w, bits))


def test_residual_fn_with_injected_quantizer() -> None:
    w = _weight(seed=7)
    seen = []
    fn = lq_residual_fn(rank=4, iters=2, quantize=lambda m, c: seen.append(c) or _quantize(m, c))
    fn(w, 3)
    assert seen and set(seen) == {3}


def test_validation() -> None:
    w = _weight()
    with pytest.raises(ValueError, match="rank"):
        lq_decompose(w, 0, lambda m: m)
    with pytest.raises(ValueError, match="heuristic"):
        lq_decompose(w, 2, lambda m: m, fisher=torch.ones_like(w), heuristic="diag")
    with pytest.raises(ValueError, match="scaling"):
        lora_init_from_lq(torch.ones(3, 1), torch.ones(1, 3), 0.0)
