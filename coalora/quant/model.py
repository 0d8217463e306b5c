"""Model-level quantization: find target linears, swap them for ``QuantLinear``, switch configs,
freeze a fixed set of configurations and account the model's weight bytes.

docs/architecture.md ("Naming"): target module names are full dotted names from
``model.named_modules()`` before any wrapping; configurations are keyed by them, and
``base_linear`` finds the linear under a name through adapter wrappers. Embeddings, layer norms
and heads are never targets unless a pattern names them. ``freeze_model`` quantizes a fixed set of
configurations up front and drops (or moves to the CPU) the full-precision originals;
``resident_weight_bytes`` and ``formula_weight_bytes`` hold a model's weight memory against the
storage formula (docs/packed.md).
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


def _base_slot(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(owner, attribute, module) of the linear under ``name``: the module at ``name``, or, when an
    adapter wraps it, the one at the end of the ``base_layer`` chain (docs/architecture.md,
    "Naming")."""
    parent, child = _split(name)
    owner = model.get_submodule(parent) if parent else model
    attr, module = child, model.get_submodule(name)
    while not isinstance(module, (QuantLinear, nn.Linear)) and hasattr(module, "base_layer"):
        owner, attr, module = module, "base_layer", module.base_layer
    return owner, attr, module


def base_linear(model: nn.Module, name: str) -> nn.Module:
    """The base layer of target ``name``: its ``QuantLinear`` / ``nn.Linear`` through any adapter
    wrappers (the module at ``name`` itself when nothing wraps it). Anything else at the end of
    the chain (e.g. bitsandbytes' ``Linear4bit``) is returned as it is, for the caller to judge."""
    return _base_slot(model, name)[2]


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
            owner, attr, module = _base_slot(model, name)  # through adapter wrappers
        except AttributeError:
            raise ValueError(f"target module {name!r} not found in the model") from None
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
        module = base_linear(model, name)
        if isinstance(module, QuantLinear):
            out[name] = module.weight_fp
        elif isinstance(module, nn.Linear):
            out[name] = module.weight.detach()
        else:
            raise TypeError(f"{name!r} is {type(module).__name__}; no linear weight found")
    return out


def freeze_model(
    model: nn.Module,
    configs: Iterable[ModelQuantConfig],
    keep_original: str = "drop",
    layers: Mapping | None = None,
) -> dict[str, int]:
    """Quantize every (layer, option) of ``configs`` now, pin it in its layer, and drop the
    full-precision original (``"drop"``), move it to the CPU (``"cpu"``) or keep it (``"device"``).

    Afterwards switching among ``configs`` never needs the original; a configuration outside them
    needs ``keep_original != "drop"``. Returns name → pinned bytes.
    """
    layers = quant_layers(model) if layers is None else layers
    configs = list(configs)
    for config in configs:
        config.validate_names(layers)
    return {
        name: layer.freeze([c[name] for c in configs], keep_original=keep_original)
        for name, layer in layers.items()
    }


def own_frozen_weights(model: nn.Module) -> int:
    """Give every frozen parameter and buffer outside the ``QuantLinear`` layers its own memory.

    ``from_pretrained`` memory-maps a safetensors checkpoint: the loaded weights are views of one
    file mapping, so after :func:`freeze_model` drops the targets' originals the remaining views
    (embeddings, norms) keep the whole mapping alive, and with it the pages of the dropped
    weights that quantization read (measured on SmolLM2-135M: 540 MiB file-backed RSS before,
    125 MiB after; docs/packed.md). Copies them (tied weights once); returns the bytes copied."""
    seen: set[int] = set()
    copied = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is None or id(t) in seen or t.requires_grad:
                    continue
                seen.add(id(t))
                if isinstance(t, nn.Parameter):
                    t.data = t.data.clone()
                else:
                    store[key] = t.clone()
                    seen.add(id(store[key]))
                copied += _nbytes(t)
    return copied


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds for its weights: ``quantized`` (the current configuration of every
    ``QuantLinear``: packed entry or dequantized tensor), ``original`` (full-precision originals
    still held), ``other`` (every other parameter and buffer, biases included), ``total``."""
    layers = quant_layers(model)
    quantized = sum(layer.current_nbytes() for layer in layers.values())
    original = sum(layer.original_nbytes() for layer in layers.values())
    seen: set[int] = set()
    other = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("weight_fp") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += _nbytes(t)
    return {
        "quantized": quantized,
        "original": original,
        "other": other,
        "total": quantized + original + other,
    }


def formula_weight_bytes(model: nn.Module, config: ModelQuantConfig) -> float:
    """The storage formula: average bits × target parameters / 8 + every non-target weight."""
    layers = quant_layers(model)
    config.validate_names(layers)
    targets = config.total_bits() / 8
    return targets + resident_weight_bytes(model)["other"]


__all__ = [
    "base_linear",
    "formula_weight_bytes",
    "freeze_model",
    "model_weights",
    "own_frozen_weights",
    "resident_weight_bytes",
    "quant_layers",
    "quantize_model",
    "set_model_config",
    "target_linear_names",
]
