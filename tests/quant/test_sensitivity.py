"""Loss-aware sensitivity (coalora.quant.sensitivity): computed once, cached with a checksum,
healed when tampered or stale, validated as one line; MSE and Fisher allocations never collide."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import coalora.quant.sensitivity as sensitivity_mod
from coalora.errors import ConfigError
from coalora.methods.context import MethodContext
from coalora.quant import QuantSettings, QuantSpace, model_weights
from coalora.quant.build import solve_allocations
from coalora.quant.sensitivity import (
    Sensitivity,
    check_sensitivity,
    fisher_sensitivity,
    sensitivity_path,
)

SMALL = QuantSpace(bits=[2, 3, 4], bits0=[8], dtype1=["fp32"], block0=[16, 64], block1=[16])
NAMES = ["0", "2"]


class Out:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class Tiny(nn.Module):
    """Two target linears and a regression loss: ``model(x=..., y=...).loss``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16))

    def get_submodule(self, target: str) -> nn.Module:  # targets named like the Sequential's
        return self.net.get_submodule(target)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Out:
        return Out((self.net(x) - y).square().mean())


def calibration(n: int, seed: int = 0, batch_size: int | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    size = batch_size or 4
    return [{"x": torch.randn(size, 64, generator=g), "y": torch.randn(size, 16, generator=g)}
            for _ in range(n)]  # fmt: skip


def fisher(model: nn.Module, cache: Path | None, examples: int = 6, calib=calibration):
    return fisher_sensitivity(
        model, NAMES, examples=examples, seed=1, model_name="tiny", task_name="toy",
        calibration=calib, cache_dir=cache,
    )  # fmt: skip


def test_cache_round_trip_is_identical_and_computed_once(tmp_path, monkeypatch, caplog):
    model = Tiny()
    first = fisher(model, tmp_path)
    path = sensitivity_path(tmp_path, first.key)
    assert path.is_file() and path.parent.name == "sensitivity"
    assert set(first.fisher) == set(NAMES) and all((f >= 0).all() for f in first.fisher.values())
    assert first.fisher["0"].shape == (32, 64) and float(first.fisher["0"].sum()) > 0
    # a hit never computes: it returns the file's tensors bit for bit
    monkeypatch.setattr(
        sensitivity_mod, "fisher_diagonal", lambda *a, **k: pytest.fail("recomputed")
    )
    caplog.clear()  # the first call's INFO lines are kept when an earlier test enabled INFO
    with caplog.at_level(logging.WARNING):
        second = fisher(model, tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert second.key == first.key and second.table_kind == first.table_kind
    for n in NAMES:
        assert torch.equal(second.fisher[n], first.fisher[n])
    assert Sensitivity.from_bytes(path.read_bytes()).key == first.key


def test_tampered_or_stale_cache_warns_and_recomputes(tmp_path, caplog):
    model = Tiny()
    first = fisher(model, tmp_path)
    path = sensitivity_path(tmp_path, first.key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        healed = fisher(model, tmp_path)
    assert any("sensitivity" in r.getMessage() and str(path) in r.getMessage()
               and "SHA-256" in r.getMessage() for r in caplog.records)  # fmt: skip
    assert torch.equal(healed.fisher["2"], first.fisher["2"])
    assert Sensitivity.from_bytes(path.read_bytes()).key == first.key  # rewritten, verifies
    path.write_bytes(b"garbage")  # truncated / not ours
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(fisher(model, tmp_path).fisher["0"], first.fisher["0"])
    assert any(str(path) in r.getMessage() for r in caplog.records)
    # other weights under the same file name: stale, reported and recomputed
    caplog.clear()
    other = Tiny(seed=5)
    with caplog.at_level(logging.WARNING):
        fresh = fisher(other, tmp_path)
    assert any("stale" in r.getMessage() and "weights" in r.getMessage() for r in caplog.records)
    assert fresh.key.weights != first.key.weights and fresh.key.digest() != first.key.digest()
    assert Sensitivity.from_bytes(path.read_bytes()).key == fresh.key


def test_progress_lines_name_examples_and_eta(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sensitivity_mod, "REPORT_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="coalora.quant.sensitivity"):
        fisher(Tiny(), None, examples=3)
    lines = [r.getMessage() for r in caplog.records]
    assert any("2/3 examples" in m and "ETA" in m for m in lines), lines
    assert any("3 examples done" in m for m in lines), lines


def test_no_training_data_is_one_config_error_line():
    with pytest.raises(ConfigError, match=r"quant.sensitivity=fisher needs the task's training"):
        fisher(Tiny(), None, calib=None)
    with pytest.raises(ConfigError, match="no training examples"):
        fisher(Tiny(), None, calib=lambda n, seed=0, batch_size=None: [])

    def empty_split(n, seed=0, batch_size=None):  # what the datamodules raise for no examples
        raise ValueError("calibration_batches: the training split has no examples")

    with pytest.raises(ConfigError, match="cannot draw 6 training examples .*no examples"):
        fisher(Tiny(), None, calib=empty_split)
    ctx = MethodContext(names=NAMES, quant=QuantSettings(sensitivity="fisher"))
    with pytest.raises(ConfigError, match="training data") as e:
        ctx.sensitivity(Tiny())
    assert "\n" not in str(e.value)


def test_bad_values_are_one_line_naming_key_and_allowed(caplog):
    with pytest.raises(ConfigError, match=r"^quant.sensitivity='foo' is not allowed; allowed: "
                       r"\['none', 'fisher'\]$"):  # fmt: skip
        QuantSettings.from_cfg({"sensitivity": "foo"})
    with pytest.raises(ConfigError, match="quant.sensitivity_examples=0 must be an integer"):
        QuantSettings.from_cfg({"sensitivity": "fisher", "sensitivity_examples": 0})
    with pytest.raises(ConfigError, match="allowed"):
        check_sensitivity(None)
    with caplog.at_level(logging.WARNING):  # the deprecated alias still works, with a warning
        q = QuantSettings.from_cfg({"fisher": True, "fisher_examples": 8})
    assert q.sensitivity == "fisher" and q.sensitivity_examples == 8 and q.fisher
    assert any("deprecated" in r.getMessage() for r in caplog.records)
    assert QuantSettings.from_cfg({"sensitivity": "fisher", "fisher": False}).sensitivity == "none"


def test_fisher_and_mse_allocations_never_share_a_cache_file(tmp_path):
    model = Tiny()
    weights = model_weights(model, NAMES)
    sens = fisher(model, tmp_path)
    mse = solve_allocations(weights, [2.6, 3.4], SMALL, tmp_path, "tiny", "lagrangian")
    fw = solve_allocations(weights, [2.6, 3.4], SMALL, tmp_path, "tiny", "lagrangian", sens)
    tables = sorted(p.name for p in tmp_path.glob("errors-*.safetensors"))
    assert len(tables) == 2 and any(f"-{sens.table_kind}-" in t for t in tables), tables
    allocs = list((tmp_path / "allocations").glob("*.json"))
    assert len(allocs) == 4 and sum(sens.table_kind in p.name for p in allocs) == 2
    assert all(a.info is not None for a in [*mse.values(), *fw.values()])
    assert fw[2.6].info.cost != mse[2.6].info.cost  # the Fisher-weighted objective


class Wrapped(nn.Module):
    """An adapter-like wrapper: the weight is read through ``base_layer``, not a plain Linear."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


def test_context_computes_the_sensitivity_once_and_on_a_full_precision_model(tmp_path):
    built: list[int] = []

    def fp_model() -> nn.Module:
        built.append(1)
        return Tiny()

    q = QuantSettings(
        sensitivity="fisher", sensitivity_examples=4, space=SMALL, solver="lagrangian"
    )

    def context(cache: Path) -> MethodContext:
        return MethodContext(names=NAMES, quant=q, seed=1, model_name="tiny", task_name="toy",
                             calibration=calibration, cache_dir=cache, fp_model=fp_model)  # fmt: skip

    model = Tiny()
    ctx = context(tmp_path)
    sens = ctx.sensitivity(model)
    assert ctx.sensitivity(model) is sens and not built  # computed on the fp model itself
    assert ctx.sensitivity_record()["digest"] == sens.key.digest()
    model.net[0] = Wrapped(model.net[0])  # targets no longer plain: a restored run's model
    assert torch.equal(context(tmp_path).sensitivity(model).fisher["0"], sens.fisher["0"])
    assert not built  # a cache hit needs no full-precision model
    cold = context(tmp_path / "cold").sensitivity(model)
    assert built == [1] and torch.equal(cold.fisher["0"], sens.fisher["0"])  # rebuilt once
    assert context(tmp_path / "cold2").sensitivity(None).key == sens.key
    none = MethodContext(names=NAMES, quant=QuantSettings(space=SMALL))
    assert none.sensitivity(model) is None and none.sensitivity_record() == {"kind": "none"}


def test_sensitivity_seed_fixes_the_fisher_across_run_seeds(tmp_path):
    """``quant.sensitivity_seed`` draws the Fisher examples whatever the run's seed, so runs with
    other seeds allocate (and quantize the base) identically; null keeps the run's seed."""
    with pytest.raises(
        ConfigError, match=r"^quant.sensitivity_seed='7' must be an integer or null"
    ):
        QuantSettings.from_cfg({"sensitivity": "fisher", "sensitivity_seed": "7"})

    def sens(run_seed: int, fixed: int | None) -> Sensitivity:
        q = QuantSettings(sensitivity="fisher", sensitivity_examples=4, space=SMALL,
                          sensitivity_seed=fixed)  # fmt: skip
        ctx = MethodContext(names=NAMES, quant=q, seed=run_seed, model_name="tiny",
                            task_name="toy", calibration=calibration, cache_dir=tmp_path)  # fmt: skip
        out = ctx.sensitivity(Tiny())
        assert ctx.sensitivity_record()["seed"] == (run_seed if fixed is None else fixed)
        return out

    assert torch.equal(sens(43, 42).fisher["0"], sens(42, None).fisher["0"])
    assert not torch.equal(sens(43, None).fisher["0"], sens(42, None).fisher["0"])
