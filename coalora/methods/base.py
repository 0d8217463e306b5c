"""The method interface and what every method shares: the quantized base, LoRA injection,
freezing, and which parameters train (adapters + task head). docs/architecture.md ("Methods")
shows the smallest complete method.

A method receives what it needs, never the whole run config or the LightningModule: its own
config group (``cfg.method``) at construction, the validated quant settings in :meth:`check`, and
a :class:`MethodContext` (target names, layer structure, seed, calibration batches, cache) in
:meth:`setup`. Capabilities are declared, not guessed: ``switches_configs`` (the trained adapter
serves any configuration) and ``export_formats``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from coalora.adapters import LoRALinear, inject
from coalora.errors import ConfigError
from coalora.methods.context import Batch, MethodContext
from coalora.quant import (
    ModelQuantConfig,
    QuantSettings,
    freeze_model,
    model_weights,
    own_frozen_weights,
    quantize_model,
)
from coalora.quant.bnb import replace_with_bnb_nf4  # imports bitsandbytes lazily
from coalora.quant.build import Allocation


def settings_from_cfg(cls: type, cfg: Any, prefix: str):
    """Build the settings dataclass ``cls`` from a config block, rejecting unknown keys."""
    cfg = cfg or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{prefix} has unknown keys {unknown}; allowed: {sorted(known)}")
    return cls(**{k: cfg[k] for k in cfg})


def _positive_number(cfg: DictConfig, key: str) -> None:
    v = cfg.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(f"method.{key}={v!r} must be a number > 0")


class Method:
    """A frozen (optionally quantized) base with LoRA adapters on the target layers.

    Hooks used by the LightningModule and the stages: ``check``, ``setup``,
    ``trainable_parameters``, ``modules``, ``training_loss``, ``eval_configs``, ``configured``,
    ``adapt``, ``extra_state``, ``describe``.
    """

    name = "base"
    #: quant modes a method accepts (``None`` = all)
    quant_modes: tuple[str, ...] | None = None
    #: the trained adapter serves any configuration of the space (evaluate at any budget, search)
    switches_configs = False
    #: ``export.py format=`` values this method supports (the first is the default)
    export_formats: tuple[str, ...] = ("peft", "merged", "packed")

    @classmethod
    def export_refusal(cls, cfg: DictConfig, fmt: str) -> str | None:
        """Why a run of this method with config ``cfg`` (its ``method`` group) cannot be exported
        as ``fmt``, one of ``export_formats`` (None: it can)."""
        return None

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.names: list[str] = []
        self.config: ModelQuantConfig | None = None  # the base's configuration (None: fp / bnb)
        # budget -> the allocation the run trains or is validated on (recorded in allocations.json)
        self.solved: dict[float, Allocation] = {}
        self.cache = None

    # ---------------------------------------------------------------- validation
    def check(self, quant: QuantSettings) -> None:
        """Validate the method config and its pairing with ``quant`` before anything is built."""
        if self.quant_modes is not None and quant.mode not in self.quant_modes:
            raise ConfigError(
                f"method={self.name} does not support quant={quant.mode}; "
                f"allowed quant modes: {list(self.quant_modes)}"
            )
        c = self.cfg
        rank = c.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"method.rank={rank!r} must be a positive integer")
        _positive_number(c, "alpha")
        _positive_number(c, "lr")
        d = c.get("dropout")
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1
        ):
            raise ConfigError(f"method.dropout={d!r} must be a number in [0, 1)")

    # ---------------------------------------------------------------- setup
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        self.names = list(ctx.names)
        self.build_base(model, ctx)
        self.inject_adapters(model, ctx)
        self.freeze(model, ctx)
        self.release_original(model, ctx)

    def release_original(self, model: nn.Module, ctx: MethodContext) -> None:
        """With packed storage, pin the one trained configuration's packed entries and free the
        full-precision originals: a fixed-configuration method never quantizes anything else,
        so the base's resident weights are the packed size (docs/packed.md)."""
        if getattr(self, "config", None) is None or ctx.quant.storage != "packed":
            return
        layers = getattr(self, "qlayers", None)
        if layers:
            freeze_model(model, [self.config], keep_original="drop", layers=layers)
            own_frozen_weights(model)  # release the checkpoint's file mapping

    def build_base(self, model: nn.Module, ctx: MethodContext) -> None:
        """Quantize the target linears per the quant settings (no-op for ``quant=none``)."""
        q = ctx.quant
        if q.mode == "none":
            return
        if q.mode == "bnb_nf4":
            replace_with_bnb_nf4(model, self.names)
            return

        if q.mode == "budget":  # the run's allocation (recorded, else with its sensitivity)
            self.solved = ctx.allocations(model, [q.budget])
            self.config = self.solved[q.budget].config
        else:
            self.config = q.base_config(model_weights(model, self.names), None)
        self.cache = q.build_cache()
        self.qlayers = quantize_model(model, self.names, self.config, self.cache)

    def inject_adapters(self, model: nn.Module, ctx: MethodContext) -> None:
        c = self.cfg
        inject(model, self.names, lambda _, m: LoRALinear(m, c.rank, c.alpha, c.dropout))

    def freeze(self, model: nn.Module, ctx: MethodContext) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in self.trainable_parameters(model):
            p.requires_grad_(True)
        for n, m in model.named_modules():
            if n.split(".")[-1] in ctx.head_modules:
                for p in m.parameters():
                    p.requires_grad_(True)

    # ---------------------------------------------------------------- training
    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """Adapter parameters (the head is added by ``freeze``)."""
        for n, m in model.named_modules():
            if isinstance(m, LoRALinear):
                for pn, p in m.adapter_parameters().items():
                    yield f"{n}.{pn}", p

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules the method owns besides the model (e.g. the CoA-LoRA mapper)."""
        return {}

    def training_loss(self, model: nn.Module, batch: Batch, step: int) -> Tensor:
        """The loss of one optimisation step (``step`` = the global step, for seeded draws)."""
        return model(**batch).loss

    def train_configs(self) -> list[ModelQuantConfig] | None:
        """The configurations training draws from (None: the one ``config``)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """Plain-typed state saved in checkpoints next to the trainable parameters."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- configurations
    def eval_configs(self) -> dict[str, ModelQuantConfig | None]:
        """Label -> configuration to validate on; ``""`` means the configuration trained on."""
        return {"": self.config}

    def check_serves(self, config: ModelQuantConfig | None) -> None:
        """A single-configuration method serves only the configuration it was trained on."""
        if self.switches_configs or config is None or config is self.config:
            return
        if self.config is None or config.to_dict() != self.config.to_dict():
            bits = "full precision" if self.config is None else f"{self.config.average_bits():.4f}"
            raise ConfigError(
                f"method={self.name} was trained on one configuration ({bits} bits) and serves "
                f"only that one, not a {config.average_bits():.4f}-bit configuration"
            )

    @contextlib.contextmanager
    def configured(self, model: nn.Module, config: ModelQuantConfig | None) -> Iterator[nn.Module]:
        """``with method.configured(model, c):`` runs the model in configuration ``c``."""
        self.check_serves(config)
        yield model

    def adapt(self, model: nn.Module, config: ModelQuantConfig | None) -> nn.Module:
        """Put ``model`` into ``config`` until the next switch, for export or deployment:
        the base is switched and any per-configuration adapter state is folded in."""
        self.check_serves(config)
        return model

    def describe(self) -> dict[str, Any]:
        """Facts for results.json (average bits of the trained configuration, ...)."""
        out: dict[str, Any] = {"method": self.name}
        if self.config is not None:
            out["avg_bits"] = self.config.average_bits()
        return out


__all__ = ["Batch", "Method", "MethodContext", "settings_from_cfg"]
