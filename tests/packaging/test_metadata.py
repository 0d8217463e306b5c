"""pyproject.toml declares what README says: the base install is the loader, the `train` extra
holds the training stack, `make install` (dev + hydra extras) gets everything, the notebook has
its extra, and the license file exists."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
TRAINING_STACK = {"lightning", "hydra-core", "omegaconf", "botorch", "gpytorch", "wandb"}


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def expand(extras: set[str]) -> set[str]:
    """The distributions that ``pip install 'coalora[<extras>]'`` asks for (self-references
    such as ``coalora[train]`` followed)."""
    wanted = names(PROJECT["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, EXTRAS[extra]):
            if canonicalize_name(r.name) == "coalora":
                todo.extend(r.extras)
            else:
                wanted.add(canonicalize_name(r.name))
    return wanted


def test_base_dependencies_are_the_loader_only():
    assert names(PROJECT["dependencies"]) == {"torch", "transformers", "safetensors", "numpy"}


def test_train_extra_holds_the_training_stack():
    assert TRAINING_STACK | {"bitsandbytes", "datasets", "scipy"} <= names(EXTRAS["train"])


def test_make_install_gets_training_and_test_tools():
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if " -e '." in x)
    extras = set(re.search(r"-e '\.\[([^\]]*)\]'", line).group(1).split(","))
    assert TRAINING_STACK | {"pytest", "peft", "hydra-joblib-launcher"} <= expand(extras)


def test_notebook_extra_covers_the_notebook_imports():
    assert {"jupyterlab", "pandas", "matplotlib"} | TRAINING_STACK <= expand({"notebook"})


def test_readme_documents_the_loader_only_install_and_license_is_apache():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Installing only the loader", 1)[1].split("\n#", 1)[0]
    assert "pip install ." in section and "'.[train]'" in section and "deploy.load" in section
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_heads_with_the_package_version():
    import coalora

    first = next(x for x in (ROOT / "CHANGELOG.md").read_text().splitlines() if x.startswith("## "))
    assert first.startswith(f"## [{PROJECT['version']}]")
    assert coalora.__version__ == PROJECT["version"]


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert pages and not [p for p in pages if f"]({p})" not in index]
