"""The base model of ``export.py format=gguf``: one llama.cpp GGUF file per configuration
(docs/gguf.md, "Export to llama.cpp").

What a llama.cpp loader needs, written with gguf-py's ``GGUFWriter``:

* the architecture's hyperparameters (``llama.*`` / ``qwen2.*`` keys: context and embedding
  length, block count, feed-forward length, head counts, RoPE base and scaling, RMS-norm epsilon);
* the tokenizer as ``tokenizer.ggml.*`` keys (``coalora.deploy.gguf_vocab``);
* every weight under llama.cpp's tensor name (``token_embd``, ``blk.N.attn_q``, …, ``output``).
  A target linear holds, at the configuration's GGUF type, the bytes of ``coalora.quant.
  gguf_types.encode`` of the matrix the run quantizes (``QuantLinear._source()``: W, or W − L for
  ``method.init=lpq|lq``), so llama.cpp dequantizes exactly what coalora trained and evaluated on.
  The other tensors are at the stated ``NON_TARGET`` types (norms and biases F32; the embedding
  and an untied output at ``embedding_type``, F16 by default).

llama.cpp's ``llama`` graph applies RoPE to interleaved pairs of a head's dimensions while the
Hugging Face checkpoint orders each head as two halves; HF → GGUF conversion therefore permutes
the rows of ``attn_q`` / ``attn_k`` (``permute_qk``); the LoRA B of those layers is permuted the
same way (``coalora.deploy.gguf_lora``). ``qwen2`` uses the halves layout itself: no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from coalora.deploy.format import clean_state_dict
from coalora.deploy.gguf_vocab import add_tokenizer
from coalora.errors import ConfigError
from coalora.quant.config import ModelQuantConfig
from coalora.quant.gguf_space import GGUFOption
from coalora.quant.gguf_types import GGUF_TYPES, encode
from coalora.quant.linear import QuantLinear
from coalora.quant.model import base_linear

# model.arch → (gguf-py architecture name, whether q/k rows are permuted)
ARCHS: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
EMBEDDING_TYPES = ("F32", "F16", "Q8_0")
NON_TARGET = {"norms": "F32", "biases": "F32", "rope_freqs": "F32"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, the array to store (uint8 blocks for a quantized
    type, else float) and the GGML type it is stored as."""

    name: str
    data: np.ndarray
    type: str
    shape: tuple[int, ...]  # the logical (rows, columns) shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def check_gguf_run(run_cfg: Any) -> None:
    """One line when the run cannot be written as GGUF: llama-family decoders trained on the
    GGUF configuration space only."""
    model = run_cfg.model
    if model.get("kind") != "decoder":
        raise ConfigError(
            f"format=gguf writes llama.cpp decoders; model={model.get('name')} has "
            f"model.kind={model.get('kind')}: use format=packed, peft or merged"
        )
    if model.get("arch") not in ARCHS:
        raise ConfigError(
            f"format=gguf: model.arch={model.get('arch')!r} is not supported; allowed: "
            f"{list(ARCHS)} (use format=merged)"
        )
    kind = (run_cfg.quant.get("space") or {}).get("kind", "nf")
    if kind != "gguf":
        raise ConfigError(
            f"format=gguf needs a run trained on GGUF types (quant.space.kind=gguf); this run has "
            f"quant.space.kind={kind}: retrain with quant.space.kind=gguf, or use format=packed"
        )


def check_config(config: ModelQuantConfig | None, label: str) -> dict[str, str]:
    """name → GGUF type of a configuration; one line when it is not all GGUF types."""
    if config is None:
        raise ConfigError("format=gguf needs a quantized base (quant.space.kind=gguf)")
    bad = [n for n, qc in config.items() if not isinstance(qc, GGUFOption)]
    if bad:
        raise ConfigError(
            f"format=gguf: configuration {label} assigns non-GGUF options to {bad[:3]}; "
            "train with quant.space.kind=gguf"
        )
    return {n: qc.type for n, qc in config.items()}


