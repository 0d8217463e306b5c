"""Target layers read off the model structure: name, block index and module type of each.

The CoA-LoRA mapper (arXiv 2509.25214, §3.2) embeds each layer's position and module type next
to its quantization configuration. Both come from the module tree, not from parsing names:

* **block index**: the index of the layer's ancestor in the model's outermost ``nn.ModuleList``
  (``model.layers[3]`` for LLaMA/Qwen, ``bert.encoder.layer[3]`` for BERT); 0 for a target that
  sits outside any ``ModuleList``;
* **module type**: the longest ``model.target_modules`` pattern the name ends with on a dotted
  boundary. For decoders this is the ``nn.Linear``'s attribute name (``q_proj`` … ``down_proj``);
  for BERT it keeps ``attention.output.dense`` and the FFN ``output.dense`` apart although both
  are attributes called ``dense``.

Names come from the one target finder :func:`coalora.quant.model.target_linear_names`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from coalora.errors import ConfigError
from coalora.quant.model import target_linear_names


@dataclass(frozen=True)
class TargetLayer:
    name: str  # full dotted name in ``model.named_modules()`` before any wrapping
    block: int  # index in the outermost ModuleList of blocks
    module_type: str  # the longest matching target pattern


def find_target_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Target ``nn.Linear`` names in ``named_modules()`` order; a ConfigError when none match."""
    patterns = [str(p) for p in patterns]
    try:
        return target_linear_names(model, patterns)
    except ValueError:
        raise ConfigError(
            f"model.target_modules={patterns} matches no nn.Linear of this model "
            f"({type(model).__name__})"
        ) from None


def matching_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """Longest pattern that ``name`` ends with on a dotted boundary, or None."""
    best = None
    for p in patterns:
        if (name == p or name.endswith("." + p)) and (best is None or len(p) > len(best)):
            best = p
    return best


def _block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList`` modules (blocks), nested lists excluded."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    return [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n)]


def block_index(model_lists: list[str], name: str) -> int:
    """Index of ``name``'s block: the child of an outermost ModuleList it lives under."""
    for prefix in model_lists:
        if name.startswith(prefix + "."):
            return int(name[len(prefix) + 1 :].split(".", 1)[0])
    return 0


def find_targets(model: nn.Module, patterns: Iterable[str]) -> list[TargetLayer]:
    """Every target layer with its block index and module type (``named_modules()`` order)."""
    patterns = [str(p) for p in patterns]
    lists = _block_lists(model)
    out = []
    for name in find_target_names(model, patterns):
        kind = matching_pattern(name, patterns)
        assert kind is not None  # target_linear_names matched it
        out.append(TargetLayer(name, block_index(lists, name), kind))
    return out


def num_blocks(model: nn.Module) -> int:
    """Length of the model's longest outermost ModuleList (its number of transformer blocks)."""
    sizes = [len(model.get_submodule(n)) for n in _block_lists(model)]
    return max(sizes, default=1)
