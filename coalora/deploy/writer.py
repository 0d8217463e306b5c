"""What every format writer of ``export.py`` shares (docs/architecture.md, "Stage flow").

The export stage restores a run, chooses its configurations and hands a writer an ``ExportJob``;
the writer puts the format on disk and returns ``Written`` (the fields of ``export.json`` and a
log line). A writer is ``write_<format>(job) -> Written`` in its own module of ``coalora.deploy``
and one line of the stage's ``WRITERS``. The run-bound formats (PEFT, merged) write through
``write_export``: a temporary sibling swapped in by ``coalora.io.replace_dir_atomically``, with a
marker file naming the run, so a later export of the same run may replace it and nothing else is
ever replaced without ``overwrite=true``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from coalora.errors import ConfigError
from coalora.io import replace_dir_atomically
from coalora.quant.config import ModelQuantConfig

MARKER = "coalora_export.json"
HEADS = ["classifier", "score"]  # task-head module names when the model config names none


@dataclass
class ExportJob:
    """A trained run ready to be written.

    ``configs``: label → configuration to export (one for the single-configuration formats;
    ``None`` = the full-precision base). ``adapt(config)`` switches the model's base and adapter
    to a configuration (CoA-LoRA folds B' = B (I + γU(c)), arXiv 2509.25214 §3). ``run_cfg`` is
    the run's composed config (method, model, task); ``source`` says how the configuration was
    chosen (model cards); ``backbone()`` builds a fresh ``transformers`` model of the run and
    ``tokenizer()`` its tokenizer (the packed writer ships it; the loader-only install of
    ``coalora.deploy`` never imports the model builders).
    """

    model: nn.Module
    names: list[str]
    configs: dict[str, ModelQuantConfig | None]
    adapt: Callable[[ModelQuantConfig | None], None]
    run_cfg: Any
    out_dir: Path
    run_dir: Path | None = None
    overwrite: bool = False
    source: str = ""
    backbone: Callable[[], nn.Module] | None = None
    tokenizer: Callable[[], Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # format-specific export keys

    def single(self, fmt: str) -> ModelQuantConfig | None:
        """The one configuration of a single-configuration format."""
        if len(self.configs) != 1:
            raise ConfigError(
                f"format={fmt} writes one configuration; got {sorted(self.configs)}: drop "
                "quant.budgets"
            )
        return next(iter(self.configs.values()))

    def heads(self) -> list[str]:
        """The task-head module names of the run's model config."""
        return list(self.run_cfg.model.get("head_modules", HEADS))


@dataclass(frozen=True)
class Written:
    """What a writer reports: ``record`` (the format, its directory and average bits, as
    ``export.json`` stores them) and ``summary`` (what was written, for the log line)."""

    record: dict[str, Any]
    summary: str


Writer = Callable[[ExportJob], Written]


def average_bits(config: ModelQuantConfig | None) -> float | None:
    return None if config is None else config.average_bits()


def describe_bits(config: ModelQuantConfig | None) -> str:
    return "full precision" if config is None else f"{config.average_bits():.4f} bits"


def check_target(out_dir: Path, run_dir: Path | None, overwrite: bool) -> None:
    """Never replace what coalora did not write: an existing ``out_dir`` must be an export of
    the same run (its marker file names the run) or ``overwrite=true`` must be given."""
    out_dir = Path(out_dir).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else None
    if run_dir is not None and (out_dir == run_dir or out_dir in run_dir.parents):
        raise ConfigError(f"out_dir={out_dir} would replace the training run {run_dir}")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} is an existing file; choose a directory path")
    if overwrite or not any(out_dir.iterdir()):
        return
    if not is_export_of(out_dir, run_dir):
        raise ConfigError(
            f"out_dir={out_dir} exists and is not an export of this run; choose another "
            "out_dir or pass overwrite=true to replace it"
        )


def is_export_of(path: Path, run_dir: Path | None) -> bool:
    """``path`` holds an export of ``run_dir`` (its marker file names the run)."""
    try:
        return run_dir is not None and json.loads((path / MARKER).read_text()).get(
            "run_dir"
        ) == str(run_dir)
    except (OSError, ValueError, AttributeError):
        return False


def write_export(
    out_dir: Path, files: dict[str, Any], run_dir: Path | None = None, overwrite: bool = False
) -> Path:
    """Write every file into a temp sibling directory, then swap it in
    (:func:`coalora.io.replace_dir_atomically`): an interruption leaves either the old or the
    new export whole. A ``transformers`` model or tokenizer writes itself; ``*.safetensors``
    takes a tensor dict, a string is text, anything else JSON."""
    out_dir = Path(out_dir).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else None
    check_target(out_dir, run_dir, overwrite)

    def build(tmp: Path) -> None:
        for name, content in files.items():
            if isinstance(content, nn.Module):  # a transformers model: its own writer
                content.save_pretrained(str(tmp), safe_serialization=True)
            elif hasattr(content, "save_pretrained"):  # a tokenizer
                content.save_pretrained(str(tmp))
            elif name.endswith(".safetensors"):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            elif isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        marker = {"run_dir": str(run_dir) if run_dir is not None else None, "files": sorted(files)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    return replace_dir_atomically(
        out_dir, build, is_ours=lambda p: is_export_of(p, run_dir), overwrite=overwrite
    )


@torch.no_grad()
def fold_label_affine(model: nn.Module, task: Any, head: list[str]) -> None:
    """A regression task trained on standardised targets (``task.label_shift/label_scale``)
    exports a head that outputs the task's own scores: the last head linear becomes
    ``scale · (W x + b) + shift``."""
    if not task.get("is_regression"):
        return
    shift, scale = float(task.get("label_shift", 0.0)), float(task.get("label_scale", 1.0))
    if shift == 0.0 and scale == 1.0:
        return
    linears = [
        m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(part in head for part in n.split("."))
    ]  # fmt: skip
    if not linears:
        raise ConfigError(f"export: no head linear among {head} to fold task.label_scale into")
    last = linears[-1]
    last.weight.mul_(scale)
    if last.bias is not None:
        last.bias.mul_(scale).add_(shift)


__all__ = [
    "HEADS",
    "MARKER",
    "ExportJob",
    "Writer",
    "Written",
    "average_bits",
    "check_target",
    "describe_bits",
    "fold_label_affine",
    "is_export_of",
    "write_export",
]
