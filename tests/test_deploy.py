"""coalora.deploy: packed export round trip, multi-configuration dedup, merge, bad input, and a
load in a process that never imports Lightning, Hydra or botorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deploy.packed_helpers import Q2, TARGETS
from support import tiny_bert_classifier
from torch import nn

from coalora import deploy
from coalora.adapters.inject import inject
from coalora.adapters.lora import LoRALinear
from coalora.errors import CoaloraError
from coalora.quant import (
    NF3,
    NF4,
    DequantCache,
    ModelQuantConfig,
    QuantConfig,
    QuantLinear,
    quantize_model,
    set_model_config,
    target_linear_names,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_bert(hidden: int = 128, seed: int = 0) -> nn.Module:
    return tiny_bert_classifier(hidden=hidden, layers=2, seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A packed-quantized tiny BERT with LoRA (nonzero B), two configurations sharing layers,
    a different adapter per configuration, exported to one directory."""
    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    a = ModelQuantConfig({n: (NF4 if i % 2 else Q2) for i, n in enumerate(names)}, numels)
    b = ModelQuantConfig({n: (NF4 if i % 2 else NF3) for i, n in enumerate(names)}, numels)
    quantize_model(model, names, a, DequantCache(storage="packed"))
    torch.manual_seed(1)
    inject(model, names, lambda n, m: LoRALinear(m, 4, 8))
    adapters, logits = {}, {}
    ids = torch.randint(0, 100, (2, 9))
    for label, config in (("2.5", a), ("3.0", b)):
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).lora_B.normal_(0, 0.05)
        set_model_config(model, config)
        adapters[label], scaling = deploy.lora_tensors(model, names)
        with torch.no_grad():
            logits[label] = model(ids).logits
    out = tmp_path_factory.mktemp("export") / "packed"
    deploy.save_packed(model, names, {"2.5": a, "3.0": b}, adapters, out, scaling=scaling)
    return {"path": out, "ids": ids, "logits": logits, "names": names, "configs": (a, b)}


def test_round_trip_logits_equal_the_training_time_model(trained):
    for label in ("2.5", "3.0"):
        model = deploy.load(trained["path"], budget=float(label))
        assert model.coalora_export["label"] == label
        with torch.no_grad():
            out = model(trained["ids"]).logits
        assert torch.equal(out, trained["logits"][label])
        wrapped = model.get_submodule(trained["names"][0])
        assert isinstance(wrapped, LoRALinear) and not wrapped.lora_B.requires_grad
        assert isinstance(wrapped.base_layer, QuantLinear) and wrapped.base_layer.weight_fp is None


def test_shared_layers_are_stored_once_and_sizes_follow_the_formula(trained):
    manifest = deploy.read_manifest(trained["path"])
    a, b = trained["configs"]
    pairs = {(n, c[n]) for n in trained["names"] for c in (a, b)}
    assert len(manifest["entries"]) == len(pairs) < 2 * len(trained["names"])
    packed_bits = sum(qc.storage_bits() * a.numels[n] for n, qc in pairs)
    size = manifest["files"]["packed.safetensors"]["bytes"]
    with open(trained["path"] / "packed.safetensors", "rb") as f:
        header = int.from_bytes(f.read(8), "little")  # safetensors: u64 header length, JSON
    data = size - 8 - header
    assert abs(data - packed_bits / 8) / (packed_bits / 8) < 0.02  # offsets: 4 bytes an entry
    model = deploy.load(trained["path"], budget="2.5")
    from coalora.quant import formula_weight_bytes, resident_weight_bytes

    got = resident_weight_bytes(model)
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    want = formula_weight_bytes(model, a)  # "other" includes the LoRA tensors
    assert got["original"] == 0 and abs(got["total"] - want) / want < 0.02
    assert got["other"] > lora > 0


def test_merge_requantizes_and_reports_its_error(trained):
    merged = deploy.load(trained["path"], budget="3.0", merge=True)
    err = merged.coalora_export["merge_error"]
    assert set(err) == set(trained["names"]) and all(0 < e < 1 for e in err.values())
    assert isinstance(merged.get_submodule(trained["names"][0]), QuantLinear)
    with torch.no_grad():
        out = merged(trained["ids"]).logits
    ref = trained["logits"]["3.0"]
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_bad_budget_and_missing_label_name_the_available_ones(trained):
    with pytest.raises(
        CoaloraError, match=r"budget=3.3 is not in this export; available: \['2.5', '3.0'\]"
    ):
        deploy.load(trained["path"], budget=3.3)
    with pytest.raises(CoaloraError, match=r"serves \['2.5', '3.0'\]; pass budget"):
        deploy.load(trained["path"])


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_and_truncated_files_are_detected(trained, tmp_path):
    bad = _copy(trained["path"], tmp_path / "tampered")
    f = bad / "packed.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CoaloraError, match="packed.safetensors: sha256 differs"):
        deploy.load(bad, budget="2.5")
    short = _copy(trained["path"], tmp_path / "truncated")
    g = short / "adapters" / "3.0.safetensors"
    g.write_bytes(g.read_bytes()[:-10])
    with pytest.raises(CoaloraError, match=r"3.0.safetensors: \d+ bytes, manifest.json says \d+"):
        deploy.load(short, budget="3.0")


