"""CoA-LoRA (configuration-aware LoRA, arXiv 2509.25214): one LoRA + a mapper from each layer's
quantization configuration to an r x r adjustment, ΔW_l = s · B_l (I + γ U(c_l)) A_l (§3).

Training draws k configurations per step (see :mod:`coalora.methods.multiconfig`); for each, the
base is switched through the dequantization cache and the mapper is evaluated for all layers in
one batched call. Adapting to a new configuration (:meth:`CoALoRA.adapt`) is one mapper call plus
folding B' = B (I + γU) per layer — no training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from coalora.adapters.mapper import ConfigMapper
from coalora.errors import ConfigError
from coalora.methods.base import MethodContext
from coalora.methods.multiconfig import MultiConfigMethod
from coalora.quant import ModelQuantConfig

#: method.mapper.mix: ``full`` B' = B (I + γU) (arXiv 2509.25214 §3); ``learned`` B' = B₀ +
#: (B − B₀)(I + γU) with B₀ the quantization-aware initialisation's B (the same as ``full`` for
#: ``method.init=zero``, where B₀ = 0)
MIXES = ("full", "learned")


class CoALoRA(MultiConfigMethod):
    name = "coalora"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        # method.mapper.mix: what M multiplies (docs/methods.md, "What the mapper mixes")
        self.mix = cfg.get("mapper", {}).get("mix", "learned")
        if self.mix not in MIXES:
            raise ConfigError(
                f"method.mapper.mix={self.mix!r} is not allowed; allowed: {list(MIXES)}"
            )

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        super().setup(model, ctx)
        types = sorted(set(ctx.module_types))
        positions = list(ctx.positions)
        m = self.cfg.mapper
        # one embedding per field of the space (the five NF fields, or the GGUF type), then the
        # layer's block index and module type (arXiv 2509.25214 §3.2)
        sizes = {f: len(getattr(self.space, f)) for f in self.space.fields}
        sizes["position"] = max(int(ctx.num_layers), max(positions) + 1)
        sizes["module"] = len(types)
        torch.manual_seed(int(ctx.seed))
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
            [[p, types.index(t)] for t, p in zip(ctx.module_types, positions, strict=True)]
        )
        self._index_cache: dict[int, tuple[ModelQuantConfig, torch.Tensor]] = {}
        if self.mix == "learned" and self.shared_init is not None:
            for lora in self.loras:  # B₀ = the initialisation's B (s·B₀·A₀ = L)
                lora.anchor_mixing()

    def modules(self) -> dict[str, nn.Module]:
        return {"mapper": self.mapper}

    def config_index(self, config: ModelQuantConfig) -> torch.Tensor:
        """(L, 7) mapper input for ``config``; memoised per configuration object."""
        hit = self._index_cache.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1]
        fields = torch.tensor([self.space.index(config[n]) for n in self.names])  # (L, F)
        idx = torch.cat([fields, self._static], dim=1)  # (L, F + 2)
        if len(self._index_cache) > 4096:
            self._index_cache.clear()
        self._index_cache[id(config)] = (config, idx)
        return idx

    def mixing(self, config: ModelQuantConfig) -> torch.Tensor:
        """(L, r, r) = I + γ U(c_l) for every target layer, one batched mapper call."""
        device = self.mapper.fc1.weight.device
        return self.mapper(self.config_index(config).to(device))

    @contextlib.contextmanager
    def configured(self, model: nn.Module, config: ModelQuantConfig | None) -> Iterator[nn.Module]:
        with super().configured(model, config), contextlib.ExitStack() as stack:
            mix = self.mixing(config)  # (L, r, r)
            for i, lora in enumerate(self.loras):
                lora.unfold()
                stack.enter_context(lora.mixing(mix[i]))
            yield model

    @torch.no_grad()
    def adapt(self, model: nn.Module, config: ModelQuantConfig | None) -> nn.Module:
        """Zero-cost adaptation: switch the base and fold B' = B (I + γU(c_l)) into every
        adapter; the adapters then behave as plain LoRA with B' (the PEFT export)."""
        super().adapt(model, config)
        mix = self.mixing(config)  # (L, r, r)
        for i, lora in enumerate(self.loras):
            lora.fold(mix[i])
        return model

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mapper_parameters"] = sum(p.numel() for p in self.mapper.parameters())
        return out
