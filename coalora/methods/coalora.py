"""CoA-LoRA (configuration-aware LoRA, arXiv 2509.25214): one LoRA + a mapper from each layer's
quantization configuration to an r x r adjustment, ΔW_l = s · B_l (I + γ U(c_l)) A_l.

Training draws k configurations per step (see :mod:`coalora.methods.multiconfig`); for each, the
base is switched through the dequantization cache and the mapper is evaluated for all layers in
one batched call. Adapting to a new configuration (:func:`adapt`) is one mapper call plus folding
B' = B (I + γU) per layer — no training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coalora.adapters.mapper import ConfigMapper
from coalora.methods.base import SetupContext
from coalora.methods.multiconfig import MultiConfigMethod
from coalora.models import layer_index, module_type
from coalora.quant import ModelQuantConfig, set_model_config


class CoALoRA(MultiConfigMethod):
    name = "coalora"

    def setup(self, model: nn.Module, ctx: SetupContext) -> None:
        super().setup(model, ctx)
        patterns = list(ctx.cfg.model.target_modules)
        types = sorted({module_type(n, patterns) for n in self.names})
        positions = [layer_index(n) for n in self.names]
        m = self.cfg.mapper
        sizes = {
            "bits": len(self.space.bits),
            "bits0": len(self.space.bits0),
            "dtype1": len(self.space.dtype1),
            "block0": len(self.space.block0),
            "block1": len(self.space.block1),
            "position": max(int(ctx.cfg.model.num_layers), max(positions) + 1),
            "module": len(types),
        }
        torch.manual_seed(int(ctx.cfg.seed))
        self.mapper = ConfigMapper(
            sizes,
            rank=int(self.cfg.rank),
            emb_dim=m.emb_dim,
            hidden=m.hidden,
            init_std=m.init_std,
            gamma_init=m.gamma_init,
        )
        # (L, 2) static columns: block index and module type of every target layer
        self._static = torch.tensor(
            [[p, types.index(module_type(n, patterns))] for n, p in zip(self.names, positions)]
        )
        self._index_cache: dict[int, tuple[ModelQuantConfig, torch.Tensor]] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {"mapper": self.mapper}

    def config_index(self, config: ModelQuantConfig) -> torch.Tensor:
        """(L, 7) mapper input for ``config``; memoised per configuration object."""
        hit = self._index_cache.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1]
        fields = torch.tensor([self.space.index(config[n]) for n in self.names])  # (L, 5)
        idx = torch.cat([fields, self._static], dim=1)  # (L, 7)
        if len(self._index_cache) > 4096:
            self._index_cache.clear()
        self._index_cache[id(config)] = (config, idx)
        return idx

    def mixing(self, config: ModelQuantConfig) -> torch.Tensor:
        """(L, r, r) = I + γ U(c_l) for every target layer, one batched mapper call."""
        device = self.mapper.fc1.weight.device
        return self.mapper(self.config_index(config).to(device))

    def apply(self, model: nn.Module, config: ModelQuantConfig) -> None:
        set_model_config(model, config, self.qlayers)
        mix = self.mixing(config)
        for i, lora in enumerate(self.loras):
            lora.folded_B = None
            lora.mix = mix[i]

    def after_eval(self, model: nn.Module) -> None:
        for lora in self.loras:  # validation ran under no_grad: drop its detached matrices
            lora.mix = None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mapper_parameters"] = sum(p.numel() for p in self.mapper.parameters())
        return out


@torch.no_grad()
def adapt(holder, configuration: ModelQuantConfig) -> nn.Module:
    """Zero-cost adaptation: switch the base of a trained CoA-LoRA model to ``configuration`` and
    fold B' = B (I + γU(c_l)) into every adapter. ``holder`` is the :class:`CoaloraModule` (or any
    object with ``.model`` and a :class:`CoALoRA` ``.method``). Returns the adapted HF model; its
    adapters now behave as plain LoRA with B' (export with :mod:`coalora.stages.export`)."""
    method, model = holder.method, holder.model
    if not isinstance(method, CoALoRA):
        raise TypeError(f"adapt() needs a CoA-LoRA model, got method={type(method).__name__}")
    configuration.validate_names(method.names)
    set_model_config(model, configuration, method.qlayers)
    mix = method.mixing(configuration)  # (L, r, r)
    for i, lora in enumerate(method.loras):
        lora.mix = None
        lora.folded_B = lora.lora_B @ mix[i]  # (d_out, r)
    return model
