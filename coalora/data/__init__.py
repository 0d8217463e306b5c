"""Task data: GLUE from local TSV or the hub (dynamic padding), causal-LM corpora (WikiText-2, C4)
packed into token blocks, and their metrics (accuracy ... perplexity)."""

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
from coalora.data.lm import LMDataModule, collate_blocks, pack_ids, validate_lm_task
from coalora.data.metrics import (
    BlockNLL,
    block_nll,
    bootstrap_perplexity,
    build_metrics,
    higher_is_better,
    is_causal_lm,
    logits_to_preds,
    monitor_key,
    paired_bootstrap_perplexity,
    perplexity,
)
from coalora.data.task import metric_keys, primary_metric_key, validate_task

__all__ = [
    "BlockNLL",
    "EncodedSplit",
    "GlueCollator",
    "GlueDataModule",
    "LMDataModule",
    "LengthGroupedSampler",
    "SeededShuffleSampler",
    "TsvFormatError",
    "block_nll",
    "bootstrap_perplexity",
    "build_metrics",
    "collate_blocks",
    "encode_split",
    "find_task_files",
    "higher_is_better",
    "is_causal_lm",
    "logits_to_preds",
    "metric_keys",
    "monitor_key",
    "pack_ids",
    "paired_bootstrap_perplexity",
    "perplexity",
    "primary_metric_key",
    "read_glue_columns",
    "read_glue_tsv",
    "read_tsv",
    "validate_lm_task",
    "validate_task",
]