def test_entry_shape_mismatch_is_detected(trained, tmp_path):
    import hashlib

    import safetensors.torch

    from coalora.deploy.schema import sign_manifest

    bad = _copy(trained["path"], tmp_path / "shape")
    m = json.loads((bad / "manifest.json").read_text())
    key = next(iter(m["entries"]))
    m["entries"][key]["shape"] = [4 * x for x in m["entries"][key]["shape"]]
    (bad / "manifest.json").write_text(json.dumps(sign_manifest(m)))
    with pytest.raises(CoaloraError, match=r"entries\['.*'\]\.shape=\[.*\] but targets"):
        deploy.load(bad, budget="2.5")
    # a packed tensor whose bytes do not fit its (correct) shape: PackedTensor.validate
    short = _copy(trained["path"], tmp_path / "codes")
    f = short / "packed.safetensors"
    tensors = safetensors.torch.load_file(str(f))
    tensors[f"{key}::codes"] = tensors[f"{key}::codes"][:-1].clone()
    safetensors.torch.save_file(tensors, str(f), metadata={"format": deploy.FORMAT})
    m = json.loads((short / "manifest.json").read_text())
    data = f.read_bytes()
    m["files"]["packed.safetensors"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (short / "manifest.json").write_text(json.dumps(sign_manifest(m)))
    name, option = key.split("::")
    label = "2.5" if trained["configs"][0][name].key == option else "3.0"  # a config using it
    with pytest.raises(CoaloraError, match=r"entry .* codes has shape \(\d+,\), expected"):
        deploy.load(short, budget=label)
    with pytest.raises(CoaloraError, match="not a coalora packed export"):
        deploy.load(tmp_path)


def test_export_for_another_model_is_rejected(trained):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    other = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    )
    with pytest.raises(CoaloraError, match=r"export is for BertForSequenceClassification \(bert\)"):
        deploy.load(trained["path"], budget="2.5", base_model=other)
    with pytest.raises(CoaloraError, match=r"export for another model: target .* is \(128, 128\)"):
        deploy.load(trained["path"], budget="2.5", base_model=tiny_bert(hidden=64))


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    config = ModelQuantConfig.uniform(
        {n: model.get_submodule(n).weight.numel() for n in names}, NF4
    )
    calls = []
    real = safetensors.torch.save_file

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        deploy.save_packed(model, names, {"nf4": config}, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    out = deploy.save_packed(model, names, {"nf4": config}, None, tmp_path / "out")
    with pytest.raises(CoaloraError, match="exists; pass overwrite=True"):
        deploy.save_packed(model, names, {"nf4": config}, None, out)
    deploy.save_packed(model, names, {"nf4": config}, None, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded = deploy.load(out)  # one configuration, no adapter: budget may be omitted
    assert isinstance(loaded.get_submodule(names[0]), QuantLinear)


def test_load_in_a_process_without_lightning_hydra_botorch(trained):
    code = (
        "import sys, torch\n"
        "import coalora.deploy as d\n"
        f"m = d.load({str(trained['path'])!r}, budget='3.0')\n"
        f"ids = torch.tensor({trained['ids'].tolist()})\n"
        "with torch.no_grad():\n"
        "    print(m(ids).logits.tolist())\n"
        "bad = sorted({k.split('.')[0] for k in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'hydra', 'botorch'})\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    logits = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, trained["logits"]["3.0"], rtol=0, atol=1e-6)


def test_bnb_backend_serves_the_same_values_for_4bit_block64(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    nf4_mixed = QuantConfig(4, 4, "bf16", 64, 16)
    config = ModelQuantConfig(
        {n: (NF4 if i % 2 else nf4_mixed) for i, n in enumerate(names)}, numels
    )
    out = deploy.save_packed(model, names, {"4.1": config}, None, tmp_path / "nf4")
    packed = deploy.load(out)
    served = deploy.load(out, backend="bnb")
    assert isinstance(served.get_submodule(names[0]), bnb.nn.Linear4bit)
    for n in names:  # before any forward: bitsandbytes may repack the weight for its CPU kernel
        w = served.get_submodule(n).weight
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        assert torch.equal(deq, packed.get_submodule(n).weight)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():  # bitsandbytes' CPU matmul sums in another order
        torch.testing.assert_close(served(ids).logits, packed(ids).logits, rtol=0, atol=1e-4)
    q2 = ModelQuantConfig.uniform(numels, Q2)
    out2 = deploy.save_packed(model, names, {"2.3": q2}, None, tmp_path / "q2")
    with pytest.raises(CoaloraError, match="backend='bnb' needs bits=4, block0=64"):
        deploy.load(out2, backend="bnb")
    with pytest.raises(CoaloraError, match=r"backend='gguf' is not allowed"):
        deploy.load(out2, backend="gguf")
