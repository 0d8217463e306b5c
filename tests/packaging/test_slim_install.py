"""A loader-only install serves packed exports (README, "Installing only the loader"): with only
pyproject's base dependencies and what they require on the path, ``coalora.deploy.load`` gives
the logits of a full install and the training stack (Lightning, Hydra, botorch, W&B,
bitsandbytes) cannot be imported; the training commands say which extra to install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import tiny_bert_classifier

from coalora import deploy
from coalora.quant import (
    NF3,
    NF4,
    DequantCache,
    ModelQuantConfig,
    quantize_model,
    target_linear_names,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
TRAINING_STACK = [
    "lightning",
    "pytorch_lightning",
    "hydra",
    "omegaconf",
    "botorch",
    "gpytorch",
    "wandb",
    "bitsandbytes",
    "datasets",
]


def base_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def requirement_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions that ``pip install <requirements>`` would bring, found through
    their metadata (markers evaluated here, requested extras followed)."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                dist = found.setdefault(name, metadata.distribution(name))
            except metadata.PackageNotFoundError:
                continue  # not needed on this platform; a missing import fails the load below
            for r in map(Requirement, dist.requires or []):
                if r.marker is None or r.marker.evaluate({"extra": extra}):
                    todo.append(r)
    return list(found.values())


def slim_site(root: Path) -> Path:
    """A site directory holding links to coalora and the base dependencies' closure only."""
    site = root / "site"
    site.mkdir()
    (site / "coalora").symlink_to(ROOT / "coalora")
    for dist in requirement_closure(base_requirements()):
        assert dist.files, f"{dist.metadata['Name']}: no RECORD, cannot tell its files"
        for top in sorted({f.parts[0] for f in dist.files if f.parts[0] != ".."}):
            if top.endswith(".pth") or top == "__pycache__" or (site / top).exists():
                continue
            (site / top).symlink_to(dist.locate_file(top))
    return site


def run_slim(site: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``python -S <args>`` with ``site`` as the only non-standard-library path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-S", *args],
        cwd=site.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def tiny_export(out: Path) -> Path:
    model = tiny_bert_classifier(hidden=64, layers=1, seed=0, num_labels=2)
    names = target_linear_names(model, ["query", "value"])
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    configs = {
        "3.0": ModelQuantConfig.uniform(numels, NF3),
        "4.1": ModelQuantConfig.uniform(numels, NF4),
    }
    quantize_model(model, names, configs["3.0"], DequantCache(storage="packed"))
    return deploy.save_packed(model, names, configs, None, out)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return slim_site(tmp_path_factory.mktemp("slim"))


def test_loader_only_install_serves_a_packed_export(site, tmp_path):
    path = tiny_export(tmp_path / "packed")
    ids = [[1, 5, 7, 9, 2]]
    code = (
        "import importlib.util, json, sys, torch\n"
        "import coalora.deploy as d\n"
        f"present = [n for n in {TRAINING_STACK!r} if importlib.util.find_spec(n) is not None]\n"
        "assert not present, f'importable in the slim install: {present}'\n"
        f"m = d.load({str(path)!r}, budget='3.0')\n"
        "with torch.no_grad():\n"
        f"    print(json.dumps(m(torch.tensor({ids})).logits.tolist()))\n"
    )
    out = run_slim(site, ["-c", code])
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        expected = deploy.load(path, budget="3.0")(torch.tensor(ids)).logits
    served = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)


def test_training_commands_name_the_extra_on_a_loader_only_install(site):
    out = run_slim(site, ["-m", "coalora.cli", "train", "--cfg", "job"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: the train stage needs the training stack (hydra is not installed): "
        "pip install 'coalora[train]'"
    ]
