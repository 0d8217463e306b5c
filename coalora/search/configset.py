"""`configset.json`: the versioned hand-over from the search stage to training (docs/search.md, "configset.json").

A ConfigSet holds the target layer names (in ``named_modules()`` order), their parameter counts,
the option lists of the searched space, and entries: one configuration each (per-layer
``[bits, bits0, dtype1, block0, block1]`` aligned with ``layer_names``, or ``[type]`` in a GGUF
space, whose ``space`` is ``{"gguf": [types]}``), its average bits, its
objective values, whether segmented Pareto selection kept it, and where it came from
(``"allocation@3.0"``, ``"search/iter3"``, ``"random"``). Provenance records git sha, seed, model,
task, creation time and command.

`ConfigSet.load` is strict: every problem is reported with what is wrong and what was expected.
This module must not import botorch (training reads configsets without the search stack).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coalora.errors import ConfigError
from coalora.io import atomic_write_text, compact_json, read_json
from coalora.quant.config import GGUFOption, LayerOption, ModelQuantConfig, QuantConfig, QuantSpace

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
FIELDS: tuple[str, ...] = ("bits", "bits0", "dtype1", "block0", "block1")
GGUF_FIELDS: tuple[str, ...] = ("gguf",)
TOP_KEYS = ("schema_version", "layer_names", "numels", "space", "entries", "provenance")
ENTRY_KEYS = ("id", "options", "avg_bits", "objectives", "pareto", "source")
AVG_BITS_TOL = 1e-6


@dataclass
class ConfigEntry:
    id: str
    options: list[list]  # (n_layers, 5) values aligned with ConfigSet.layer_names
    avg_bits: float
    objectives: dict[str, float] = field(default_factory=dict)
    pareto: bool = False
    source: str = ""


@dataclass
class ConfigSet:
    schema_version: int = SCHEMA_VERSION
    layer_names: list[str] = field(default_factory=list)
    numels: dict[str, int] = field(default_factory=dict)
    space: dict[str, list] = field(default_factory=dict)
    entries: list[ConfigEntry] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    # ---------------------------------------------------------------- file I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["numels"] = {n: int(self.numels[n]) for n in self.layer_names}
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Validate, then write atomically (temp file in the same folder + rename)."""
        data = self.to_dict()
        _validate(data, where="configset to save")
        return atomic_write_text(path, compact_json(data) + "\n")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected_names: Sequence[str] | None = None,
        space: QuantSpace | None = None,
    ) -> ConfigSet:
        """Read and validate ``path``; with ``expected_names`` the entries are reordered to it."""
        path = Path(path)
        data = read_json(path, "configset")
        return cls.from_dict(
            data, expected_names=expected_names, space=space, where=f"configset {path}"
        )

    @classmethod
    def from_dict(
        cls,
        data: Any,
        expected_names: Sequence[str] | None = None,
        space: QuantSpace | None = None,
        where: str = "configset",
    ) -> ConfigSet:
        return _validate(data, where, expected_names, space)

    # ---------------------------------------------------------------- conversions
    def to_model_configs(self) -> list[ModelQuantConfig]:
        return [self.entry_config(e) for e in self.entries]

    def entry_config(self, entry: ConfigEntry) -> ModelQuantConfig:
        fields = _fields_of(self.space)
        layers = {n: _option(fields, opts) for n, opts in zip(self.layer_names, entry.options)}
        return ModelQuantConfig(layers, numels=dict(self.numels))

    @classmethod
    def from_model_configs(
        cls,
        configs: Sequence[ModelQuantConfig],
        *,
        space: QuantSpace | dict[str, list] | None = None,
        objectives: Sequence[dict[str, float]] | None = None,
        pareto: Sequence[bool] | None = None,
        sources: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> ConfigSet:
        if not configs:
            raise ConfigError("from_model_configs needs at least one configuration")
        n = len(configs)
        for label, seq in (
            ("objectives", objectives),
            ("pareto", pareto),
            ("sources", sources),
            ("ids", ids),
        ):
            if seq is not None and len(seq) != n:
                raise ConfigError(f"{label} has {len(seq)} items for {n} configurations")
        names = list(configs[0].keys())
        numels = {k: int(v) for k, v in dict(configs[0].numels).items()}
        entries = []
        for i, c in enumerate(configs):
            if list(c.keys()) != names:
                raise ConfigError(
                    f"configuration {i} layer names differ from configuration 0: "
                    f"{_name_diff(list(c.keys()), names)}"
                )
            options = [list(qc.as_tuple()) for qc in c.values()]
            entries.append(
                ConfigEntry(
                    id=ids[i] if ids is not None else f"c{i:04d}",
                    options=options,
                    avg_bits=_average_bits(options, names, numels),
                    objectives={
                        k: float(v) for k, v in (objectives[i] if objectives else {}).items()
                    },
                    pareto=bool(pareto[i]) if pareto is not None else False,
                    source=sources[i] if sources is not None else "",
                )
            )
        space_opts = _space_dict(space if space is not None else QuantSpace())
        out = cls(SCHEMA_VERSION, names, numels, space_opts, entries, dict(provenance or {}))
        return _validate(out.to_dict(), "configset from configurations")

    def nearest(self, avg_bits: float, pareto_only: bool = True) -> ConfigEntry:
        """The entry whose average bits is nearest ``avg_bits`` (among Pareto entries if any)."""
        pool = [e for e in self.entries if e.pareto] if pareto_only else []
        pool = pool or self.entries
        if not pool:
            raise ConfigError("configset has no entries")
        return min(pool, key=lambda e: abs(e.avg_bits - avg_bits))


def make_provenance(
    seed: int | None = None,
    model: str | None = None,
    task: str | None = None,
    command: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Provenance block: git sha (or "unknown"), seed, model, task, UTC time, command line."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "git_sha": sha or "unknown",
        "seed": seed,
        "model": model,
        "task": task,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        **extra,
    }


# ---------------------------------------------------------------- validation
def _fields_of(opts: dict[str, list]) -> tuple[str, ...]:
    """The per-layer fields of a stored space: ``("gguf",)`` for a GGUF space, else the NF five."""
    return GGUF_FIELDS if isinstance(opts, dict) and set(opts) == set(GGUF_FIELDS) else FIELDS


def _option(fields: tuple[str, ...], row: Sequence) -> LayerOption:
    return GGUFOption(row[0]) if fields == GGUF_FIELDS else QuantConfig(*row)


def _space_dict(space: QuantSpace | dict[str, list]) -> dict[str, list]:
    if isinstance(space, dict):
        return {f: list(space[f]) for f in _fields_of(space)}
    return {f: list(getattr(space, f)) for f in space.fields}


def _short(items: list, limit: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def _name_diff(found: Sequence[str], expected: Sequence[str]) -> str:
    exp, got = set(expected), set(found)
    unknown = [n for n in found if n not in exp]
    missing = [n for n in expected if n not in got]
    if not unknown and not missing:
        return "same names in a different order"
    return f"unknown {_short(unknown)}; missing {_short(missing)}"


def _average_bits(options: list[list], names: Sequence[str], numels: dict[str, int]) -> float:
    total = sum(numels[n] for n in names)
    fields = GGUF_FIELDS if options and len(options[0]) == 1 else FIELDS
    weighted = sum(_option(fields, o).storage_bits() * numels[n] for n, o in zip(names, options))
    return weighted / total


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(
    data: Any,
    where: str,
    expected_names: Sequence[str] | None = None,
    space: QuantSpace | None = None,
) -> ConfigSet:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a JSON object, got {type(data).__name__}")
    supported = list(SUPPORTED_SCHEMA_VERSIONS)
    if "schema_version" not in data:
        raise ConfigError(
            f"{where}: missing key 'schema_version' (supported versions: {supported})"
        )
    version = data["schema_version"]
    if not _is_int(version) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ConfigError(
            f"{where}: schema_version {version!r} is not supported (supported versions: {supported})"
        )
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing} (required: {list(TOP_KEYS)})")
    extra = [k for k in data if k not in TOP_KEYS]
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra} (allowed: {list(TOP_KEYS)})")

    names = data["layer_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: 'layer_names' must be a non-empty list of strings")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: 'layer_names' has duplicates {_short(dup)}")
    if expected_names is not None and set(names) != set(expected_names):
        raise ConfigError(
            f"{where}: layer names do not match the model: "
            f"{_name_diff(names, list(expected_names))}"
        )

    numels = data["numels"]
    if not isinstance(numels, dict):
        raise ConfigError(f"{where}: 'numels' must be an object name -> parameter count")
    if set(numels) != set(names):
        raise ConfigError(
            f"{where}: 'numels' keys do not match 'layer_names': {_name_diff(list(numels), names)}"
        )
    bad = [n for n in names if not _is_int(numels[n]) or numels[n] <= 0]
    if bad:
        raise ConfigError(f"{where}: 'numels' must be positive integers; bad for {_short(bad)}")

    opts = data["space"]
    fields = _fields_of(opts)
    if not isinstance(opts, dict) or set(opts) != set(fields):
        got = sorted(opts) if isinstance(opts, dict) else type(opts).__name__
        raise ConfigError(
            f"{where}: 'space' must have exactly the option lists {list(FIELDS)} (or "
            f"{list(GGUF_FIELDS)} for a GGUF space), got {got}"
        )
    for f in fields:
        if not isinstance(opts[f], list) or not opts[f]:
            raise ConfigError(
                f"{where}: space field {f!r} must be a non-empty list, got {opts[f]!r}"
            )
    if space is not None:
        allowed = _space_dict(space)
        if set(allowed) != set(fields):
            raise ConfigError(
                f"{where}: its space has fields {list(fields)} but the model's space has "
                f"{list(allowed)} (quant.space.kind)"
            )
        for f in fields:
            outside = [v for v in opts[f] if v not in allowed[f]]
            if outside:
                raise ConfigError(
                    f"{where}: space field {f!r} has values {outside} outside the model's space "
                    f"(allowed: {allowed[f]})"
                )

    entries_raw = data["entries"]
    if not isinstance(entries_raw, list):
        raise ConfigError(f"{where}: 'entries' must be a list")
    order = list(expected_names) if expected_names is not None else list(names)
    perm = [names.index(n) for n in order]
    entries, seen = [], set()
    for i, e in enumerate(entries_raw):
        entry = _validate_entry(e, i, where, names, opts)
        if entry.id in seen:
            raise ConfigError(f"{where}: duplicate entry id {entry.id!r}")
        seen.add(entry.id)
        computed = _average_bits(entry.options, names, numels)
        if not math.isclose(entry.avg_bits, computed, rel_tol=AVG_BITS_TOL, abs_tol=AVG_BITS_TOL):
            raise ConfigError(
                f"{where}: entry {entry.id!r}: avg_bits {entry.avg_bits} does not match its options "
                f"and numels (computed {computed:.6f})"
            )
        entry.options = [entry.options[j] for j in perm]
        entries.append(entry)

    prov = data["provenance"]
    if not isinstance(prov, dict):
        raise ConfigError(f"{where}: 'provenance' must be an object")
    return ConfigSet(
        schema_version=version,
        layer_names=order,
        numels={n: numels[n] for n in order},
        space={f: list(opts[f]) for f in fields},
        entries=entries,
        provenance=dict(prov),
    )


