"""QWHA adapter (ΔW = s·F·Ĥ) and its quantisation-aware initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coalora.adapters.qwha import WHTAdapterLinear, n_coeffs_for_rank, random_indices
from coalora.adapters.qwha_init import (
    GramCollector,
    allocate_channel_budgets,
    gram_root,
    output_error,
    qwha_initialize,
)
from coalora.adapters.wht import hadamard_matrix, wht
from coalora.quant.config import QuantConfig
from coalora.quant.nf import fake_quantize


def _quantize(w: torch.Tensor, bits: int = 3, block: int = 64) -> torch.Tensor:
    """Our shared NF engine (NF-bits, 8-bit scales over blocks of ``block``, fp32 constants)."""
    return fake_quantize(w, QuantConfig(bits, 8, "fp32", block, 256))


def _layer(d_in: int, d_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=True)


def _calibration(d_in: int, n: int = 2048, seed: int = 1) -> torch.Tensor:
    """Correlated activations with a few outlier features, like transformer hidden states."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(n, d_in, generator=g) @ (mix * torch.logspace(0, -1.5, d_in))  # (n, d_in)
    x[:, :3] *= 10.0
    return x


# -- adapter --------------------------------------------------------------------------------
@pytest.mark.parametrize(("d_in", "d_out", "r"), [(384, 1536, 8), (1536, 384, 4), (384, 384, 2)])
def test_parameter_count(d_in: int, d_out: int, r: int) -> None:
    layer = WHTAdapterLinear(_layer(d_in, d_out), rank=r)
    params = layer.adapter_parameters()
    assert list(params) == ["spectrum"]
    assert params["spectrum"].numel() == r * (d_in + d_out) == layer.n_coeffs
    assert layer.indices.shape == (2, r * (d_in + d_out))
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["spectrum"]


def test_n_coeffs_capped_at_dense() -> None:
    assert n_coeffs_for_rank(64, 16, 8) == 16 * 8


def test_zero_spectrum_reproduces_base_exactly() -> None:
    base = _layer(48, 20)
    layer = WHTAdapterLinear(base, n_coeffs=100, scaling=3.0)
    x = torch.randn(2, 5, 48)
    assert torch.equal(layer(x), base(x))


def test_forward_matches_dense_definition() -> None:
    base = _layer(24, 10)  # 24 = 3 blocks of 8
    layer = WHTAdapterLinear(base, n_coeffs=60, scaling=0.5, seed=3)
    with torch.no_grad():
        layer.spectrum.normal_()
    f = torch.zeros(10, 24)
    f[layer.indices[0], layer.indices[1]] = layer.spectrum.detach()
    dw = 0.5 * f @ hadamard_matrix(24)  # (d_out, d_in)
    torch.testing.assert_close(layer.delta_weight(), dw)
    x = torch.randn(7, 24)
    torch.testing.assert_close(layer(x), base(x) + x @ dw.T)  # bias kept


def test_gradients_reach_only_spectrum() -> None:
    base = _layer(32, 16)
    layer = WHTAdapterLinear(base, rank=2)
    layer(torch.randn(4, 32)).square().sum().backward()
    assert layer.spectrum.grad is not None and layer.spectrum.grad.abs().sum() > 0
    assert base.weight.grad is None and base.bias.grad is None


def test_spectrum_gradcheck() -> None:
    layer = WHTAdapterLinear(_layer(12, 6), n_coeffs=20, scaling=2.0).double()
    x = torch.randn(3, 12, dtype=torch.float64)

    def fn(spectrum: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"spectrum": spectrum}, (x,))

    s = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (s,))


def test_set_coefficients_is_scale_independent_and_saved() -> None:
    idx = random_indices(10, 16, 30, seed=5)
    vals = torch.randn(30)
    deltas = []
    for s in (0.25, 4000.0):
        layer = WHTAdapterLinear(_layer(16, 10), n_coeffs=30, scaling=s)
        layer.set_coefficients(idx, vals)
        deltas.append(layer.delta_weight())
    torch.testing.assert_close(deltas[0], deltas[1])
    copy = WHTAdapterLinear(_layer(16, 10), n_coeffs=30, scaling=4000.0, seed=9)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.indices, idx)
    torch.testing.assert_close(copy.delta_weight(), deltas[1])


def test_random_indices_distinct() -> None:
    idx = random_indices(7, 9, 40, seed=1)
    flat = idx[0] * 9 + idx[1]
    assert flat.unique().numel() == 40 and bool((flat[1:] > flat[:-1]).all())


