"""The stages in a GGUF space (quant.space.kind=gguf) on tiny_llama, whose 64-wide rows take only
the 32-weight types: a CoA-LoRA run with packed storage, evaluate.py's held-out configurations and
search.py keep every layer to the types its rows allow (docs/gguf.md, "The row rule")."""

from __future__ import annotations

import json

import pytest
from support import TINY_LM, run_entry

from coalora.quant.config import ModelQuantConfig
from coalora.quant.gguf_types import allowed

GGUF = ["quant.space.kind=gguf", "method.pool={start:4.5,stop:8.5,step:1.0}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    run = root / "run"
    args = [*TINY_LM, "method=coalora", *GGUF, "method.eval_budgets=[4.5,5.5]",
            "quant.storage=packed", "trainer.max_steps=2", f"hydra.run.dir={run}"]  # fmt: skip
    proc = run_entry("train.py", args, root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, run


def test_evaluate_held_out_configurations_keep_to_allowed_types(run):
    root, run_dir = run
    out = root / "eval"
    args = [f"ckpt={run_dir}", "eval.budgets=[4.5,5.5]", "eval.random_per_budget=2",
            "eval.save_predictions=true", f"hydra.run.dir={out}"]  # fmt: skip
    proc = run_entry("evaluate.py", args, root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    held = [r for r in rows if r["kind"].startswith("random")]
    assert len(held) == 4 and all(abs(r["avg_bits"] - r["budget"]) <= 0.25 for r in held)
    configs = sorted(out.glob("**/*random*.json"))
    assert configs, sorted(p.name for p in out.rglob("*.json"))
    for path in configs:
        config = ModelQuantConfig.from_json(path)
        assert all(allowed(o.type, 64 if "down" not in n else 128) for n, o in config.items())


def test_search_decodes_to_allowed_types(run):
    root, run_dir = run
    out = root / "search"
    args = [f"ckpt={run_dir}", "quant.space.kind=gguf", "search=quick", f"hydra.run.dir={out}"]
    proc = run_entry("search.py", args, root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "configset.json").read_text())
    assert set(data["space"]) == {"gguf"} and data["entries"]
    for entry in data["entries"]:
        assert all(allowed(t, 64) for (t,) in entry["options"]), entry["options"]
    proc = run_entry("search.py", [f"ckpt={run_dir}", "search=quick",
                                   f"hydra.run.dir={root / 'nf'}"], root / "cache")  # fmt: skip
    assert proc.returncode != 0
    assert (
        "quant.space.kind=nf but ckpt=" in proc.stderr
        and "pass quant.space.kind=gguf" in proc.stderr
    )


def test_qlora_with_packed_storage_exports_gguf_from_its_pinned_blocks(tmp_path):
    """Packed storage drops a single-configuration run's originals after setup: the GGUF export
    writes the pinned blocks the run trained on, bit for bit."""
    import torch

    from coalora.deploy.gguf import read_gguf_manifest
    from coalora.stages.restore import load_run

    run = tmp_path / "run"
    args = [*TINY_LM, "method=qlora", "quant=budget", "quant.budget=5.0", "quant.space.kind=gguf",
            "quant.storage=packed", "trainer.max_steps=1", f"hydra.run.dir={run}"]  # fmt: skip
    proc = run_entry("train.py", args, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "gguf"
    proc = run_entry("export.py", [f"ckpt={run}", "format=gguf", f"out_dir={out}",
                                   f"hydra.run.dir={tmp_path / 'export'}"], tmp_path / "cache")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (label,) = read_gguf_manifest(out)["configurations"]
    import gguf

    reader = gguf.GGUFReader(out / label / "base.gguf")
    written = {t.name: t for t in reader.tensors}
    restored = load_run(run, cache_dir=tmp_path / "cache")
    layer = restored.lit.method.qlayers["model.layers.1.mlp.down_proj"]
    assert layer.weight_fp is None  # the original was dropped
    blocks = torch.from_numpy(written["blk.1.ffn_down.weight"].data.copy()).reshape(-1)
    assert torch.equal(blocks, layer._packed.codes.reshape(-1))
