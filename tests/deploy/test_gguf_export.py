"""``export.py format=gguf`` (docs/gguf.md, "Export to llama.cpp"): the base read back by gguf-py
and by transformers equals coalora's quantized weights bit for bit, the LoRA tensors are the
adapter at each configuration, bad inputs give one line, and llama.cpp (the ``xllamacpp`` wheel)
running base + adapter matches torch on the same tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy.gguf_helpers import TYPES, run_cfg, tiny_gguf_llama

from coalora.deploy.gguf import read_gguf_manifest, save_gguf
from coalora.deploy.gguf_base import TensorNames, permute_qk, unpermute_qk
from coalora.errors import CoaloraError, ConfigError
from coalora.quant.model import base_linear
from coalora.stages.export import export_format

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = run_cfg()
    model, names, configs, adapt, tok = tiny_gguf_llama(cfg)
    out = tmp_path_factory.mktemp("gguf") / "export"
    manifest = save_gguf(model, names, configs, adapt, out, cfg, tokenizer=tok, source="test")
    return cfg, model, names, configs, adapt, out, manifest


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def dequantized(t) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))


def test_permutation_is_inverted_and_moves_rows_only():
    x = torch.arange(8 * 3).reshape(8, 3)
    p = permute_qk(x, n_head=2)
    assert torch.equal(unpermute_qk(p, 2), x)
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # head dim 4: pairs (0, 2), (1, 3)


def test_base_equals_coalora_quantized_weights_bit_for_bit(exported):
    cfg, model, names, configs, adapt, out, manifest = exported
    tn = TensorNames("llama", model.config)
    for label, config in configs.items():
        adapt(config)
        read = tensors(out / label / "base.gguf")
        for name in names:
            gname = tn.name(f"{name}.weight")
            t = read[gname]
            assert t.tensor_type.name == config[name].type
            ours = base_linear(model, name).weight  # what training and evaluation applied
            got = tn.from_gguf(gname, dequantized(t))
            assert torch.equal(got, ours.float()), (label, name)
        assert read["token_embd.weight"].tensor_type.name == "F16"
        assert read["output_norm.weight"].tensor_type.name == "F32"
        assert "output.weight" not in read  # tied: llama.cpp uses token_embd
    entry = manifest["configurations"]["4.7"]
    assert entry["target_average_bits"] == pytest.approx(configs["4.7"].average_bits())
    assert {e["type"] for e in entry["tensors"].values()} >= set(TYPES["4.7"])


def test_metadata_and_tokenizer(exported):
    cfg, model, *_, out, _ = exported
    reader = gguf.GGUFReader(str(out / "4.7" / "base.gguf"))
    fields = reader.fields

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 2
    assert value("llama.embedding_length") == 256
    assert value("llama.attention.head_count_kv") == 2
    assert value("tokenizer.ggml.model") == "bert"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size and tokens[-1] == "[PAD30591]"
    assert value("tokenizer.ggml.bos_token_id") == 101


def test_lora_tensors_are_the_adapter_at_each_configuration(exported):
    cfg, model, names, configs, adapt, out, manifest = exported
    tn = TensorNames("llama", model.config)
    for label, config in configs.items():
        adapt(config)  # the fold differs per configuration
        reader = gguf.GGUFReader(str(out / label / "adapter.gguf"))
        assert reader.fields["general.type"].contents() == "adapter"
        assert reader.fields["adapter.type"].contents() == "lora"
        alpha = reader.fields["adapter.lora.alpha"].contents()
        assert alpha == pytest.approx(cfg.method.alpha)
        read = {t.name: t for t in reader.tensors}
        for name in names:
            m = model.get_submodule(name)
            gname = tn.name(f"{name}.weight")
            a = torch.from_numpy(np.array(read[f"{gname}.lora_a"].data))
            b = tn.from_gguf(gname, torch.from_numpy(np.array(read[f"{gname}.lora_b"].data)))
            assert torch.equal(a, m.lora_A.detach()) and torch.equal(b, m.effective_B().detach())


def test_transformers_loads_exactly_the_dequantized_base(exported):
    from transformers import AutoModelForCausalLM

    cfg, model, names, configs, adapt, out, _ = exported
    for label, config in configs.items():
        adapt(config)
        hf = AutoModelForCausalLM.from_pretrained(str(out / label), gguf_file="base.gguf")
        for name in names:  # transformers undoes the q/k permutation itself
            got = hf.get_submodule(name).weight
            assert torch.equal(got.float(), base_linear(model, name).weight.float()), name


def test_manifest_checksums_and_atomic_overwrite(exported, tmp_path):
    cfg, model, names, configs, adapt, out, manifest = exported
    assert set(manifest["files"]) >= {"4.7/base.gguf", "4.7/adapter.gguf", "README.md"}
    assert "llama-cli -m 4.7/base.gguf --lora 4.7/adapter.gguf" in (out / "README.md").read_text()
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    with open(copy / "6.1" / "adapter.gguf", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(CoaloraError, match="sha256"):
        read_gguf_manifest(copy)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    with pytest.raises(CoaloraError, match="overwrite"):
        save_gguf(model, names, configs, adapt, other, cfg)
    assert (other / "keep.txt").read_text() == "not ours"


def test_bad_inputs_give_one_line(exported):
    from coalora.deploy.gguf_lora import lora_pairs

    cfg, model, names, configs, adapt, out, _ = exported
    encoder = run_cfg()
    encoder.model.kind = "encoder"
    cases = [
        (run_cfg(kind="nf"), "quant.space.kind=gguf"),
        (run_cfg(arch="bert"), "model.arch"),
        (encoder, "model.kind=encoder"),
    ]
    for bad, needle in cases:
        with pytest.raises(ConfigError, match=needle) as e:
            save_gguf(model, names, configs, adapt, out.parent / "bad", bad)
        assert "\n" not in str(e.value)
    assert not (out.parent / "bad").exists()
    qwha = type("QWHA", (), {"name": "qwha", "export_formats": ("merged",)})
    with pytest.raises(ConfigError, match="format=merged"):
        export_format("gguf", qwha)
    tn = TensorNames("llama", model.config)
    with pytest.raises(ConfigError, match="format=merged"):  # a target without a LoRA pair
        lora_pairs(model, [f"{names[0]}.base_layer"], tn, "qwha")


@pytest.mark.filterwarnings("ignore")
def test_llamacpp_runs_base_and_adapter_like_torch(exported):
    """llama.cpp (xllamacpp) on base + adapter gives the torch model's NLL on the same tokens;
    without the adapter it gives the base's (so the adapter is applied, at the right scale)."""
    pytest.importorskip("xllamacpp")
    from coalora.deploy.llamacpp import LlamaCpp, block_nll, output_matrix

    cfg, model, names, configs, adapt, out, _ = exported
    tokens = torch.randint(1000, 30000, (48,), generator=torch.Generator().manual_seed(3))
    label = "4.7"
    adapt(configs[label])
    W = output_matrix(out / label / "base.gguf")
    with torch.no_grad():
        h_adapted = model(tokens[None], output_hidden_states=True).hidden_states[-1][0]
        for name in names:
            model.get_submodule(name).lora_B.zero_()
        h_base = model(tokens[None], output_hidden_states=True).hidden_states[-1][0]
    adapt(configs[label])  # restores B
    for adapter, h_torch in ((out / label / "adapter.gguf", h_adapted), (None, h_base)):
        rt = LlamaCpp(out / label / "base.gguf", adapter, n_ctx=64)
        h = rt.hidden(tokens.tolist())
        rt.close()
        effect = (h_adapted - h_base).norm()
        assert (h - h_torch).norm() < 0.25 * effect  # llama.cpp's 8-bit activations: not exact
        ours, _ = block_nll(h, W, tokens)
        ref, _ = block_nll(h_torch, W, tokens)
        assert abs(ours - ref) / 47 < 2e-3


