"""Model-level quantization: find target linears, swap them for ``QuantLinear``, switch configs.

docs/architecture.md ("Naming"): target module names are full dotted names from
``model.named_modules()`` before any wrapping; configurations are keyed by them. Embeddings, layer
norms and heads are never targets unless a pattern names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from coalora.quant.config import ModelQuantConfig
from coalora.quant.linear import DequantCache, QuantLinear


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def target_linear_names(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose name ends with a pattern on a dotted boundary.

    ``"output.dense"`` matches both ``...attention.output.dense`` and ``...layer.0.output.dense``
    (as in LQ-LoRA, arXiv 2311.12023) but not ``...output.dense_x`` or ``...routput.dense``; a
    pattern may itself be a full name. Returned in ``named_modules()`` order, each once. Raises
    ``ValueError`` when nothing matches.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(_matches(name, p) for p in patterns)
    ]
    if not names:
        raise ValueError(f"no nn.Linear module matches target patterns {patterns}")
    return names


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` of ``model`` (the one module-replace helper)."""
    parent, child = _split(name)
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(
    model: nn.Module,
    names: Iterable[str],
    config: ModelQuantConfig | None,
    cache: DequantCache | None = None,
) -> dict[str, QuantLinear]:
    """Replace each named ``nn.Linear`` in place by a ``QuantLinear`` and set ``config`` (None =
    full precision). Already-replaced layers are reused. Returns name → QuantLinear."""
    names = list(names)
    if config is not None:
        config.validate_names(names)
    cache = cache if cache is not None else DequantCache()
    layers: dict[str, QuantLinear] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"target module {name!r} not found in the model") from None
        owner, attr = (
            (model.get_submodule(_split(name)[0]) if "." in name else model),
            _split(name)[1],
        )
        if not isinstance(module, (QuantLinear, nn.Linear)) and hasattr(module, "base_layer"):
            owner, attr, module = (
                module,
                "base_layer",
                module.base_layer,
            )  # already wrapped by an adapter
        if isinstance(module, QuantLinear):
            layer = module
        elif isinstance(module, nn.Linear):
            layer = QuantLinear(module, name, cache)
            setattr(owner, attr, layer)
        else:
            raise TypeError(f"target module {name!r} is {type(module).__name__}, not nn.Linear")
        layer.set_config(None if config is None else config[name])
        layers[name] = layer
    return layers


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every ``QuantLinear`` in ``model`` by its target name (works after adapter wrapping)."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantLinear)}


def set_model_config(
    model: nn.Module,
    config: ModelQuantConfig | Mapping | None,
    layers: Mapping[str, QuantLinear] | None = None,
) -> None:
    """Switch every ``QuantLinear`` of ``model`` to ``config`` (None = full precision).

    A cache lookup per layer after first use. ``layers`` (from ``quantize_model``) skips the module
    walk. The config must name exactly the model's quantized layers.
    """
    layers = quant_layers(model) if layers is None else layers
    if config is None:
        for layer in layers.values():
            layer.set_config(None)
        return
    if isinstance(config, ModelQuantConfig):
        config.validate_names(layers)
    elif set(config) != set(layers):
        raise ValueError(
            f"config does not match the quantized layers: unknown {sorted(set(config) - set(layers))}; "
            f"missing {sorted(set(layers) - set(config))}"
        )
    for name, layer in layers.items():
        layer.set_config(config[name])


def model_weights(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """The full-precision weight of each target (through adapter wrappers and ``QuantLinear``)."""
    out: dict[str, Tensor] = {}
    for name in names:
        module = model.get_submodule(name)
        while not isinstance(module, (QuantLinear, nn.Linear)) and hasattr(module, "base_layer"):
            module = module.base_layer
        if isinstance(module, QuantLinear):
            out[name] = module.weight_fp
        elif isinstance(module, nn.Linear):
            out[name] = module.weight.detach()
        else:
            raise TypeError(f"{name!r} is {type(module).__name__}; no linear weight found")
    return out


__all__ = [
    "model_weights",
    "quant_layers",
    "quantize_model",
    "set_model_config",
    "target_linear_names",
]
