"""The method interface and the pieces every method shares: quantized base, LoRA injection,
freezing, and which parameters train (adapters + task head)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from coalora.adapters import LoRALinear, inject
from coalora.errors import ConfigError
from coalora.models import target_names


@dataclass
class SetupContext:
    """What a method needs to build itself: the resolved run config, the target layers, the data
    (calibration batches) and where to cache derived artifacts."""

    cfg: DictConfig
    names: list[str] = field(default_factory=list)
    datamodule: Any = None
    run_dir: Path | None = None
    cache_dir: Path | None = None


def settings_from_cfg(cls: type, cfg: Any, prefix: str):
    """Build the settings dataclass ``cls`` from a config block, rejecting unknown keys."""
    from dataclasses import fields

    cfg = cfg or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{prefix} has unknown keys {unknown}; allowed: {sorted(known)}")
    return cls(**{k: cfg[k] for k in cfg})


def build_method(cfg: DictConfig) -> Method:
    """Instantiate the class named by ``method._target_`` with the method config."""
    cls = get_class(cfg.method._target_)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method._target_={cfg.method._target_} is not a coalora Method")
    return cls(cfg.method)


class Method:
    """Base class: a frozen (optionally quantized) base with LoRA adapters on the target layers.

    Hooks used by :class:`coalora.lit.CoaloraModule`: ``setup``, ``trainable_parameters``,
    ``training_loss``, ``eval_configs``, ``on_eval_config``, ``extra_state``.
    """

    name = "base"
    #: quant modes a method accepts (``None`` = all)
    quant_modes: tuple[str, ...] | None = None

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.names: list[str] = []
        self.config = None  # ModelQuantConfig of the base, or None (full precision / bnb)
        self.cache = None

    # ---------------------------------------------------------------- setup
    def check(self, full_cfg: DictConfig) -> None:
        """Validate the method/quant pairing before anything is built."""
        from coalora.quant.build import quant_mode, quant_space, uniform_config

        q = full_cfg.quant
        mode = quant_mode(q)
        if self.quant_modes is not None and mode not in self.quant_modes:
            raise ConfigError(
                f"method={self.name} does not support quant={mode}; "
                f"allowed quant modes: {list(self.quant_modes)}"
            )
        rank = self.cfg.get("rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"method.rank={rank!r} must be a positive integer")
        # cheap checks of the quant block before any data or model is loaded
        space = quant_space(q)
        if mode in ("uniform", "nf4"):
            uniform_config(q, space)
        elif mode == "budget":
            b = q.get("budget")
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ConfigError(f"quant.budget={b!r} must be a number (average bits)")
            lo, hi = space.min_bits(), space.max_bits()
            if not lo - 1e-9 <= b <= hi + 1e-9:
                raise ConfigError(
                    f"quant.budget={b} is not achievable with quant.space: min achievable "
                    f"{lo:.4f}, max achievable {hi:.4f} average bits"
                )
        elif mode == "file" and not (q.get("file") and Path(q.file).is_file()):
            raise ConfigError(f"quant.file={q.get('file')!r}: no such configuration file")

    def setup(self, model: nn.Module, ctx: SetupContext) -> None:
        self.names = ctx.names or target_names(model, list(ctx.cfg.model.target_modules))
        self.build_base(model, ctx)
        self.inject_adapters(model, ctx)
        self.freeze(model, ctx)

    def build_base(self, model: nn.Module, ctx: SetupContext) -> None:
        """Quantize the target linears per ``cfg.quant`` (no-op for ``quant=none``)."""
        from coalora.methods.quant_base import quantize_base

        self.config, self.cache = quantize_base(model, self.names, ctx)

    def inject_adapters(self, model: nn.Module, ctx: SetupContext) -> None:
        c = self.cfg
        inject(model, self.names, lambda _, m: LoRALinear(m, c.rank, c.alpha, c.dropout))

    def freeze(self, model: nn.Module, ctx: SetupContext) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in self.trainable_parameters(model):
            p.requires_grad_(True)
        head = list(ctx.cfg.model.get("head_modules", ["classifier", "score"]))
        for n, m in model.named_modules():
            if n.split(".")[-1] in head:
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

    def training_loss(self, lit, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lit.model(**batch).loss

    def extra_state(self) -> dict[str, Any]:
        """Plain-typed state saved in checkpoints next to the trainable parameters."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- evaluation
    def eval_configs(self, ctx: SetupContext) -> dict[str, Any]:
        """Label -> configuration to evaluate; ``""`` means the configuration trained on."""
        return {"": self.config}

    def on_eval_config(self, model: nn.Module, label: str, config) -> None:
        """Switch the model to ``config`` before evaluating it (default: nothing to switch)."""

    def before_eval(self, model: nn.Module) -> None:
        """Called once before a validation pass."""

    def after_eval(self, model: nn.Module) -> None:
        """Called once after a validation pass (restore the training state)."""

    def describe(self) -> dict[str, Any]:
        """Facts for results.json (average bits of the trained configuration, ...)."""
        out: dict[str, Any] = {"method": self.name}
        if self.config is not None:
            out["avg_bits"] = self.config.average_bits()
        return out