def _validate_entry(
    e: Any, i: int, where: str, names: list[str], opts: dict[str, list]
) -> ConfigEntry:
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: entry {i} must be an object, got {type(e).__name__}")
    label = f"entry {e.get('id', i)!r}"
    missing = [k for k in ENTRY_KEYS if k not in e]
    if missing:
        raise ConfigError(
            f"{where}: {label} is missing key(s) {missing} (required: {list(ENTRY_KEYS)})"
        )
    extra = [k for k in e if k not in ENTRY_KEYS]
    if extra:
        raise ConfigError(
            f"{where}: {label} has unknown key(s) {extra} (allowed: {list(ENTRY_KEYS)})"
        )
    if not isinstance(e["id"], str) or not e["id"]:
        raise ConfigError(f"{where}: entry {i}: 'id' must be a non-empty string, got {e['id']!r}")
    raw = e["options"]
    if isinstance(raw, dict):
        if set(raw) != set(names):
            raise ConfigError(
                f"{where}: {label} options layer names: {_name_diff(list(raw), names)}"
            )
        raw = [raw[n] for n in names]
    if not isinstance(raw, list) or len(raw) != len(names):
        n = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise ConfigError(f"{where}: {label}: 'options' must list {len(names)} layers, got {n}")
    options = []
    fields = _fields_of(opts)
    for name, layer in zip(names, raw):
        if isinstance(layer, dict):
            if set(layer) != set(fields):
                raise ConfigError(
                    f"{where}: {label} layer {name!r}: fields {sorted(layer)}, expected {list(fields)}"
                )
            layer = [layer[f] for f in fields]
        if not isinstance(layer, list) or len(layer) != len(fields):
            raise ConfigError(
                f"{where}: {label} layer {name!r}: expected {list(fields)} values, got {layer!r}"
            )
        row = []
        for f, v in zip(fields, layer):
            matches = [a for a in opts[f] if a == v and type(a) is type(v)] or [
                a for a in opts[f] if _is_int(a) and isinstance(v, float) and a == v
            ]
            if not matches:
                raise ConfigError(
                    f"{where}: {label} layer {name!r} field {f!r}: value {v!r} not allowed "
                    f"(allowed: {opts[f]})"
                )
            row.append(matches[0])
        options.append(row)
    avg = e["avg_bits"]
    if not isinstance(avg, (int, float)) or isinstance(avg, bool) or not math.isfinite(avg):
        raise ConfigError(f"{where}: {label}: 'avg_bits' must be a finite number, got {avg!r}")
    objs = e["objectives"]
    if not isinstance(objs, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in objs.items()
    ):
        raise ConfigError(f"{where}: {label}: 'objectives' must map names to numbers, got {objs!r}")
    if not isinstance(e["pareto"], bool):
        raise ConfigError(f"{where}: {label}: 'pareto' must be true/false, got {e['pareto']!r}")
    if not isinstance(e["source"], str):
        raise ConfigError(f"{where}: {label}: 'source' must be a string, got {e['source']!r}")
    return ConfigEntry(
        id=e["id"],
        options=options,
        avg_bits=float(avg),
        objectives={k: float(v) for k, v in objs.items()},
        pareto=e["pareto"],
        source=e["source"],
    )