def test_validation() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        WHTAdapterLinear(_layer(8, 4), indices=torch.tensor([[0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="n_coeffs"):
        WHTAdapterLinear(_layer(8, 4), n_coeffs=33)
    with pytest.raises(ValueError, match="rank"):
        WHTAdapterLinear(_layer(8, 4))


# -- initialisation -------------------------------------------------------------------------
def test_gram_root() -> None:
    x = _calibration(32, n=64)
    g = x.double().T @ x.double()
    r = gram_root(g, damping=1e-4)
    lam = 1e-4 * float(g.diagonal().mean())
    torch.testing.assert_close(r.T @ r, g + lam * torch.eye(32, dtype=torch.float64))


def test_allocate_channel_budgets() -> None:
    w = torch.tensor([0.0, 1.0, 2.0, 4.0, 100.0, 3.0])
    counts = allocate_channel_budgets(w, total=40, low=2, high=16)
    assert int(counts.sum()) == 40
    assert int(counts.min()) >= 2 and int(counts.max()) <= 16
    assert counts[0] == 2 and counts[4] == 16  # floor and cap bind
    assert counts[1] <= counts[2] <= counts[5] <= counts[3]  # monotone in the weights
    flat = allocate_channel_budgets(torch.ones(5), total=17, low=0, high=8, temperature=2.0)
    assert sorted(flat.tolist()) == [3, 3, 3, 4, 4]


@pytest.mark.parametrize(("alloc", "score"), [("output", "gram"), ("weight", "magnitude")])
def test_init_reduces_output_error_and_refinement_helps(alloc: str, score: str) -> None:
    d_in, d_out, r = 64, 96, 2
    base = _layer(d_in, d_out)
    w = base.weight.detach()
    w_q = _quantize(w)
    x = _calibration(d_in)
    g = x.double().T @ x.double()
    p = r * (d_in + d_out)
    res = qwha_initialize(w, w_q, g, p, alloc_metric=alloc, position_score=score)
    rep = res.report
    assert rep["err_refined"] < rep["err_plain"] < rep["err_zero"]
    assert res.indices.shape == (2, p) and res.values.shape == (p,)
    per_channel = torch.bincount(res.indices[0], minlength=d_out)
    assert int(per_channel.min()) >= 2 and int(per_channel.sum()) == p

    # load into the adapter: the layer output error on X is the reported refined error
    qbase = nn.Linear(d_in, d_out)
    qbase.load_state_dict({"weight": w_q, "bias": base.bias.detach()})
    adapter = WHTAdapterLinear(qbase, n_coeffs=p, scaling=0.25)
    adapter.set_coefficients(res.indices, res.values)
    with torch.no_grad():
        err = (adapter(x).double() - base(x).double()).norm().item()
        err0 = (qbase(x).double() - base(x).double()).norm().item()
    assert err == pytest.approx(rep["err_refined"], rel=1e-3)
    assert err0 == pytest.approx(rep["err_zero"], rel=1e-3)


def test_refinement_is_per_channel_least_squares() -> None:
    """Batched/chunked refinement equals one lstsq per channel in the R metric."""
    d_in, d_out = 16, 12
    torch.manual_seed(3)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    w_q = _quantize(w.float(), bits=2, block=16).double()
    x = _calibration(d_in, n=256).double()
    g = x.T @ x
    res = qwha_initialize(w, w_q, g, 40, chunk_elems=40, min_per_channel=1)
    r = gram_root(g)
    h = hadamard_matrix(d_in, dtype=torch.float64)
    e = w - w_q
    for j in range(d_out):
        sel = res.indices[0] == j
        cols = res.indices[1][sel]
        sol = torch.linalg.lstsq(r @ h[:, cols], r @ e[j]).solution
        torch.testing.assert_close(res.values[sel].double(), sol, rtol=1e-4, atol=1e-6)


def test_normal_equation_solver_matches_lstsq() -> None:
    d_in, d_out = 48, 40
    torch.manual_seed(4)
    w = torch.randn(d_out, d_in) * 0.05
    w_q = _quantize(w, bits=2, block=16)
    x = _calibration(d_in, n=512)
    g = x.double().T @ x.double()
    a = qwha_initialize(w, w_q, g, 6 * (d_in + d_out), solver="lstsq")
    b = qwha_initialize(w, w_q, g, 6 * (d_in + d_out), solver="normal", chunk_elems=64)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-6)
    assert b.report["err_refined"] == pytest.approx(a.report["err_refined"], rel=1e-6)


def test_init_minilm_sized_layer() -> None:
    """A MiniLM FFN-sized layer (384 -> 1536) at r = 8: big reduction, floor respected."""
    d_in, d_out, r = 384, 1536, 8
    torch.manual_seed(0)
    w = torch.randn(d_out, d_in) * 0.05
    w_q = _quantize(w, bits=3)
    x = _calibration(d_in, n=1024)
    g = x.double().T @ x.double()
    res = qwha_initialize(w, w_q, g, r * (d_in + d_out))
    rep = res.report
    assert rep["err_refined"] < 0.8 * rep["err_zero"]
    assert rep["min_per_channel"] >= 2
    f = torch.zeros(d_out, d_in, dtype=torch.float64)
    f[res.indices[0], res.indices[1]] = res.values.double()
    assert output_error((w - w_q).double() - wht(f), g) == pytest.approx(rep["err_refined"], 1e-4)


def test_gram_collector() -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x1, x2 = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with GramCollector(model, ["0", "2"]) as col, torch.no_grad():
        model(x1)
        col.mask = mask
        model(x2)
    assert not model[0]._forward_pre_hooks
    rows = torch.cat([x1.reshape(-1, 8), x2[mask.bool()]]).double()
    torch.testing.assert_close(col.grams["0"], rows.T @ rows)
    assert col.counts["0"] == 6 + 3 and col.grams["2"].shape == (6, 6)
    with pytest.raises(KeyError):
        GramCollector(model, ["nope"])
