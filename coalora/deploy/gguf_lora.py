"""The adapter of ``export.py format=gguf``: a llama.cpp GGUF LoRA file per configuration
(docs/gguf.md, "Export to llama.cpp").

llama.cpp applies a LoRA adapter as ``W x + s · B (A x)`` with ``s = adapter.lora.alpha / r``
(``r`` the rank of each pair), the convention of PEFT and of LoRA (arXiv 2106.09685 §4.1), so
``alpha = scaling · r`` reproduces coalora's ``scaling``. Each target ``blk.N.<t>.weight`` gets
``<name>.lora_a`` (r, d_in) and ``<name>.lora_b`` (d_out, r) in F32. For CoA-LoRA the B of a
configuration is the folded ``B' = B (I + γ U(c))`` that ``job.adapt(config)`` put into the model
(arXiv 2509.25214 §3); q/k rows of B are permuted like the base's (``TensorNames.to_gguf``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor, nn

from coalora.deploy.gguf_base import TensorNames, _finish
from coalora.errors import ConfigError

NOT_LORA = (
    "format=gguf writes LoRA pairs (A, B); {name} has a {kind} adapter: use format=merged "
    "(a full-precision checkpoint) and convert that with llama.cpp's tools"
)


def lora_pairs(
    model: nn.Module, names: list[str], tensor_names: TensorNames, method: str = "the run"
) -> tuple[dict[str, tuple[Tensor, Tensor]], float, int]:
    """``{gguf base tensor name: (A, B)}`` at the model's current configuration (B in GGUF row
    order), the common LoRA ``scaling`` and rank; one line when a target has no LoRA pair or
    the scalings/ranks differ (one ``adapter.lora.alpha`` serves the whole file)."""
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    scalings, ranks = set(), set()
    for name in names:
        m = model.get_submodule(name)
        if not hasattr(m, "lora_A"):
            raise ConfigError(NOT_LORA.format(name=method, kind=type(m).__name__))
        A = m.lora_A.detach().float().cpu()  # (r, d_in)
        B = (m.effective_B() if hasattr(m, "effective_B") else m.lora_B).detach().float().cpu()
        gname = tensor_names.name(f"{name}.weight")
        pairs[gname] = (A.contiguous(), tensor_names.to_gguf(gname, B).contiguous())  # (d_out, r)
        scalings.add(float(m.scaling))
        ranks.add(int(A.shape[0]))
    if len(scalings) > 1 or len(ranks) > 1:
        raise ConfigError(
            f"format=gguf: one adapter.lora.alpha per file; LoRA scalings {sorted(scalings)} and "
            f"ranks {sorted(ranks)} differ across layers"
        )
    bad = [n for n, (a, b) in pairs.items() if not (a.isfinite().all() and b.isfinite().all())]
    if bad:
        raise ConfigError(f"format=gguf: non-finite LoRA tensors for {bad[:3]}")
    return pairs, scalings.pop(), ranks.pop()


def write_adapter(
    path: Path, pairs: dict[str, tuple[Tensor, Tensor]], alpha: float, gguf_arch: str, title: str
) -> None:
    """Write a GGUF LoRA adapter (``general.type=adapter``, ``adapter.type=lora``)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(title)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for gname, (A, B) in pairs.items():
        stem = gname  # llama.cpp looks up "<base tensor name>.lora_a" / ".lora_b"
        writer.add_tensor(f"{stem}.lora_a", A.numpy().astype(np.float32))
        writer.add_tensor(f"{stem}.lora_b", B.numpy().astype(np.float32))
    _finish(writer)


__all__ = ["NOT_LORA", "lora_pairs", "write_adapter"]
