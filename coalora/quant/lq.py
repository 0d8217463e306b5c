"""LQ-LoRA decomposition ``W ≈ Q + L1 L2`` and the LoRA initialisation it gives.

LQ-LoRA (Guo et al., arXiv 2311.12023), §3 / Algorithm 1; docs/methods.md ("LQ-LoRA").
Alternate, starting from ``Q = 0``:

    L1, L2 = SVD_r(W − Q)            (optionally Fisher-weighted, LQ-LoRA §3.4 row/col/two-sided heuristics)
    Q      = quantize(W − L1 L2)
    err    = ‖W − (Q + L1 L2)‖_F     (or ‖√Fisher ⊙ (W − (Q + L1 L2))‖_F)

with ``L1 = U_r √S_r`` (d_out, r) and ``L2 = √S_r V_rᵀ`` (r, d_in).  We stop at the first iterate
that does not improve the error and **return the best (previous) iterate** — the reference code
returns the worse current one (a pitfall of the public reference code).  ``quantize`` is injected, so this module
does not depend on which quantizer builds ``Q``; :func:`lq_residual_fn` binds our NF engine.

In the model, the frozen base is ``Q`` and the LoRA starts at ``s·B·A = L1 L2`` with
``A = L2/√s``, ``B = L1/√s`` (:func:`lora_init_from_lq`).

:func:`shared_lowrank` is the variant for one adapter over many configurations (Shared-LoRA and
CoA-LoRA's ``method.init``, docs/methods.md "Quantization-aware initialisation"): one ``L`` for
every quantizer, so each configuration's base is ``quantize_c(W − L)``; :func:`subtract_lowrank`
is the ``W − L`` every such base quantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from coalora.errors import ConfigError
from coalora.quant.nf import fake_quantize

__all__ = [
    "LQResult",
    "SharedLowRank",
    "lora_init_from_lq",
    "lowrank_factors",
    "lq_decompose",
    "lq_residual_fn",
    "shared_lowrank",
    "subtract_lowrank",
]

QuantizeFn = Callable[[Tensor], Tensor]
HEURISTICS = ("two-sided", "none", "row", "col")


class LQResult(NamedTuple):
    """``W ≈ q + l1 @ l2``; ``errors[i]`` is the error of iterate i (the kept one is the minimum)."""

    l1: Tensor  # (d_out, r)
    l2: Tensor  # (r, d_in)
    q: Tensor  # (d_out, d_in)
    errors: list[float]


def _randomized_svd(
    m: Tensor, q: int, niter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Halko et al. range finder with ``niter`` power iterations (what ``svd_lowrank`` does),
    seeded through ``generator`` so error tables are reproducible."""
    omega = torch.randn(m.shape[1], q, generator=generator, dtype=m.dtype, device=m.device)
    basis = torch.linalg.qr(m @ omega).Q  # (d_out, q)
    for _ in range(niter):
        basis = torch.linalg.qr(m.T @ basis).Q  # (d_in, q)
        basis = torch.linalg.qr(m @ basis).Q  # (d_out, q)
    u, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)  # (q, q), (q,), (q, d_in)
    return basis @ u, s, vh


