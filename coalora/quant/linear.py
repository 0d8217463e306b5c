"""A frozen linear layer whose weight is the dequantized weight of the current configuration.

DESIGN §3: configuration switching is a lookup, not a re-quantization or a disk load. Every
(module name, QuantConfig) pair is fake-quantized once (algorithms.md §1.3) and kept in a
``DequantCache`` (LRU, bounded in MB); switching a ``QuantLinear`` afterwards is a dict lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coalora.quant.config import QuantConfig
from coalora.quant.nf import fake_quantize


class DequantCache:
    """LRU cache of dequantized weights keyed by (module name, QuantConfig), bounded in MB.

    A tensor larger than the whole limit is returned but not stored. Evicted tensors still in use
    by a layer stay alive through that layer until it switches away.
    """

    def __init__(self, limit_mb: float = 4096):
        if limit_mb < 0:
            raise ValueError(f"cache_limit_mb={limit_mb} must be ≥ 0")
        self.limit_bytes = int(limit_mb * 2**20)
        self._store: OrderedDict[Hashable, Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def _size(t: Tensor) -> int:
        return t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store

    def get(self, key: Hashable) -> Tensor | None:
        t = self._store.get(key)
        if t is None:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: Hashable, t: Tensor) -> None:
        if key in self._store:
            self.nbytes -= self._size(self._store.pop(key))
        size = self._size(t)
        if size > self.limit_bytes:
            return
        while self._store and self.nbytes + size > self.limit_bytes:
            _, old = self._store.popitem(last=False)
            self.nbytes -= self._size(old)
            self.evictions += 1
        self._store[key] = t
        self.nbytes += size

    def get_or_create(self, key: Hashable, create: Callable[[], Tensor]) -> Tensor:
        t = self.get(key)
        if t is None:
            t = create()
            self.put(key, t)
        return t

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._store if predicate(k)]:
            self.nbytes -= self._size(self._store.pop(key))

    def clear(self) -> None:
        self._store.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, float]:
        return {
            "entries": len(self._store),
            "mb": self.nbytes / 2**20,
            "limit_mb": self.limit_bytes / 2**20,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    def __repr__(self) -> str:
        s = self.stats()
        return f"DequantCache({s['entries']} entries, {s['mb']:.1f}/{s['limit_mb']:.0f} MB, hits={self.hits}, misses={self.misses})"


class QuantLinear(nn.Module):
    """Frozen replacement of an ``nn.Linear``: ``F.linear(x, dequantized weight, bias)``.

    The original weight is kept as a non-persistent buffer ``weight_fp`` (shared storage, fp32 is
    not copied) to quantize configurations on first use; ``set_config(None)`` means full
    precision. ``name`` is the target module name, the key of configurations and cache entries.
    """

    def __init__(self, linear: nn.Linear, name: str, cache: DequantCache | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(linear).__name__}")
        self.name = name
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.cache = cache if cache is not None else DequantCache()
        self.register_buffer("weight_fp", linear.weight.detach(), persistent=False)  # (d_out, d_in)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.qc: QuantConfig | None = None
        self._weight: Tensor | None = None  # current dequantized weight; None = weight_fp

    def _dequantized(self, qc: QuantConfig) -> Tensor:
        key = (self.name, qc)
        w = self.cache.get(key)
        ref = self.weight_fp
        if w is None or w.device != ref.device or w.dtype != ref.dtype:
            with torch.no_grad():
                w = fake_quantize(ref, qc)  # (d_out, d_in), dtype of weight_fp
            self.cache.put(key, w)
        return w

    def set_config(self, qc: QuantConfig | None) -> None:
        """Switch to ``qc`` (None = full precision); a cache lookup after the first use."""
        if qc is not None and not isinstance(qc, QuantConfig):
            raise TypeError(f"{self.name}: expected QuantConfig or None, got {type(qc).__name__}")
        self._weight = None if qc is None else self._dequantized(qc)
        self.qc = qc

    @property
    def weight(self) -> Tensor:
        w = self._weight
        if w is None:
            return self.weight_fp
        if w.device != self.weight_fp.device or w.dtype != self.weight_fp.dtype:
            self.set_config(self.qc)  # the module was moved or cast after set_config
            w = self._weight
        return w

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        cfg = "fp" if self.qc is None else self.qc.key
        return f"{self.name!r}, in_features={self.in_features}, out_features={self.out_features}, config={cfg}"


__all__ = ["DequantCache", "QuantLinear"]
