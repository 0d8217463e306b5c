"""Resolve the ``quant`` config group (conf/quant/*.yaml) into a model configuration.

Modes (DESIGN §3): ``none`` (full precision), ``uniform`` / ``nf4`` (one QuantConfig for every
target layer; nf4 = (4, 8, fp32, 64, 256) = 4.127 bits), ``budget`` (ILP allocation at
``quant.budget`` average bits, research/algorithms.md §2), ``file`` (a ModelQuantConfig JSON) and
``bnb_nf4`` (bitsandbytes Linear4bit; no ModelQuantConfig, the caller uses ``quant.bnb``).
Only duck-typed mapping access to the config: a DictConfig or a plain dict both work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from coalora.errors import ConfigError
from coalora.quant.allocation import SOLVERS, allocate, build_error_table, cached_error_table
from coalora.quant.config import FIELDS, ModelQuantConfig, QuantConfig, QuantSpace
from coalora.quant.linear import DequantCache

MODES = ("none", "uniform", "nf4", "budget", "file", "bnb_nf4")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if cfg is not None else default


def quant_mode(quant_cfg: Any) -> str:
    mode = _get(quant_cfg, "mode", "none")
    if mode not in MODES:
        raise ConfigError(f"quant.mode={mode!r} is not allowed; allowed: {list(MODES)}")
    return mode


def quant_space(quant_cfg: Any) -> QuantSpace:
    return QuantSpace.from_cfg(_get(quant_cfg, "space"), prefix="quant.space")


def build_cache(quant_cfg: Any) -> DequantCache:
    limit = _get(quant_cfg, "cache_limit_mb", 4096)
    try:
        return DequantCache(float(limit))
    except (TypeError, ValueError):
        raise ConfigError(f"quant.cache_limit_mb={limit!r} must be a number ≥ 0") from None


def uniform_config(quant_cfg: Any, space: QuantSpace | None = None) -> QuantConfig:
    """``quant.config`` validated field by field against ``quant.space``."""
    space = space or quant_space(quant_cfg)
    cfg = _get(quant_cfg, "config")
    if cfg is None:
        raise ConfigError(f"quant.config must be set for quant.mode={quant_mode(quant_cfg)}")
    for name in FIELDS:
        if name not in cfg:
            raise ConfigError(f"quant.config.{name} is missing; expected fields {list(FIELDS)}")
        allowed = getattr(space, name)
        if cfg[name] not in allowed or isinstance(cfg[name], bool):
            raise ConfigError(
                f"quant.config.{name}={cfg[name]!r} is not allowed; allowed: {list(allowed)}"
            )
    return QuantConfig.from_dict(cfg, prefix="quant.config")


def build_model_config(
    quant_cfg: Any,
    weights: Mapping[str, Tensor] | None,
    numels: Mapping[str, int] | None = None,
    cache_dir: str | None = None,
    model_name: str = "model",
    fisher: Mapping[str, Tensor] | None = None,
) -> ModelQuantConfig | None:
    """The ModelQuantConfig that ``quant_cfg`` asks for, or None for ``none`` / ``bnb_nf4``.

    ``weights`` (target name → fp weight) are needed for ``budget``; ``numels`` default to the
    weights' sizes. ``cache_dir`` + ``model_name`` key the on-disk error table
    (``quant.table_cache``). ``fisher`` (from ``fisher_diagonal``) is required when
    ``quant.fisher`` is true.
    """
    mode = quant_mode(quant_cfg)
    if mode in ("none", "bnb_nf4"):
        return None
    if numels is None:
        if weights is None:
            raise ValueError("build_model_config needs weights or numels")
        numels = {n: int(w.numel()) for n, w in weights.items()}
    space = quant_space(quant_cfg)
    if mode in ("uniform", "nf4"):
        return ModelQuantConfig.uniform(numels, uniform_config(quant_cfg, space))
    if mode == "file":
        return _from_file(quant_cfg, numels)
    return _from_budget(quant_cfg, weights, numels, space, cache_dir, model_name, fisher)


def _from_file(quant_cfg: Any, numels: Mapping[str, int]) -> ModelQuantConfig:
    path = _get(quant_cfg, "file")
    if not path:
        raise ConfigError("quant.file must be set for quant.mode=file (a quant_config.json path)")
    config = ModelQuantConfig.from_json(path)
    config.validate_names(list(numels))
    bad = {n: (config.numels[n], numels[n]) for n in numels if config.numels[n] != numels[n]}
    if bad:
        raise ValueError(f"{path}: layer sizes differ from the model's (file, model): {bad}")
    return ModelQuantConfig({n: config[n] for n in numels}, numels)  # the model's layer order


def _from_budget(
    quant_cfg: Any,
    weights: Mapping[str, Tensor] | None,
    numels: Mapping[str, int],
    space: QuantSpace,
    cache_dir: str | None,
    model_name: str,
    fisher: Mapping[str, Tensor] | None,
) -> ModelQuantConfig:
    budget = _get(quant_cfg, "budget")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(
            f"quant.budget={budget!r} must be a number (average bits) for quant.mode=budget"
        )
    solver = _get(quant_cfg, "solver", "milp")
    if solver not in SOLVERS:
        raise ConfigError(f"quant.solver={solver!r} is not allowed; allowed: {list(SOLVERS)}")
    if weights is None:
        raise ValueError("quant.mode=budget needs the target weights to compute errors")
    if _get(quant_cfg, "fisher", False):
        if fisher is None:
            raise ConfigError(
                "quant.fisher=true needs a Fisher diagonal (coalora.quant.fisher_diagonal); none was given"
            )
    else:
        fisher = None
    if _get(quant_cfg, "table_cache", True) and cache_dir:
        table = cached_error_table(weights, space, cache_dir, model_name, fisher)
    else:
        table = build_error_table(weights, space, fisher)
    config = allocate(weights, float(budget), space, table=table, solver=solver)
    return ModelQuantConfig(dict(config.configs), numels)


__all__ = [
    "MODES",
    "build_cache",
    "build_model_config",
    "quant_mode",
    "quant_space",
    "uniform_config",
]
