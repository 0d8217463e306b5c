"""Quantization engine: NF-b block-wise quantization with double quantization (QLoRA, arXiv
2305.14314 §3), LQ-LoRA's configuration space and budget allocation (arXiv 2311.12023 §3.2), bit
packing, configurations and storage accounting, and a cache of quantized weights (dequantized or
packed, docs/packed.md) for cheap switching. Pure tensors and data classes;
docs/quantization.md describes the algorithms and docs/architecture.md the contract.
"""

from coalora.quant.allocation import (
    ErrorTable,
    allocate,
    build_error_table,
    cached_error_table,
    prune_dominated,
    solve_mckp_exact,
    solve_mckp_lagrangian,
    solve_mckp_milp,
)
from coalora.quant.build import (
    QuantSettings,
    allocations,
    build_cache,
    build_model_config,
    quant_space,
)
from coalora.quant.config import NF3, NF4, ModelQuantConfig, QuantConfig, QuantSpace
from coalora.quant.fisher import fisher_diagonal
from coalora.quant.linear import DequantCache, QuantLinear, entry_nbytes
from coalora.quant.model import (
    base_linear,
    formula_weight_bytes,
    freeze_model,
    model_weights,
    own_frozen_weights,
    quant_layers,
    quantize_model,
    resident_weight_bytes,
    set_model_config,
    target_linear_names,
)
from coalora.quant.nf import (
    QuantizedTensor,
    dequantize_nf,
    dequantize_nf_blockwise,
    fake_quantize,
    nf_codebook,
    quantization_errors,
    quantize_nf,
    quantize_nf_blockwise,
)
from coalora.quant.packing import (
    STORAGES,
    PackedTensor,
    check_storage,
    dequantize_packed,
    pack_bits,
    pack_quantized,
    packed_linear,
    unpack_bits,
    unpack_quantized,
)

__all__ = [
    "NF3",
    "NF4",
    "DequantCache",
    "ErrorTable",
    "ModelQuantConfig",
    "PackedTensor",
    "QuantConfig",
    "QuantLinear",
    "QuantSpace",
    "QuantizedTensor",
    "STORAGES",
    "allocate",
    "QuantSettings",
    "base_linear",
    "allocations",
    "build_cache",
    "build_error_table",
    "build_model_config",
    "cached_error_table",
    "check_storage",
    "dequantize_nf",
    "dequantize_nf_blockwise",
    "dequantize_packed",
    "entry_nbytes",
    "fake_quantize",
    "fisher_diagonal",
    "formula_weight_bytes",
    "freeze_model",
    "own_frozen_weights",
    "model_weights",
    "nf_codebook",
    "pack_bits",
    "pack_quantized",
    "packed_linear",
    "prune_dominated",
    "quant_layers",
    "quant_space",
    "quantization_errors",
    "quantize_model",
    "quantize_nf",
    "quantize_nf_blockwise",
    "resident_weight_bytes",
    "set_model_config",
    "solve_mckp_exact",
    "solve_mckp_lagrangian",
    "solve_mckp_milp",
    "target_linear_names",
    "unpack_bits",
    "unpack_quantized",
]
