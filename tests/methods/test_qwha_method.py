"""QWHA as a method: training-split Grams, init lowers the layer output error, only spectra + head
train, positions survive a checkpoint, clear errors for bad combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import run_entry

from coalora.adapters import WHTAdapterLinear, adapter_modules
from coalora.adapters.qwha_init import GramCollector, output_error
from coalora.errors import ConfigError
from coalora.methods.qwha import FusedWHTAdapterLinear
from coalora.models import build_model
from coalora.quant import QuantLinear

ROOT = Path(__file__).resolve().parents[2]
UNIFORM3 = ["quant=uniform", "quant.config.bits=3"]


def fp_grams(cfg, dm, names) -> tuple[dict[str, torch.Tensor], int]:
    """Grams of a fresh fp model on the method's calibration batches (an independent recount)."""
    model = build_model(cfg.model, num_labels=cfg.task.num_labels, seed=cfg.seed).eval()
    batches = dm.calibration_batches(cfg.method.init.calib_batches, seed=cfg.seed)
    tokens = 0
    with GramCollector(model, names) as grams, torch.no_grad():
        for b in batches:
            grams.mask = b["attention_mask"]
            model(**{k: v for k, v in b.items() if k != "labels"})
            tokens += int(b["attention_mask"].sum())
    return grams.grams, tokens


def test_init_reduces_layer_output_error_vs_zero_init(built):
    cfg, lit, dm = built(["method=qwha", *UNIFORM3])
    report = lit.method.report
    grams, tokens = fp_grams(cfg, dm, lit.method.names)
    assert report["calib_tokens"] == tokens  # training-split calibration tokens, padding masked
    adapters = adapter_modules(lit.model, WHTAdapterLinear)
    assert set(adapters) == set(lit.method.names)
    for name, ad in adapters.items():
        base = ad.base_layer
        assert isinstance(base, QuantLinear)
        err = base.weight_fp - base.weight  # E = W − W_q
        zero = output_error(err, grams[name])
        init = output_error(err - ad.delta_weight().detach(), grams[name])
        assert init < zero
        assert zero == pytest.approx(report["layers"][name]["err_zero"], rel=1e-5)
        assert init == pytest.approx(report["layers"][name]["err_init"], rel=1e-4, abs=1e-8)
        assert ad.n_coeffs == cfg.method.rank * (ad.in_features + ad.out_features)
    assert report["err_init_total"] < report["err_zero_total"]


def test_step0_output_closer_to_fp_than_zero_init(built):
    _, fp, dm = built(["method=lora", "quant=none"])
    _, zero, _ = built(["method=qwha", *UNIFORM3, "method.init.enabled=false"])
    _, init, _ = built(["method=qwha", *UNIFORM3])
    x = {k: v for k, v in next(iter(dm.val_dataloader())).items() if k != "labels"}

    def hidden(lit):
        lit.model.eval()
        with torch.no_grad():
            return lit.model(**x, output_hidden_states=True).hidden_states[-1]

    ref = hidden(fp)
    assert all(float(a.spectrum.detach().abs().sum()) == 0 for a in zero.method.adapters.values())
    assert float((hidden(init) - ref).norm()) < float((hidden(zero) - ref).norm())


def test_fused_forward_equals_unfused(built):
    _, lit, dm = built(["method=qwha", *UNIFORM3])
    x = {k: v for k, v in next(iter(dm.train_dataloader())).items() if k != "labels"}
    lit.model.eval()
    with torch.no_grad():
        fused = lit.model(**x).logits
        for ad in lit.method.adapters.values():
            assert isinstance(ad, FusedWHTAdapterLinear)
            ad.__class__ = WHTAdapterLinear  # the adapter's own forward: base(x) + x ΔWᵀ
        unfused = lit.model(**x).logits
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_spectra_and_head(built):
    _, lit, dm = built(["method=qwha"])
    lit.model.train()
    loss = lit.method.training_loss(lit.model, next(iter(dm.train_dataloader())), 0)
    loss.backward()
    trainable = {n for n, p in lit.named_parameters() if p.requires_grad}
    assert all(n.endswith(".spectrum") or "classifier" in n for n in trainable)
    grads = {n for n, p in lit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= trainable
    assert any(n.endswith(".spectrum") for n in grads) and any("classifier" in n for n in grads)
    n_spec = sum(p.numel() for n, p in lit.named_parameters() if n.endswith(".spectrum"))
    n_lora = sum(8 * (m.in_features + m.out_features) for m in lit.method.adapters.values())
    assert n_spec == n_lora  # same parameter count as LoRA rank 8


def test_positions_round_trip_through_method_state(built):
    _, lit, _ = built(["method=qwha"])
    state = lit.method.extra_state()
    _, other, _ = built(["method=qwha", "method.init.enabled=false"])
    other.method.load_extra_state(state)
    for name, ad in other.method.adapters.items():
        torch.testing.assert_close(ad.indices, lit.method.adapters[name].indices)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["quant=bnb_nf4"], "method=qwha does not support quant=bnb_nf4"),
        (["method.init.solver=svd"], "method.init.solver"),
        (["method.init.calib_batches=0"], "method.init.calib_batches"),
        (["method.scaling=0"], "method.scaling"),
    ],
)
def test_bad_combinations_fail_clearly(tiny_cfg, overrides, needle):
    from coalora.stages.build import prepare

    with pytest.raises(ConfigError) as err:
        prepare(tiny_cfg(["method=qwha", *overrides]))
    assert needle in str(err.value)


def test_train_py_fast_run(tmp_path):
    args = ["model=tiny_bert", f"paths.data_dir={ROOT / 'tests' / 'fixtures'}",
            "data.allow_hub=false", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "callbacks=minimal", "data.batch_size=8", "data.eval_batch_size=16", "method=qwha"]  # fmt: skip
    r = run_entry("train.py", [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "qwha" and results["global_step"] == 3
    assert results["qwha"]["err_init_total"] < results["qwha"]["err_zero_total"]
    assert 0.0 <= results["metrics"]["val/acc"] <= 1.0
    # export: QWHA is not a LoRA, so `auto` writes a merged transformers checkpoint
    ckpt = f"ckpt={tmp_path / 'run'}"
    bad = run_entry("export.py", [ckpt, "format=peft", f"hydra.run.dir={tmp_path / 'e1'}"],
                    tmp_path / "cache")  # fmt: skip
    assert bad.returncode == 2 and "format=merged" in bad.stderr and "Traceback" not in bad.stderr
    wrong = run_entry("export.py", [ckpt, "quant.budget=4.0", f"hydra.run.dir={tmp_path / 'e2'}"],
                      tmp_path / "cache")  # fmt: skip
    assert wrong.returncode == 2 and "trained on one configuration" in wrong.stderr
    out = tmp_path / "merged"
    r = run_entry("export.py", [ckpt, f"out_dir={out}", f"hydra.run.dir={tmp_path / 'e3'}"],
                  tmp_path / "cache")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "quant_config.json", "README.md"} <= set(files)
    info = json.loads((tmp_path / "e3" / "export.json").read_text())
    assert info["format"] == "merged" and info["avg_bits"] == pytest.approx(
        4.127, abs=0.01
    )  # NF4 + DQ
