"""QWHA quantisation-aware initialisation of one layer (AdaAlloc + value refinement).

QWHA (arXiv 2509.17428) §3.3, Eqs. 5-9, Algorithm 1.  Given the full-precision weight ``W``, the
dequantized base ``W_q`` and the calibration Gram ``G = Σ xᵀx``, choose ``p`` positions of ``F`` and
their values so that ``W_q + ΔW`` (``ΔW = F·Ĥ``) reproduces the layer output on calibration data:

    minimise  ‖X (E − ΔW)ᵀ‖_F = ‖R (E − ΔW)ᵀ‖_F,   E = W − W_q,   RᵀR = G + λ I

Steps (per output channel j; ``Ĥ`` is the orthonormal block-diagonal WHT, symmetric):

1. **Root.** ``λ = damping·mean(diag G)`` (QWHA: 1e-4·tr/d_in); ``R`` = Cholesky factor ``Lᵀ`` of
   the damped Gram (any ``R`` with ``RᵀR = G + λI`` gives the same objective), eigh as a fallback.
2. **AdaAlloc.** Channel budgets ``p_j ∝ w_j^t`` with ``w_j = ‖R e_jᵀ‖`` (the paper's Eq. 7 output
   error, ``alloc_metric="output"``) or ``w_j = ‖e_j‖`` (what the reference code computes,
   ``"weight"``); ``t`` is the temperature.  Water-filling with a floor (``min_per_channel``,
   default 2, QWHA's full-rank argument) and a cap (``d_in``), then largest-remainder rounding so
   that ``Σ p_j = p`` exactly.
3. **Positions.** Dense coefficients ``S = E Ĥ`` (so ``S Ĥ = E``).  Keep the ``p_j`` transform
   indices ``k`` with the largest contribution to the channel's calibration output,
   ``S_jk² · ‖R ĥ_k‖²`` (``position_score="gram"``, as in the reference code), or plain ``|S_jk|``
   (``"magnitude"``, the paper's description).
4. **Refinement.** Least squares in the calibration metric on the chosen support:
   ``v_j = argmin_v ‖R (e_jᵀ − Ĥ[:, S_j] v)‖`` via ``torch.linalg.lstsq`` (QR-based; default), or
   the Cholesky-solved normal equations (``solver="normal"``, for wide layers), batched over
   channels with the same ``p_j``.

The result is in ΔW units (``F[indices] = values`` gives ``ΔW = F·Ĥ``);
:meth:`coalora.adapters.qwha.WHTAdapterLinear.set_coefficients` divides by the adapter scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from coalora.adapters.wht import wht

__all__ = [
    "GramCollector",
    "QWHAInit",
    "allocate_channel_budgets",
    "gram_root",
    "output_error",
    "qwha_initialize",
]

_ALLOC_METRICS = ("output", "weight")
_POSITION_SCORES = ("gram", "magnitude")
_SOLVERS = ("lstsq", "normal")


@dataclass
class QWHAInit:
    """Initialisation of one layer: ``F[indices[0], indices[1]] = values``, ``ΔW = F·Ĥ``."""

    indices: Tensor  # (2, p) int64, channel-major
    values: Tensor  # (p,) float32, ΔW units
    report: dict[str, float] = field(default_factory=dict)


def gram_root(gram: Tensor, damping: float = 1e-4) -> Tensor:
    """``R`` (d, d) float64 with ``RᵀR = G + damping·mean(diag G)·I``."""
    g = gram.to(torch.float64)
    d = g.shape[0]
    lam = damping * float(g.diagonal().mean().clamp_min(0))
    if lam == 0.0:
        lam = damping  # an all-zero Gram (dead inputs): keep the root well defined
    g = g + lam * torch.eye(d, dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol.T  # G = L Lᵀ = (Lᵀ)ᵀ Lᵀ
    evals, evecs = torch.linalg.eigh(g)
    return evals.clamp_min(0).sqrt()[:, None] * evecs.T  # diag(√Λ) Vᵀ


def output_error(delta: Tensor, gram: Tensor) -> float:
    """``‖X Dᵀ‖_F = sqrt(Σ_j d_j G d_jᵀ)`` for a weight difference ``D`` (d_out, d_in)."""
    d = delta.to(torch.float64)
    return float(((d @ gram.to(torch.float64)) * d).sum().clamp_min(0).sqrt())


def allocate_channel_budgets(
    weights: Tensor, total: int, low: int, high: int, temperature: float = 1.0
) -> Tensor:
    """Integer budgets ``p_j ∈ [low, high]`` with ``Σ p_j = total``, proportional to ``w_j^t``.

    Continuous water-filling ``x_j = clip(τ·w_j^t, low, high)`` with ``Σ x_j = total`` (bisection on
    ``τ``), then largest-remainder rounding inside the bounds.
    """
    n = weights.numel()
    if not n * low <= total <= n * high:
        raise ValueError(f"cannot split {total} over {n} channels with bounds [{low}, {high}]")
    w = weights.detach().to(torch.float64).clamp_min(0) ** temperature
    if not bool(torch.isfinite(w).all()) or float(w.max()) <= 0:
        w = torch.ones_like(w)
    w = w.clamp_min(float(w.max()) * 1e-12)  # zero-error channels still sit at the floor only

    def filled(tau: float) -> Tensor:
        return (tau * w).clamp(low, high)

    lo_t, hi_t = 0.0, total / float(w.sum())
    while float(filled(hi_t).sum()) < total:
        hi_t *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo_t + hi_t)
        if float(filled(mid).sum()) < total:
            lo_t = mid
        else:
            hi_t = mid
    x = filled(hi_t)
    counts = x.floor().to(torch.long).clamp(low, high)
    frac = x - counts
    rem = total - int(counts.sum())
    while rem != 0:  # at most a couple of passes: |rem| < n after the bisection
        if rem > 0:
            cand = (counts < high).nonzero().squeeze(1)
            order = cand[frac[cand].argsort(descending=True)][:rem]
            counts[order] += 1
        else:
            cand = (counts > low).nonzero().squeeze(1)
            order = cand[frac[cand].argsort()][:-rem]
            counts[order] -= 1
        frac[order] = 0.0
        rem = total - int(counts.sum())
    return counts


def _refine(
    bases: Tensor,
    target: Tensor,
    order: Tensor,
    counts: Tensor,
    chunk_elems: int,
    solver: str = "lstsq",
) -> Tensor:
    """Least-squares values on each channel's support, batched over channels of equal count.

    bases (d_in, d_in) = R Ĥ; target (d_in, d_out) = R Eᵀ; order (d_out, d_in) ranked positions.
    ``solver="lstsq"``: QR-based ``torch.linalg.lstsq`` on the (d_in, c) design matrix per channel,
    ``O(d_in·c²)``.  ``"normal"``: Cholesky on the (c, c) normal equations ``(ĤGĤ)_SS v = (ĤGEᵀ)_S``,
    ``O(c³)`` — much faster for wide layers, accurate here because ``G`` is damped (its condition
    number is squared, but stays far from float64 limits).  Returns dense coefficients
    (d_out, d_in), zero off the support.
    """
    d_out, d_in = order.shape
    coeffs = torch.zeros(d_out, d_in, dtype=bases.dtype, device=bases.device)
    if solver == "normal":
        normal = bases.T @ bases  # (d_in, d_in) = Ĥ G Ĥ
        rhs_t = (bases.T @ target).T  # (d_out, d_in) = (Ĥ G Eᵀ)ᵀ
    else:
        bases_t = bases.T.contiguous()  # (d_in, d_in): row k = column k of R Ĥ
    for c in counts.unique().tolist():
        if c == 0:
            continue
        chans = (counts == c).nonzero().squeeze(1)  # (g,)
        step = max(1, chunk_elems // ((c if solver == "normal" else d_in) * c))
        for start in range(0, chans.numel(), step):
            j = chans[start : start + step]  # (g,)
            cols = order[j, :c]  # (g, c)
            if solver == "normal":
                a = normal[cols[:, :, None], cols[:, None, :]]  # (g, c, c)
                b = rhs_t[j[:, None], cols].unsqueeze(-1)  # (g, c, 1)
                chol, info = torch.linalg.cholesky_ex(a)
                if int(info.abs().sum()) == 0:
                    sol = torch.cholesky_solve(b, chol).squeeze(-1)  # (g, c)
                else:
                    sol = torch.linalg.lstsq(a, b).solution.squeeze(-1)
            else:
                a = bases_t[cols].transpose(1, 2)  # (g, d_in, c)
                b = target[:, j].T.unsqueeze(-1)  # (g, d_in, 1)
                sol = torch.linalg.lstsq(a, b).solution.squeeze(-1)  # (g, c)
            coeffs[j[:, None], cols] = sol
    return coeffs


@torch.no_grad()
def qwha_initialize(
    weight: Tensor,
    weight_q: Tensor,
    gram: Tensor,
    n_coeffs: int,
    temperature: float = 1.0,
    damping: float = 1e-4,
    min_per_channel: int = 2,
    max_per_channel: int | None = None,
    alloc_metric: str = "output",
    position_score: str = "gram",
    refine: bool = True,
    solver: str = "lstsq",
    chunk_elems: int = 1 << 22,
) -> QWHAInit:
    """QWHA initialisation of one layer (see the module docstring for the steps).

    Args:
        weight: full-precision ``W`` (d_out, d_in).
        weight_q: dequantized base ``W_q`` (d_out, d_in).
        gram: ``Σ xᵀx`` over calibration inputs of this layer (d_in, d_in), ideally float64.
        n_coeffs: ``p``, total number of non-zeros of ``F``.
        temperature: AdaAlloc ``t``.
        damping: ``λ = damping·mean(diag G)``.
        min_per_channel / max_per_channel: per-channel floor (lowered to ``p // d_out`` when ``p``
            is too small) and cap (default ``d_in``).
        alloc_metric: "output" (‖R e_jᵀ‖, paper Eq. 7) or "weight" (‖e_j‖, reference code).
        position_score: "gram" (S²·‖Rĥ_k‖²) or "magnitude" (|S|).
        refine: least-squares values (else the plain coefficients S at the chosen positions).
        solver: "lstsq" (QR least squares per channel, the default) or "normal" (Cholesky on
            the normal equations; ~d_in/c times faster, for wide layers such as FFN down-proj).
        chunk_elems: memory bound (elements) of one batched least-squares call.

    Returns indices, values and a report with the calibration output errors ``‖X(E − ΔW)ᵀ‖_F``
    (measured with the undamped Gram) for ΔW = 0 (``err_zero``), plain coefficients on the chosen
    support (``err_plain``) and refined values (``err_refined``), plus allocation statistics.
    """
    if alloc_metric not in _ALLOC_METRICS:
        raise ValueError(f"alloc_metric must be one of {_ALLOC_METRICS}, got {alloc_metric!r}")
    if position_score not in _POSITION_SCORES:
        raise ValueError(
            f"position_score must be one of {_POSITION_SCORES}, got {position_score!r}"
        )
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
    if weight.shape != weight_q.shape or weight.dim() != 2:
        raise ValueError(f"W {tuple(weight.shape)} and W_q {tuple(weight_q.shape)} must match")
    d_out, d_in = weight.shape
    if gram.shape != (d_in, d_in):
        raise ValueError(f"Gram must be [{d_in}, {d_in}], got {tuple(gram.shape)}")
    if not 0 < n_coeffs <= d_out * d_in:
        raise ValueError(f"n_coeffs must be in [1, {d_out * d_in}], got {n_coeffs}")
    high = d_in if max_per_channel is None else min(max_per_channel, d_in)
    low = min(min_per_channel, high, n_coeffs // d_out)
    if n_coeffs > d_out * high:
        raise ValueError(f"n_coeffs={n_coeffs} exceeds d_out * max_per_channel = {d_out * high}")

    g = gram.to(torch.float64)
    err = (weight.to(torch.float64) - weight_q.to(torch.float64)).to(g.device)  # E (d_out, d_in)
    root = gram_root(g, damping)  # (d_in, d_in)
    bases = wht(root)  # (d_in, d_in): R Ĥ, column k = R ĥ_k
    target = root @ err.T  # (d_in, d_out): R E_jᵀ per column
    dense = wht(err)  # (d_out, d_in): S = E Ĥ, S Ĥ = E

    # AdaAlloc budgets
    w = target.norm(dim=0) if alloc_metric == "output" else err.norm(dim=1)  # (d_out,)
    counts = allocate_channel_budgets(w, n_coeffs, low, high, temperature)  # (d_out,)

    # positions
    score = dense.square()
    if position_score == "gram":
        score = score * bases.square().sum(dim=0)  # (d_out, d_in) * (d_in,)
    order = score.argsort(dim=1, descending=True)  # (d_out, d_in)
    keep = torch.arange(d_in, device=g.device)[None, :] < counts[:, None].to(g.device)
    rows = torch.arange(d_out, device=g.device)[:, None].expand(d_out, d_in)[keep]  # (p,)
    cols = order[keep]  # (p,)
    flat = (rows * d_in + cols).sort().values  # channel-major, ascending transform index
    rows, cols = flat // d_in, flat % d_in

    plain = torch.zeros_like(dense)
    plain[rows, cols] = dense[rows, cols]
    coeffs = (
        _refine(bases, target, order, counts.to(g.device), chunk_elems, solver) if refine else plain
    )

    report = {
        "err_zero": output_error(err, g),
        "err_plain": output_error(err - wht(plain), g),
        "err_refined": output_error(err - wht(coeffs), g) if refine else float("nan"),
        "n_coeffs": float(n_coeffs),
        "min_per_channel": float(counts.min()),
        "max_per_channel": float(counts.max()),
        "damping_lambda": damping * float(g.diagonal().mean()),
    }
    indices = torch.stack((rows, cols)).cpu()  # (2, p)
    values = coeffs[rows, cols].to(torch.float32).cpu()  # (p,)
    return QWHAInit(indices=indices, values=values, report=report)


class GramCollector:
    """Accumulates ``G = Σ xᵀx`` (float64) of the inputs of named modules via forward pre-hooks.

    Use on the full-precision model with calibration batches from the task's **training** split::

        with GramCollector(model, names) as grams, torch.no_grad():
            for batch in batches:
                grams.mask = batch["attention_mask"]  # optional: skip padding tokens
                model(**batch)
        G = grams.grams[name]  # (d_in, d_in); grams.counts[name] = rows accumulated

    ``mask`` (bool/0-1, shape = the input's leading dims, e.g. ``[B, T]``) selects rows; it is
    ignored for inputs whose leading shape differs.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"GramCollector: no module named {missing}")
        self._modules = {n: modules[n] for n in self.names}
        self.grams: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {n: 0 for n in self.names}
        self.mask: Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if self.mask is not None and tuple(self.mask.shape) == tuple(x.shape[:-1]):
                x = x[self.mask.to(device=x.device, dtype=torch.bool)]  # (n, d_in)
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (n, d_in)
            if name not in self.grams:
                self.grams[name] = x.new_zeros(x.shape[1], x.shape[1])
            self.grams[name].addmm_(x.T, x)
            self.counts[name] += x.shape[0]

        return hook

    def attach(self) -> GramCollector:
        if not self._handles:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> GramCollector:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