def test_export_stage_writes_every_budget_of_a_coalora_gguf_run(tmp_path):
    """train.py (CoA-LoRA, method.init=lpq, GGUF space) → export.py format=gguf quant.budgets:
    each configuration's base holds the run's allocated types and the restored model's weights."""
    from support import TINY_LM, run_entry

    from coalora.stages.restore import load_run

    run = tmp_path / "run"
    args = [*TINY_LM, "method=coalora", "method.init=lpq", "quant.space.kind=gguf",
            "method.pool={start:4.6,stop:8.0,step:0.4}", "method.eval_budgets=[5.0,6.0]",
            "trainer.max_steps=2", f"hydra.run.dir={run}"]  # fmt: skip
    proc = run_entry("train.py", args, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "gguf"
    export = [f"ckpt={run}", "format=gguf", "quant.budgets=[5.0,6.0]", f"out_dir={out}",
              f"hydra.run.dir={tmp_path / 'export'}"]  # fmt: skip
    proc = run_entry("export.py", export, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_gguf_manifest(out)
    assert sorted(manifest["configurations"]) == ["5", "6"]
    restored = load_run(run, cache_dir=tmp_path / "cache")
    model, method = restored.lit.model, restored.lit.method
    tn = TensorNames("llama", model.config)
    for label, record in manifest["configurations"].items():
        config = json.loads((out / record["config"]).read_text())
        allocated = restored.lit.ctx.allocations(model, [float(label)])[float(label)].config
        assert allocated.to_dict() == config  # the run's recorded allocation at that budget
        method.adapt(model, allocated)
        read = tensors(out / record["base"])
        for name in method.names:
            gname = tn.name(f"{name}.weight")
            assert read[gname].tensor_type.name == config["layers"][name]["gguf"]
            got = tn.from_gguf(gname, dequantized(read[gname]))
            assert torch.equal(got, base_linear(model, name).weight.float())  # W − L, quantized
    # export.gguf_embedding: the embedding's stated type, checked before anything is restored
    q8 = tmp_path / "gguf_q8"
    proc = run_entry("export.py", [f"ckpt={run}", "format=gguf", "quant.budget=5.0",
                                   "gguf_embedding=Q8_0", f"out_dir={q8}",
                                   f"hydra.run.dir={tmp_path / 'export_q8'}"], tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_gguf_manifest(q8)["configurations"]["5"]
    assert tensors(q8 / record["base"])["token_embd.weight"].tensor_type.name == "Q8_0"
    assert record["file_bits_per_weight"] < manifest["configurations"]["5"]["file_bits_per_weight"]
    proc = run_entry("export.py", [f"ckpt={run}", "format=gguf", "quant.budget=5.0",
                                   "gguf_embedding=Q4_9", f"hydra.run.dir={tmp_path / 'bad'}"],
                     tmp_path / "cache")  # fmt: skip
    assert proc.returncode != 0
    assert "gguf_embedding='Q4_9' is not allowed; allowed: ['F32', 'F16', 'Q8_0']" in proc.stderr
