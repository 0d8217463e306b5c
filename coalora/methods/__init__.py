"""Fine-tuning methods behind one interface (docs/architecture.md, "Methods").

A method is ``conf/method/<name>.yaml`` + a module in this package defining a :class:`Method`
subclass whose ``name`` is the yaml's ``method.name``. The registry below is built from this
package's own modules, so a run directory's files can name a method but never a class to import.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from omegaconf import DictConfig

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


def build_method(method_cfg: DictConfig) -> Method:
    """The :class:`Method` named by ``method.name``, built with its config group."""
    name = method_cfg.get("name")
    methods = registry()
    if name not in methods:
        raise ConfigError(
            f"method.name={name!r} is not a coalora method; allowed: {sorted(methods)}"
        )
    return methods[name](method_cfg)


__all__ = ["Method", "MethodContext", "build_method", "registry"]
