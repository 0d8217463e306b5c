"""Model loading: the embedded MiniLM-L6, hub ids, and tiny random models for tests."""

from coalora.models.loading import (
    build_model,
    build_tokenizer,
    layer_index,
    module_type,
    target_names,
)

__all__ = ["build_model", "build_tokenizer", "layer_index", "module_type", "target_names"]
