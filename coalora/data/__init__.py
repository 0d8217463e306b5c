"""Task data: GLUE from local TSV or the hub, tokenized with dynamic padding, plus its metrics."""

from coalora.data.batching import (
    EncodedSplit,
    GlueCollator,
    LengthGroupedSampler,
    SeededShuffleSampler,
    encode_split,
)
from coalora.data.glue import GlueDataModule
from coalora.data.glue_tsv import (
    TsvFormatError,
    find_task_files,
    read_glue_columns,
    read_glue_tsv,
    read_tsv,
)
from coalora.data.metrics import build_metrics, logits_to_preds, monitor_key
from coalora.data.task import metric_keys, primary_metric_key, validate_task

__all__ = [
    "EncodedSplit",
    "GlueCollator",
    "GlueDataModule",
    "LengthGroupedSampler",
    "SeededShuffleSampler",
    "TsvFormatError",
    "build_metrics",
    "encode_split",
    "find_task_files",
    "logits_to_preds",
    "metric_keys",
    "monitor_key",
    "primary_metric_key",
    "read_glue_columns",
    "read_glue_tsv",
    "read_tsv",
    "validate_task",
]
