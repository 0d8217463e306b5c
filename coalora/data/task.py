"""The GLUE task spec (`conf/task/*.yaml`): required keys, allowed values, metric names.

A task config is the single description of a GLUE task: where its files live (local TSV under
``${paths.data_dir}/glue/<glue_dir>``, else the hub), which columns hold the text and the label,
how labels map to ids, and which metrics are logged (docs/methods.md, "Evaluation protocol").
Everything here validates early and names the config key that is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from coalora.errors import ConfigError

# Human metric name (task.metric) -> short key used in logs (`val/<key>`) and build_metrics.
METRIC_KEYS: dict[str, str] = {
    "accuracy": "acc",
    "mcc": "mcc",
    "f1": "f1",
    "pearson": "pearson",
    "spearman": "spearman",
}
CLASSIFICATION_METRICS = ("acc", "mcc", "f1")
REGRESSION_METRICS = ("pearson", "spearman")

REQUIRED_KEYS = (
    "name",
    "glue_dir",
    "hub_name",
    "hub_config",
    "train_file",
    "eval_file",
    "text_fields",
    "label_field",
    "label_names",
    "num_labels",
    "is_regression",
    "metric",
    "monitor",
    "mode",
    "max_length",
    "max_train_samples",
    "max_eval_samples",
)


def task_get(task: DictConfig, key: str, default=None):
    """``task.<key>`` or ``default`` when the key is absent (optional keys of the schema)."""
    value = task.get(key) if key in task else None
    return default if value is None else value


def text_fields(task: DictConfig) -> list[str]:
    return [str(f) for f in task.text_fields]


def hub_text_fields(task: DictConfig) -> list[str]:
    """Column names of the text fields in the hub dataset (``task.hub_text_fields``, default same)."""
    fields = task_get(task, "hub_text_fields")
    return [str(f) for f in fields] if fields is not None else text_fields(task)


def label_names(task: DictConfig) -> list[str] | None:
    names = task.label_names
    return None if names is None else [str(n) for n in names]


def metric_keys(task: DictConfig) -> list[str]:
    """Short keys of every metric logged for the task; the first one is the primary metric."""
    primary = primary_metric_key(task)
    keys = task_get(task, "metrics")
    if keys is None:
        keys = [primary]
    keys = [str(k) for k in keys]
    if keys[0] != primary:
        raise ConfigError(
            f"task.metrics={keys} must start with the primary metric "
            f"'{primary}' (task.metric={task.metric!r})"
        )
    return keys


def primary_metric_key(task: DictConfig) -> str:
    """Short key of the task's primary metric: ``accuracy -> acc``, ``mcc``, ``f1``, ``pearson``."""
    metric = str(task.metric)
    if metric in METRIC_KEYS:
        return METRIC_KEYS[metric]
    if metric in METRIC_KEYS.values():
        return metric
    raise ConfigError(f"task.metric={metric!r} is not allowed; allowed: {sorted(METRIC_KEYS)}")


def validate_task(task: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key of a task config."""
    missing = [k for k in REQUIRED_KEYS if k not in task]
    if missing:
        name = task.get("name", "?")
        raise ConfigError(f"task '{name}': missing config keys {missing} (see conf/task/sst2.yaml)")
    name = task.name
    fields = task.text_fields
    if isinstance(fields, str) or not isinstance(fields, Sequence) or len(fields) not in (1, 2):
        raise ConfigError(f"task '{name}': task.text_fields must list 1 or 2 columns, got {fields}")
    if len(hub_text_fields(task)) != len(fields):
        raise ConfigError(
            f"task '{name}': task.hub_text_fields must have as many entries as task.text_fields"
        )
    num_labels = int(task.num_labels)
    if bool(task.is_regression):
        if num_labels != 1:
            raise ConfigError(f"task '{name}': task.num_labels must be 1 for a regression task")
        if task.label_names is not None:
            raise ConfigError(f"task '{name}': task.label_names must be null for regression")
    elif num_labels < 2:
        raise ConfigError(f"task '{name}': task.num_labels={num_labels} must be >= 2")
    names = label_names(task)
    if names is not None and len(names) != num_labels:
        raise ConfigError(
            f"task '{name}': task.label_names has {len(names)} entries but task.num_labels={num_labels}"
        )
    if task.mode not in ("max", "min"):
        raise ConfigError(
            f"task '{name}': task.mode={task.mode!r} is not allowed; allowed: [max, min]"
        )
    allowed = REGRESSION_METRICS if task.is_regression else CLASSIFICATION_METRICS
    for key in metric_keys(task):
        if key not in allowed:
            raise ConfigError(
                f"task '{name}': metric '{key}' is not allowed for this task; allowed: {list(allowed)}"
            )
    header = bool(task_get(task, "header", True))
    columns = task_get(task, "columns")
    if not header and columns is None:
        raise ConfigError(f"task '{name}': task.header=false needs task.columns (the column names)")
    if int(task.max_length) < 4:
        raise ConfigError(f"task '{name}': task.max_length={task.max_length} is too small")
    for key in ("max_train_samples", "max_eval_samples"):
        value = task[key]
        if value is not None and int(value) < 1:
            raise ConfigError(f"task '{name}': task.{key}={value} must be null or >= 1")