def lowrank_factors(
    m: Tensor,
    rank: int,
    randomized: bool = True,
    oversampling: int = 10,
    niter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors ``(U_r √S_r, √S_r V_rᵀ)`` of ``m`` (d_out, d_in)."""
    k = min(m.shape)
    q = min(rank + oversampling, k)
    if randomized and q < k:
        if generator is None:
            generator = torch.Generator(device=m.device).manual_seed(0)
        u, s, vh = _randomized_svd(m, q, niter, generator)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()  # (r,)
    return u[:, :rank] * root, root[:, None] * vh[:rank]  # (d_out, r), (r, d_in)


def _fisher_scales(fisher: Tensor) -> tuple[Tensor, Tensor]:
    """Row ρ = √mean_j F (d_out, 1) and column κ = √mean_i F (1, d_in), kept away from zero."""
    rho = fisher.mean(dim=1, keepdim=True).sqrt()
    kappa = fisher.mean(dim=0, keepdim=True).sqrt()
    return rho.clamp_min(float(rho.max()) * 1e-6 + 1e-30), kappa.clamp_min(
        float(kappa.max()) * 1e-6 + 1e-30
    )


def _fisher_weighting(fisher: Tensor, w: Tensor, heuristic: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(ρ, κ, √F)`` of a Fisher-weighted SVD of ``w`` under ``heuristic`` (LQ-LoRA §3.4), in
    ``w``'s dtype and device: the SVD factors ``ρ ⊙ M ⊙ κ``; ``√F`` weights the error."""
    if fisher.shape != w.shape:
        raise ValueError(f"fisher {tuple(fisher.shape)} must match W {tuple(w.shape)}")
    f = fisher.detach().to(w).clamp_min(0)
    rho, kappa = _fisher_scales(f)
    if heuristic in ("none", "col"):
        rho = torch.ones_like(rho)
    if heuristic in ("none", "row"):
        kappa = torch.ones_like(kappa)
    return rho, kappa, f.sqrt()


@torch.no_grad()
def lq_decompose(
    weight: Tensor,
    rank: int,
    quantize_fn: QuantizeFn,
    iters: int = 100,
    randomized: bool = True,
    oversampling: int = 10,
    fisher: Tensor | None = None,
    heuristic: str = "two-sided",
    rtol: float = 0.0,
    seed: int = 0,
) -> LQResult:
    """Alternating low-rank + quantized decomposition of one weight (see module docstring).

    Args:
        weight: ``W`` (d_out, d_in); fp16/bf16 is upcast to float32.
        rank: ``r`` of ``L1 L2``.
        quantize_fn: ``M -> quantize-dequantize(M)``, same shape, float32.
        iters: maximum number of alternations (LQ-LoRA: 100; CoA-LoRA's baseline: 1).
        randomized / oversampling: randomized SVD with ``r + oversampling`` columns, 2 power
            iterations (LQ-LoRA's defaults); else the full SVD.
        fisher: optional diagonal Fisher (same shape as ``W``); weights the SVD per ``heuristic``
            and the error.  ``heuristic`` is ignored without ``fisher``.
        heuristic: "two-sided" (SVD of ρ⊙M⊙κ), "row", "col" or "none".
        rtol: also stop once an iterate improves the error by less than this fraction.
        seed: seed of the randomized SVD.

    Returns ``LQResult(l1, l2, q, errors)``: the best iterate and the error of every iterate
    computed (the last entry may be the rejected, non-improving one).
    """
    if rank < 1:
        raise ConfigError(f"method.rank must be a positive integer, got {rank}")
    if iters < 1:
        raise ConfigError(f"method.lq_iters must be >= 1, got {iters}")
    if heuristic not in HEURISTICS:
        raise ConfigError(f"method.heuristic must be one of {list(HEURISTICS)}, got {heuristic!r}")
    w = weight.detach().to(torch.float32)
    if fisher is not None:
        rho, kappa, err_scale = _fisher_weighting(fisher, w, heuristic)
    gen = torch.Generator(device=w.device).manual_seed(seed)

    def factors(m: Tensor) -> tuple[Tensor, Tensor]:
        if fisher is None:
            return lowrank_factors(m, rank, randomized, oversampling, generator=gen)
        l1, l2 = lowrank_factors(rho * m * kappa, rank, randomized, oversampling, generator=gen)
        return l1 / rho, l2 / kappa

    def error(resid: Tensor) -> float:
        return float((resid if fisher is None else err_scale * resid).norm())

    q = torch.zeros_like(w)
    best: tuple[Tensor, Tensor, Tensor] | None = None
    best_err = float("inf")
    errors: list[float] = []
    for _ in range(iters):
        l1, l2 = factors(w - q)  # (d_out, r), (r, d_in)
        lowrank = l1 @ l2  # (d_out, d_in)
        q = quantize_fn((w - lowrank).contiguous())
        err = error(w - q - lowrank)
        errors.append(err)
        if err >= best_err:
            break  # no improvement: keep the previous (best) iterate
        prev_err, best_err, best = best_err, err, (l1, l2, q)
        if rtol > 0 and err > (1.0 - rtol) * prev_err:
            break
    assert best is not None
    return LQResult(*best, errors)


def lora_init_from_lq(l1: Tensor, l2: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """LoRA factors with ``scaling · B @ A == L1 @ L2``: ``A = L2/√s`` (r, d_in), ``B = L1/√s``."""
    if scaling <= 0:
        raise ConfigError(f"LoRA scaling (alpha / rank) must be positive, got {scaling}")
    root = scaling**0.5
    return l2 / root, l1 / root


def lq_residual_fn(
    rank: int,
    iters: int = 100,
    randomized: bool = True,
    oversampling: int = 10,
    rtol: float = 0.0,
    seed: int = 0,
    quantize: Callable[[Tensor, object], Tensor] | None = None,
) -> Callable[[Tensor, object], Tensor]:
    """``(W, qc) -> Q + L1 L2`` for decomposition-aware error tables (``build_error_table``).

    ``quantize(W, qc)`` defaults to :func:`coalora.quant.nf.fake_quantize`.
    """
    if quantize is None:
        quantize = fake_quantize

    def residual(weight: Tensor, qc: object) -> Tensor:
        res = lq_decompose(
            weight,
            rank,
            lambda m: quantize(m, qc),
            iters=iters,
            randomized=randomized,
            oversampling=oversampling,
            rtol=rtol,
            seed=seed,
        )
        return res.q + res.l1 @ res.l2

    return residual


def subtract_lowrank(weight: Tensor, l1: Tensor, l2: Tensor) -> Tensor:
    """``W − L1 L2`` (d_out, d_in) in ``weight``'s dtype and device.

    Computed in float64 and rounded once, so the residual does not depend on how a matmul splits
    its sums (thread count, kernel): every process that holds the same ``W``, ``L1``, ``L2`` on
    the same kind of device quantizes the same matrix.
    """
    with torch.no_grad():
        w = weight.detach()
        lowrank = l1.to(w.device, torch.float64) @ l2.to(w.device, torch.float64)  # (d_out, d_in)
        return (w.to(torch.float64) - lowrank).to(w.dtype)


class SharedLowRank(NamedTuple):
    """One ``L = l1 @ l2`` for every quantizer; ``errors[i]`` is iterate i's mean error over them
    (empty when no quantizer was given); the kept iterate is the minimum."""

    l1: Tensor  # (d_out, r), float32
    l2: Tensor  # (r, d_in), float32
    errors: list[float]


@torch.no_grad()
def shared_lowrank(
    weight: Tensor,
    rank: int,
    quantize_fns: Sequence[QuantizeFn] = (),
    iters: int = 1,
    fisher: Tensor | None = None,
    heuristic: str = "two-sided",
) -> SharedLowRank:
    """A low-rank part ``L`` shared by the quantizers ``quantize_fns`` (one per configuration).

    Iterate 1 is ``L = SVD_r(W)``: LQ-LoRA's first iteration from ``Q = 0`` (arXiv 2311.12023
    §3), the CoA-LoRA code's ``lora-lpq``. Each further iterate refits ``L`` to the mean of the
    configurations' quantized residuals,

        Q_c = quantize_c(W − L)    for every quantizer c
        L   = SVD_r(W − mean_c Q_c)

    which minimises ``mean_c ‖W − L − Q_c‖²`` over rank-``r`` ``L`` for fixed ``Q_c`` (the mean
    of squared distances to the ``W − Q_c`` is the squared distance to their mean plus a constant).
    The error of an iterate is ``mean_c ‖√F ⊙ (R − quantize_c(R))‖²`` with ``R`` =
    :func:`subtract_lowrank` (the matrix a configuration quantizes); as in :func:`lq_decompose`
    we stop at the first iterate that does not improve it and keep the best one. ``fisher``
    weights the SVD (``heuristic``) and the error (LQ-LoRA §3.4).

    The SVD is exact and in float64 (deterministic for the same inputs on one machine), so a
    restored run recomputes the factors training used.
    """
    if rank < 1:
        raise ConfigError(f"method.rank must be a positive integer, got {rank}")
    if rank > min(weight.shape):
        raise ConfigError(
            f"method.rank={rank} exceeds the layer's smaller side {min(weight.shape)}"
        )
    if iters < 1:
        raise ConfigError(f"method.init_iters must be >= 1, got {iters}")
    if iters > 1 and not quantize_fns:
        raise ValueError("refitting L (iters > 1) needs the configurations' quantizers")
    if heuristic not in HEURISTICS:
        raise ConfigError(f"heuristic must be one of {list(HEURISTICS)}, got {heuristic!r}")
    w = weight.detach().to(torch.float64)  # (d_out, d_in)
    rho = kappa = err_scale = None
    if fisher is not None:
        rho, kappa, err_scale = _fisher_weighting(fisher, w, heuristic)
        err_scale = err_scale.to(weight.dtype)

    def factors(m: Tensor) -> tuple[Tensor, Tensor]:  # (d_out, r), (r, d_in) in float32
        if rho is None:
            l1, l2 = lowrank_factors(m, rank, randomized=False)
        else:
            l1, l2 = lowrank_factors(rho * m * kappa, rank, randomized=False)
            l1, l2 = l1 / rho, l2 / kappa
        return l1.to(torch.float32), l2.to(torch.float32)

    target = w
    best: tuple[Tensor, Tensor] | None = None
    best_err = float("inf")
    errors: list[float] = []
    for _ in range(iters):
        l1, l2 = factors(target)
        if not quantize_fns:
            return SharedLowRank(l1, l2, [])
        resid = subtract_lowrank(weight, l1, l2)  # (d_out, d_in)
        q_sum = torch.zeros_like(w)
        err = 0.0
        for quantize in quantize_fns:
            q = quantize(resid)
            d = resid - q if err_scale is None else err_scale * (resid - q)
            err += float(d.to(torch.float64).square().sum())
            q_sum += q.to(torch.float64)
        err /= len(quantize_fns)
        errors.append(err)
        if err >= best_err:
            break  # no improvement: keep the previous (best) iterate
        best_err, best = err, (l1, l2)
        target = w - q_sum / len(quantize_fns)
    assert best is not None
    return SharedLowRank(*best, errors)
