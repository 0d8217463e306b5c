"""Fine-tuning methods behind one interface (docs/architecture.md, "Methods").

A method is ``conf/method/<name>.yaml`` + a module in this package defining a :class:`Method`
subclass whose ``name`` is the yaml's ``method.name``. The registry below is built from this
package's own modules, so a run directory's files can name a method but never a class to import.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.methods.base import Method, MethodContext


@cache
def registry() -> dict[str, type[Method]]:
    """Method name -> class, over every module of ``coalora.methods``."""
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Method)
                and obj is not Method
                and obj.__module__ == module.__name__
                and "name" in vars(obj)
            ):
                found[obj.name] = obj
    return found


CONF = Path(__file__).resolve().parents[2] / "conf"


def _yaml_keys(path: Path, package: str | None) -> set[str]:
    """Keys a config file (and the ``/_shared`` files in its defaults) puts under ``method``."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    keys: set[str] = set()
    for entry in data.get("defaults", []) or []:
        if isinstance(entry, dict):  # {"/search@search_refresh": "default"}, {"override /q": ..}
            entry = next(iter(entry))
        if entry == "_self_":
            continue
        target, _, at = entry.partition("@")
        if target.startswith("/_shared/"):
            keys |= _yaml_keys(CONF / f"{target[1:]}.yaml", None)
        elif target.startswith("/search"):
            keys.add(at.split(".")[-1])
        elif not target.startswith(("/", "override")):  # a sibling file in _shared
            keys |= _yaml_keys(path.parent / f"{target}.yaml", None)
    body = data.get(package, {}) if package else data
    return keys | {k for k in body if k != "defaults"}


@cache
def method_keys(name: str) -> frozenset[str] | None:
    """The keys ``conf/method/<name>.yaml`` declares (None when the conf tree is not beside the
    package, e.g. a wheel install: then unknown keys are not checked)."""
    path = CONF / "method" / f"{name}.yaml"
    return frozenset(_yaml_keys(path, "method")) if path.is_file() else None


def build_method(method_cfg: DictConfig) -> Method:
    """The :class:`Method` named by ``method.name``, built with its config group."""
    name = method_cfg.get("name")
    methods = registry()
    if name not in methods:
        raise ConfigError(
            f"method.name={name!r} is not a coalora method; allowed: {sorted(methods)}"
        )
    known = method_keys(name)
    unknown = sorted(set(method_cfg) - known - {"_target_"}) if known else []
    if unknown:
        raise ConfigError(
            f"method={name} has unknown keys {unknown} (a typo?); allowed: {sorted(known)}"
        )
    return methods[name](method_cfg)


__all__ = ["Method", "MethodContext", "build_method", "method_keys", "registry"]
