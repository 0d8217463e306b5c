"""The ``search`` config group (conf/search/*.yaml) validated once against the quantization space.

Used by ``search.py`` and by the between-epoch refresh of CoA-LoRA's paper mode, so both run the
same rounds with the same settings (docs/search.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from coalora.errors import ConfigError
from coalora.quant import QuantSpace
from coalora.search.encoding import active_fields
from coalora.search.pool import PoolGrid

log = logging.getLogger(__name__)

GENERATORS = ("finite_difference", "discrete", "both")
KEYS = (
    "iterations",
    "candidates_per_iter",
    "calib_batches",
    "calib_batch_size",
    "fields",
    "generator",
    "max_steps",
    "segments",
    "bits_min",
    "bits_max",
    "pool",
)


def _int(s: Any, key: str, minimum: int = 1) -> int:
    v = s.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"search.{key}={v!r} must be an integer >= {minimum}")
    return v


@dataclass(frozen=True)
class SearchSettings:
    iterations: int
    candidates_per_iter: int
    calib_batches: int
    calib_batch_size: int
    fields: tuple[str, ...] | None
    generator: str
    max_steps: int
    segments: int
    bits_range: tuple[float, float]  # the segments' range, clipped to what the space reaches
    pool: PoolGrid | None

    @classmethod
    def from_cfg(cls, s: Any, space: QuantSpace, check_pool: bool = True) -> SearchSettings:
        unknown = sorted(set(s) - set(KEYS))
        if unknown:
            raise ConfigError(f"search has unknown keys {unknown}; allowed: {list(KEYS)}")
        ints = {
            "iterations": _int(s, "iterations", 0),
            "candidates_per_iter": _int(s, "candidates_per_iter"),
            "calib_batches": _int(s, "calib_batches"),
            "calib_batch_size": _int(s, "calib_batch_size"),
            "max_steps": _int(s, "max_steps"),
            "segments": _int(s, "segments"),
        }
        if s.get("generator") not in GENERATORS:
            raise ConfigError(
                f"search.generator={s.get('generator')!r} not allowed; allowed: {list(GENERATORS)}"
            )
        fields = None if s.get("fields") is None else list(s["fields"])
        try:
            active = active_fields(space, fields)
        except ConfigError as e:
            raise ConfigError(f"search.fields: {e}") from None
        if not active:
            raise ConfigError(
                f"search.fields={fields or 'all'}: every field has a single option in quant.space; "
                "nothing to search"
            )
        pool = None
        if check_pool:
            pool = PoolGrid.from_cfg(s.get("pool"), "search.pool")
            pool.budgets(space, "search.pool")
        return cls(
            **ints,
            fields=None if fields is None else tuple(fields),
            generator=str(s["generator"]),
            bits_range=_bits_range(s, space),
            pool=pool,
        )

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`coalora.search.loop.run_search`."""
        return {
            "iterations": self.iterations,
            "candidates_per_iter": self.candidates_per_iter,
            "fields": None if self.fields is None else list(self.fields),
            "method": self.generator,
            "max_steps": self.max_steps,
            "segments": self.segments,
            "bits_range": self.bits_range,
        }


def _bits_range(s: Any, space: QuantSpace) -> tuple[float, float]:
    """[bits_min, bits_max] clipped to what ``space`` reaches (e.g. quant.space.bits=[2,3,4])."""
    try:
        b0, b1 = float(s["bits_min"]), float(s["bits_max"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"search.bits_min/bits_max must be numbers, got {s.get('bits_min')!r}, "
            f"{s.get('bits_max')!r}"
        ) from None
    if not b0 < b1:
        raise ConfigError(f"search.bits_min={b0:g} must be < search.bits_max={b1:g}")
    lo, hi = space.min_bits(), space.max_bits()
    r = (max(b0, lo), min(b1, hi))
    if not r[0] < r[1]:
        raise ConfigError(
            f"search.bits_min/bits_max=[{b0:g}, {b1:g}] lies outside the achievable average bits "
            f"[{lo:.4f}, {hi:.4f}] of quant.space"
        )
    if r != (b0, b1):
        log.info("segments cover [%.4f, %.4f] (search bits range clipped to quant.space)", *r)
    return r
