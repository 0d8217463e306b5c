"""llama.cpp as a Python runtime for GGUF exports (docs/gguf.md, "Export to llama.cpp").

The ``llamacpp`` extra installs the prebuilt ``xllamacpp`` wheel (llama.cpp's server, embedded).
Its server answers per-token results only through its embedding endpoint: with pooling ``none``
``POST /embedding`` returns, for every input token, the model's last hidden state after the final
RMS norm (the vector llama.cpp multiplies by ``output``). ``LlamaCpp.hidden`` asks for it on a
block of token ids (no BOS added), and ``block_nll`` turns it into next-token NLL with the
file's own output matrix (``output`` or, tied, ``token_embd``) dequantized by gguf-py: so the
transformer, the quantized matmuls and the LoRA adapter run in llama.cpp, the last projection in
float32 torch.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from coalora.errors import CoaloraError

EXTRA = "pip install 'coalora[llamacpp]'  (the prebuilt xllamacpp wheel)"


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise CoaloraError(f"the llama.cpp runtime is not installed: {EXTRA}") from None
    return xllamacpp


class LlamaCpp:
    """A GGUF base (+ optional GGUF LoRA adapter) loaded in llama.cpp, scoring token blocks."""

    def __init__(
        self,
        base: str | Path,
        adapter: str | Path | None = None,
        n_ctx: int = 512,
        threads: int = 1,
        scale: float = 1.0,
    ) -> None:
        xlc = _xllamacpp()
        p = xlc.CommonParams()
        p.model.path = str(base)
        p.embedding = True
        p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        p.n_ctx = p.n_batch = p.n_ubatch = int(n_ctx)  # a block is decoded in one batch
        p.n_parallel = 1
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(threads)
        p.warmup = False
        if adapter is not None:
            p.lora_adapters = [xlc.CommonAdapterLoraInfo(str(adapter), float(scale))]
        self.server = xlc.Server(p)
        self.url = f"{self.server.listening_address}/embedding"
        self.n_ctx = int(n_ctx)

    def hidden(self, tokens: list[int]) -> Tensor:
        """(T, d) final-norm hidden states of ``tokens`` (one sequence, no BOS added)."""
        if len(tokens) > self.n_ctx:
            raise CoaloraError(f"llama.cpp: {len(tokens)} tokens exceed n_ctx={self.n_ctx}")
        body = json.dumps({"content": [int(t) for t in tokens]}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            out = json.loads(r.read())
        if isinstance(out, dict) and "error" in out:
            raise CoaloraError(f"llama.cpp: {out['error'].get('message', out['error'])}")
        return torch.tensor(np.asarray(out[0]["embedding"], dtype=np.float32))  # (T, d)

    def close(self) -> None:
        self.server = None


def output_matrix(base: str | Path) -> Tensor:
    """The file's output projection (vocab, d) as float32: ``output`` or, tied, ``token_embd``."""
    import gguf

    reader = gguf.GGUFReader(str(base))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        raise CoaloraError(f"{base}: no output.weight or token_embd.weight")
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))


def block_nll(hidden: Tensor, W_out: Tensor, tokens: list[int] | Tensor) -> tuple[float, int]:
    """(Σ NLL, count) of predicting ``tokens[1:]`` from ``hidden[:-1]`` (the block protocol of
    ``coalora.data.lm``: block_length − 1 scored tokens)."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    logits = hidden[:-1].double() @ W_out.double().T  # (T-1, vocab)
    nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
    return float(nll), int(ids.numel() - 1)


def score_blocks(runtime: LlamaCpp, W_out: Tensor, blocks: Tensor) -> dict[str, float]:
    """Perplexity of ``blocks`` (N, T) in llama.cpp and its throughput (tokens fed per second of
    llama.cpp time; the output projection is not timed)."""
    total, count, seconds = 0.0, 0, 0.0
    for row in blocks.tolist():
        t0 = time.perf_counter()
        h = runtime.hidden(row)
        seconds += time.perf_counter() - t0
        nll, n = block_nll(h, W_out, row)
        total, count = total + nll, count + n
    return {
        "nll": total / count,
        "perplexity": float(np.exp(total / count)),
        "tokens": int(blocks.numel()),
        "tokens_per_s": blocks.numel() / seconds,
    }


__all__ = ["EXTRA", "LlamaCpp", "block_nll", "output_matrix", "score_blocks"]
