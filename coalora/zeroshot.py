"""Zero-shot evaluation of an in-memory (adapted, quantized) causal LM with lm-eval.

lm-eval (EleutherAI's lm-evaluation-harness, PyPI ``lm-eval``, extra ``coalora[lm_eval]``) wraps
the model object itself (``HFLM(pretrained=model, tokenizer=tokenizer)``), so whatever
configuration and adapter are active in the model are what gets scored; nothing is saved or
reloaded. Task names are lm-eval's (``arc_easy``, ``hellaswag``, ``piqa``, ``winogrande``: these
download their data from the hub) or the ``task:`` name of a local task YAML found in
``include`` folders. A local YAML is an ordinary lm-eval task config; a ``dataset_path: json``
task reads JSONL files named in ``dataset_kwargs.data_files``, and relative file names there
are resolved against the YAML's folder (lm-eval itself would resolve them against the working
directory). tests/fixtures/lm_eval/ ships one such task.

Returns ``{task: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_norm``, their
``*_stderr``) and ``n`` (documents scored).

**A task YAML can run code**: lm-eval's ``!function module.name`` tag imports a Python file next
to the YAML when the YAML is loaded. Only the YAMLs of *requested* tasks are loaded that way; the
other YAMLs in an include folder are only scanned for their ``task:`` name with a loader that
builds no objects and imports nothing. Point ``eval.lm_eval_include`` only at folders you trust.
Task names are resolved (:func:`resolve_tasks`) before any scoring, so a typo fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from coalora.errors import CoaloraError, ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'coalora[lm_eval]' (or pip install lm-eval)"


def require_lm_eval():
    """The ``lm_eval`` module, or one line saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise CoaloraError(
            f"eval.lm_eval_tasks needs lm-eval, which is not installed: {INSTALL_HINT}"
        ) from None
    return lm_eval


def _absolute(value: Any, base: Path) -> Any:
    """``value`` (a path, list of paths or split -> path(s) mapping) with relative paths made
    absolute against ``base`` when the file exists there."""
    if isinstance(value, str):
        p = Path(value)
        return str(base / p) if not p.is_absolute() and (base / p).exists() else value
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def load_local_task(path: str | Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (``include`` and ``!function`` resolved next to it), with
    ``dataset_kwargs.data_files`` / ``data_dir`` made absolute against the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).resolve()
    try:
        cfg = load_yaml(path)
    except Exception as exc:
        raise ConfigError(f"eval.lm_eval_include: cannot read task YAML {path}: {exc}") from None
    if "task" not in cfg:
        raise ConfigError(f"eval.lm_eval_include: {path} has no 'task:' name")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = _absolute(kwargs[key], path.parent)
    if kwargs:
        cfg["dataset_kwargs"] = kwargs
    return cfg


class _NameOnlyLoader(yaml.SafeLoader):
    """A YAML loader for scanning: every tagged node (``!function ...``) becomes None, so reading
    a file imports and runs nothing."""


_NameOnlyLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def task_name(path: str | Path) -> str | None:
    """The ``task:`` name of a task YAML, read without resolving tags (no code runs); None for a
    group YAML or a file that is not a mapping."""
    try:
        doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_NameOnlyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"eval.lm_eval_include: cannot read task YAML {path}: {exc}") from None
    name = doc.get("task") if isinstance(doc, dict) else None
    return name if isinstance(name, str) else None


def local_task_files(include: Iterable[str | Path]) -> dict[str, Path]:
    """``{task name: YAML file}`` for every ``*.yaml`` (recursively) under the ``include`` folders
    (or YAML files), from a scan that runs no code; group YAMLs are skipped."""
    out: dict[str, Path] = {}
    for entry in include:
        root = Path(entry)
        if not root.exists():
            raise ConfigError(f"eval.lm_eval_include: {root} does not exist")
        for f in [root] if root.is_file() else sorted(root.rglob("*.yaml")):
            name = task_name(f)
            if name is not None:
                out.setdefault(name, f)
    return out


def local_tasks(
    include: Iterable[str | Path], names: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``{task name: config}`` of the local tasks in ``include`` — only those in ``names`` when
    given. Only these YAMLs are loaded with lm-eval's loader (which may import code)."""
    files = local_task_files(include)
    wanted = files if names is None else [n for n in names if n in files]
    return {n: load_local_task(files[n]) for n in wanted}


@dataclass
class ZeroShotTasks:
    """Task names resolved once (before any scoring): local configs and lm-eval's task index."""

    names: list[str]
    local: dict[str, dict[str, Any]] = field(default_factory=dict)
    manager: Any = None

    @property
    def specs(self) -> list[str | dict]:
        return [self.local.get(t, t) for t in self.names]


def resolve_tasks(tasks: Sequence[str], include: Iterable[str | Path] = ()) -> ZeroShotTasks:
    """Check ``tasks`` against the local YAMLs in ``include`` and lm-eval's built-in tasks; one
    ``ConfigError`` naming the unknown ones. Indexing the built-in tasks takes ~20 s, so it only
    happens when a requested task is not local."""
    if isinstance(tasks, str) or not tasks:
        raise ConfigError(f"eval.lm_eval_tasks={tasks!r} must be a non-empty list of task names")
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [str(t) for t in tasks]
    files = local_task_files(include)  # one scan: the names, and the error's list
    local = {n: load_local_task(files[n]) for n in names if n in files}
    builtin = [t for t in names if t not in local]
    manager = TaskManager(include_defaults=bool(builtin))
    if builtin:
        known = set(manager.all_tasks)
        unknown = [t for t in builtin if t not in known]
        if unknown:
            raise ConfigError(
                f"eval.lm_eval_tasks: unknown lm-eval task(s) {unknown}; local tasks found in "
                f"eval.lm_eval_include: {sorted(files)}"
            )
    return ZeroShotTasks(names, local, manager)


def _metrics(block: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in block.items():
        name, _, _filter = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def add_bos_policy(tokenizer) -> bool | None:
    """lm-eval's ``add_bos_token`` for this tokenizer: None (the tokenizer's default, e.g. the
    LLaMA BOS) when its special tokens are a prefix only; False when it also appends tokens
    (a BERT-style ``[SEP]``), because lm-eval splits context and continuation by position in
    the jointly encoded string, which a suffix token would shift."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    return None if full[len(full) - len(plain) :] == plain else False


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] | ZeroShotTasks,
    include: Iterable[str | Path] = (),
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` (names, or :func:`resolve_tasks`' result to resolve them once for
    several configurations) on ``model`` as it is now (eval mode, restored afterwards)."""
    resolved = tasks if isinstance(tasks, ZeroShotTasks) else resolve_tasks(tasks, include)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            add_bos_token=add_bos_policy(tokenizer),
        )
        out = simple_evaluate(
            model=lm,
            tasks=resolved.specs,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=resolved.manager,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for name in resolved.names:
        block = out["results"].get(name)
        if block is None:
            raise CoaloraError(f"lm-eval returned no result for task {name!r}")
        row = _metrics(block)
        n = (out.get("n-samples") or {}).get(name, {})
        if "effective" in n:
            row["n"] = float(n["effective"])
        results[name] = row
    return results