# ---------------------------------------------------------------- names and layout
def head_counts(hf: Any) -> tuple[int, int, int]:
    n_head = int(hf.num_attention_heads)
    n_kv = int(getattr(hf, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // n_head)
    return n_head, n_kv, head_dim


def permute_qk(rows: Tensor, n_head: int) -> Tensor:
    """HF's per-head [first half; second half] rotary layout → llama.cpp's interleaved pairs:
    row ``h·d + 2i + j`` of the result is row ``h·d + j·d/2 + i`` of ``rows`` (d = head dim).
    Works on weights, byte rows of encoded blocks, LoRA B and biases alike (rows only move)."""
    rest = rows.shape[1:]
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rest).transpose(1, 2).reshape(
        rows.shape
    )  # fmt: skip


def unpermute_qk(rows: Tensor, n_head: int) -> Tensor:
    """Inverse of :func:`permute_qk` (GGUF → HF order), as transformers' GGUF loader does."""
    rest = rows.shape[1:]
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(
        rows.shape
    )  # fmt: skip


class TensorNames:
    """HF state-dict key → llama.cpp tensor name, and the q/k permutation each needs."""

    def __init__(self, arch: str, hf: Any) -> None:
        import gguf

        self.gguf_arch, self.permutes = ARCHS[arch]
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.gguf_arch)
        self._map = gguf.get_tensor_name_map(arch_id, int(hf.num_hidden_layers))
        self.n_head, self.n_kv, _ = head_counts(hf)

    def name(self, key: str) -> str:
        out = self._map.get_name(key, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise ConfigError(f"format=gguf: no llama.cpp tensor name for {key!r}")
        return out

    def heads_to_permute(self, gguf_name: str) -> int | None:
        """The head count whose rotary rows ``gguf_name`` permutes (q: query heads, k: KV
        heads), or None."""
        if not self.permutes:
            return None
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
        return {"attn_q": self.n_head, "attn_k": self.n_kv}.get(kind)

    def to_gguf(self, gguf_name: str, rows: Tensor) -> Tensor:
        heads = self.heads_to_permute(gguf_name)
        return rows if heads is None else permute_qk(rows, heads)

    def from_gguf(self, gguf_name: str, rows: Tensor) -> Tensor:
        heads = self.heads_to_permute(gguf_name)
        return rows if heads is None else unpermute_qk(rows, heads)


# ---------------------------------------------------------------- tensors
def source_weight(model: nn.Module, name: str) -> Tensor:
    """The matrix a target's configurations quantize (W, or W − L for method.init=lpq|lq)."""
    module = base_linear(model, name)
    source = getattr(module, "_source", None)
    weight = source() if source is not None else module.weight
    return weight.detach().cpu()


def target_blocks(model: nn.Module, name: str, gguf_type: str) -> tuple[Tensor, tuple[int, ...]]:
    """A target's blocks under ``gguf_type`` (d_out, d_in / block · type size) uint8, exactly as
    training served them: the layer's packed entry (pinned, cached, or ``encode`` of its source
    now), so a run whose packed storage dropped the full-precision originals exports too."""
    module = base_linear(model, name)
    if isinstance(module, QuantLinear):
        entry = module.packed_entry(GGUFOption(gguf_type))
        return entry.codes.detach().cpu(), tuple(entry.shape)
    W = source_weight(model, name)  # (d_out, d_in)
    return encode(W, gguf_type), tuple(W.shape)


def _float_tensor(name: str, value: Tensor, kind: str) -> GGUFTensor:
    shape = tuple(value.shape)
    if kind == "Q8_0":
        raw = encode(value.float(), "Q8_0", search=False)  # (rows, row bytes), ggml's RTN rule
        return GGUFTensor(name, raw.numpy(), kind, shape)
    dtype = np.float16 if kind == "F16" else np.float32
    return GGUFTensor(name, value.detach().float().cpu().numpy().astype(dtype), kind, shape)


def base_tensors(
    model: nn.Module,
    names: list[str],
    types: dict[str, str],
    tensor_names: TensorNames,
    embedding_type: str = "F16",
) -> list[GGUFTensor]:
    """Every tensor of the base GGUF: targets at their configuration's type, the rest at the
    stated types (``NON_TARGET``, ``embedding_type``); a tied output is written once."""
    if embedding_type not in EMBEDDING_TYPES:
        raise ConfigError(f"embedding_type={embedding_type!r}; allowed: {list(EMBEDDING_TYPES)}")
    out: list[GGUFTensor] = []
    seen: set[tuple[int, int]] = set()
    for key, value in clean_state_dict(model, names).items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen:  # a tied lm_head: llama.cpp reads token_embd when output is absent
            continue
        seen.add(ident)
        gname = tensor_names.name(key)
        value = tensor_names.to_gguf(gname, value.detach().cpu())
        if gname in ("token_embd.weight", "output.weight"):
            kind = embedding_type if value.shape[-1] % 32 == 0 else "F16"
        else:
            kind = NON_TARGET["biases" if key.endswith(".bias") else "norms"]
        out.append(_float_tensor(gname, value, kind))
    for name in names:
        gname = tensor_names.name(f"{name}.weight")
        raw, shape = target_blocks(model, name, types[name])
        out.append(GGUFTensor(gname, tensor_names.to_gguf(gname, raw).numpy(), types[name],
                              shape))  # fmt: skip
    freqs = rope_freqs(model.config)
    if freqs is not None:
        out.append(GGUFTensor("rope_freqs.weight", freqs, NON_TARGET["rope_freqs"], freqs.shape))
    return out


def rope_freqs(hf: Any) -> np.ndarray | None:
    """Llama 3.1's RoPE scaling as llama.cpp reads it: one factor per rotary frequency (the
    ``rope_freqs`` tensor), by the schedule of transformers' ``_compute_llama3_parameters``."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"format=gguf: RoPE scaling {kind!r} is not supported (use merged)")
    _, _, dim = head_counts(hf)
    base = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    factor = float(params["factor"])
    low, high = (
        float(params.get("low_freq_factor", 1.0)),
        float(params.get("high_freq_factor", 4.0)),
    )
    old = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old / high, 1.0,
        np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )  # fmt: skip
    return factors.astype(np.float32)


# ---------------------------------------------------------------- metadata
def add_hyperparameters(writer: Any, hf: Any) -> None:
    n_head, n_kv, head_dim = head_counts(hf)
    params = getattr(hf, "rope_parameters", None) or {}
    writer.add_context_length(int(hf.max_position_embeddings))
    writer.add_embedding_length(int(hf.hidden_size))
    writer.add_block_count(int(hf.num_hidden_layers))
    writer.add_feed_forward_length(int(hf.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(hf, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(float(hf.rms_norm_eps))
    writer.add_vocab_size(int(hf.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != int(hf.hidden_size):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_base(
    path: Path,
    tensors: list[GGUFTensor],
    hf: Any,
    gguf_arch: str,
    tok: Any,
    model_cfg: Any,
    title: str,
) -> None:
    """Write one base GGUF file (header, metadata, tensors) at ``path``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(title)
    add_hyperparameters(writer, hf)
    if tok is not None:
        add_tokenizer(writer, tok, model_cfg, int(hf.vocab_size))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in tensors:
        if t.type in GGUF_TYPES:
            writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.type])
        else:
            writer.add_tensor(t.name, t.data)
    _finish(writer)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_bits(tensors: list[GGUFTensor]) -> dict[str, Any]:
    """Bits per weight of the file's tensors (targets and the rest) and its tensor table."""
    total = sum(t.numel for t in tensors)
    nbytes = sum(t.nbytes for t in tensors)
    return {
        "params": total,
        "tensor_bytes": nbytes,
        "bits_per_weight": 8 * nbytes / total,
        "tensors": {t.name: {"type": t.type, "shape": list(t.shape)} for t in tensors},
    }


__all__ = [
    "ARCHS",
    "EMBEDDING_TYPES",
    "NON_TARGET",
    "GGUFTensor",
    "TensorNames",
    "add_hyperparameters",
    "base_tensors",
    "check_config",
    "check_gguf_run",
    "file_bits",
    "head_counts",
    "permute_qk",
    "rope_freqs",
    "source_weight",
    "unpermute_qk",
    "write_base",
]
