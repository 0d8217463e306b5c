"""Replace named submodules by wrappers built from them (module injection)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from coalora.quant.model import replace_module


def inject(
    model: nn.Module, names: list[str], factory: Callable[[str, nn.Module], nn.Module]
) -> dict[str, nn.Module]:
    """Wrap each module in ``names`` with ``factory(name, module)``; returns name -> wrapper."""
    out: dict[str, nn.Module] = {}
    for name in names:
        wrapped = factory(name, model.get_submodule(name))
        replace_module(model, name, wrapped)
        out[name] = wrapped
    return out


def adapter_modules(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    """Name -> module for every module of type ``cls`` (adapter wrappers) in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}
