"""A frozen linear layer whose weight is the quantized weight of the current configuration.

Configuration switching is a lookup, not a re-quantization or a disk load (docs/packed.md). Every
(module name, QuantConfig) pair is quantized once (NF-b with double quantization, QLoRA arXiv
2305.14314 §3, in LQ-LoRA's configuration space, arXiv 2311.12023 §3.2) and kept in a
``DequantCache`` (LRU, bounded in MB); switching a ``QuantLinear`` afterwards is a dict lookup.

Two storages (``quant.storage``):

* ``dequantized``: the cache holds the dequantized weight (d_out, d_in) in the original's dtype;
  the forward is ``F.linear`` on it. Costs a full-precision copy per cached option.
* ``packed``: the cache holds the ``PackedTensor`` (bit-packed codes, quantized scales, second-level
  constants): the storage formula's size. The forward dequantizes the current weight on the fly
  and frees it; the backward recomputes it (``coalora.quant.packing.packed_linear``). Both storages
  give bit-identical outputs and input gradients.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coalora.errors import CoaloraError
from coalora.quant.config import GGUFOption, LayerOption, QuantConfig
from coalora.quant.gguf_space import GGUFPacked
from coalora.quant.nf import fake_quantize
from coalora.quant.packing import (
    PackedTensor,
    check_storage,
    dequantize_packed,
    pack_option,
    packed_linear,
)

Entry = Tensor | PackedTensor | GGUFPacked
KEEP_ORIGINAL = ("device", "cpu", "drop")  # where ``freeze`` leaves the full-precision weight


def entry_nbytes(entry: Entry) -> int:
    """Resident bytes of a cache entry (a packed entry counts codes, scales, constants, offset)."""
    if isinstance(entry, (PackedTensor, GGUFPacked)):
        return entry.nbytes()
    return entry.numel() * entry.element_size()


class DequantCache:
    """LRU cache of quantized weights keyed by (module name, QuantConfig), bounded in MB.

    ``storage="dequantized"`` stores dense dequantized tensors, ``"packed"`` stores
    ``PackedTensor`` entries (docs/packed.md). An entry larger than the whole limit is returned
    but not stored. Evicted entries still in use by a layer stay alive through that layer until it
    switches away.
    """

    def __init__(self, limit_mb: float = 4096, storage: str = "dequantized"):
        if limit_mb < 0:
            raise ValueError(f"cache_limit_mb={limit_mb} must be ≥ 0")
        self.storage = check_storage(storage)
        self.limit_bytes = int(limit_mb * 2**20)
        self._store: OrderedDict[Hashable, Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    _size = staticmethod(entry_nbytes)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store

    def get(self, key: Hashable) -> Entry | None:
        t = self._store.get(key)
        if t is None:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: Hashable, t: Entry) -> None:
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

    def get_or_create(self, key: Hashable, create: Callable[[], Entry]) -> Entry:
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
            "storage": self.storage,
            "entries": len(self._store),
            "mb": self.nbytes / 2**20,
            "limit_mb": self.limit_bytes / 2**20,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"DequantCache({self.storage}, {s['entries']} entries, {s['mb']:.1f}/"
            f"{s['limit_mb']:.0f} MB, hits={self.hits}, misses={self.misses})"
        )


class QuantLinear(nn.Module):
    """Frozen replacement of an ``nn.Linear``: ``F.linear(x, quantized weight, bias)``.

    The original weight is kept as a non-persistent buffer ``weight_fp`` (shared storage, fp32 is
    not copied) to quantize configurations on first use; ``set_config(None)`` means full
    precision. ``name`` is the target module name, the key of configurations and cache entries.
    The storage is the cache's (``storage=`` builds a cache of that kind when none is given).
    ``freeze(options, keep_original)`` pins a fixed set of options in the layer, outside the LRU,
    and drops the original or moves it to the CPU.
    """

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        cache: DequantCache | None = None,
        storage: str | None = None,
    ):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(linear).__name__}")
        if cache is None:
            cache = DequantCache(storage=storage or "dequantized")
        elif storage is not None and check_storage(storage) != cache.storage:
            raise ValueError(f"{name}: storage={storage!r} but the cache stores {cache.storage!r}")
        self.name = name
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.cache = cache
        self.register_buffer("weight_fp", linear.weight.detach(), persistent=False)  # (d_out, d_in)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.qc: QuantConfig | None = None
        self._weight: Tensor | None = None  # current dequantized weight; None = weight_fp
        self._packed: PackedTensor | None = None  # current packed entry (packed storage)
        self._pinned: dict[QuantConfig, Entry] = {}
        self._original_cpu: Tensor | None = None  # keep_original="cpu": not moved by .to()

    @property
    def storage(self) -> str:
        # a subclass that serves its own dense weights (``_dequantized``) stays dequantized
        if type(self)._dequantized is not QuantLinear._dequantized:
            return "dequantized"
        return self.cache.storage

    def _original(self) -> Tensor:
        w = self.weight_fp if self.weight_fp is not None else self._original_cpu
        if w is None:
            raise CoaloraError(
                f"{self.name}: the full-precision weight was dropped (freeze keep_original="
                f"'drop'); available configurations: {sorted(q.key for q in self._pinned)}"
            )
        return w

    def _source(self) -> Tensor:
        """The matrix every configuration quantizes (and full precision serves): the original
        here; ``coalora.quant.residual`` subtracts the low-rank part its adapter carries."""
        return self._original()

    def _dequantized(self, qc: LayerOption) -> Tensor:
        pinned = self._pinned.get(qc)
        if isinstance(pinned, Tensor):
            return pinned
        key = (self.name, qc)
        w = self.cache.get(key)
        ref = self._original()
        if w is None or w.device != ref.device or w.dtype != ref.dtype:
            with torch.no_grad():
                w = fake_quantize(self._source(), qc)  # (d_out, d_in), dtype of the original
            self.cache.put(key, w)
        return w

    def packed_entry(self, qc: LayerOption) -> PackedTensor | GGUFPacked:
        """The packed form of this layer's weight under ``qc`` (pinned, cached, or quantized now)."""
        pinned = self._pinned.get(qc)
        if isinstance(pinned, (PackedTensor, GGUFPacked)):
            return pinned
        key = (self.name, qc)
        p = self.cache.get(key) if self.cache.storage == "packed" else None
        if p is None:
            with torch.no_grad():
                p = pack_option(self._source(), qc)
            if self.cache.storage == "packed":
                self.cache.put(key, p)
        return p

    def set_config(self, qc: LayerOption | None) -> None:
        """Switch to ``qc`` (None = full precision); a cache lookup after the first use."""
        if qc is not None and not isinstance(qc, (QuantConfig, GGUFOption)):
            raise TypeError(
                f"{self.name}: expected QuantConfig, GGUFOption or None, got {type(qc).__name__}"
            )
        if isinstance(qc, GGUFOption) and not qc.allows(self.in_features):
            raise CoaloraError(
                f"{self.name}: GGUF type {qc.type} needs rows that hold whole blocks; this layer "
                f"has {self.in_features} inputs"
            )
        if qc is None:
            self._original()  # raises if the original was dropped
            self._weight = self._packed = None
        elif self.storage == "packed":
            self._weight, self._packed = None, self.packed_entry(qc)
        else:
            self._weight, self._packed = self._dequantized(qc), None
        self.qc = qc

    def freeze(self, options: Iterable[QuantConfig], keep_original: str = "drop") -> int:
        """Pin ``options`` (quantized now if needed) in this layer, outside the LRU cache, and
        keep the original on its device (``"device"``), on the CPU (``"cpu"``) or not at all
        (``"drop"``). Returns the pinned bytes."""
        if keep_original not in KEEP_ORIGINAL:
            raise ValueError(
                f"keep_original={keep_original!r} is not allowed; allowed: {list(KEEP_ORIGINAL)}"
            )
        for qc in dict.fromkeys(options):
            entry = self.packed_entry(qc) if self.storage == "packed" else self._dequantized(qc)
            self._pinned[qc] = entry
        if keep_original != "device" and self.weight_fp is not None:
            if keep_original == "cpu":
                self._original_cpu = self.weight_fp.to("cpu")
            self.weight_fp = None
        if self.qc is not None:
            self.set_config(self.qc)
        return sum(entry_nbytes(e) for e in self._pinned.values())

    @classmethod
    def from_packed(
        cls,
        name: str,
        entries: dict[QuantConfig, PackedTensor],
        bias: Tensor | None,
        cache: DequantCache | None = None,
    ) -> QuantLinear:
        """A packed layer serving ``entries`` only (no full-precision original), e.g. an export."""
        if not entries:
            raise ValueError(f"{name}: no packed entries")
        shape = {tuple(p.shape) for p in entries.values()}
        if len(shape) != 1 or len(next(iter(shape))) != 2:
            raise ValueError(f"{name}: packed entries have shapes {sorted(shape)}")
        d_out, d_in = next(iter(shape))
        with torch.device("meta"):
            lin = nn.Linear(d_in, d_out, bias=bias is not None)
        layer = cls(lin, name, cache or DequantCache(0, storage="packed"))
        if layer.storage != "packed":
            raise ValueError(f"{name}: from_packed needs a packed cache")
        layer.weight_fp = None
        layer._pinned = dict(entries)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        layer.set_config(next(iter(entries)))
        return layer

    def options(self) -> list[QuantConfig]:
        """Pinned configurations (all a frozen layer can serve without its original)."""
        return list(self._pinned)

    def current_nbytes(self) -> int:
        """Bytes of the current configuration's entry (0 at full precision)."""
        if self._packed is not None:
            return self._packed.nbytes()
        return 0 if self._weight is None else entry_nbytes(self._weight)

    def original_nbytes(self) -> int:
        w = self.weight_fp if self.weight_fp is not None else self._original_cpu
        return 0 if w is None else entry_nbytes(w)

    def _current_packed(self, device: torch.device) -> PackedTensor:
        p = self._packed
        if p.codes.device != device:  # the module moved after set_config
            p = p.to(device)
            if self.qc in self._pinned:
                self._pinned[self.qc] = p
            else:
                self.cache.put((self.name, self.qc), p)
            self._packed = p
        return p

    @property
    def weight(self) -> Tensor:
        """The current weight as a dense tensor (freshly dequantized under packed storage)."""
        if self._packed is not None:
            ref = self.weight_fp if self.weight_fp is not None else self.bias
            dtype = ref.dtype if ref is not None else torch.float32
            return dequantize_packed(self._packed, dtype)
        w = self._weight
        if w is None:
            return self._source()
        if self.weight_fp is not None and (
            w.device != self.weight_fp.device or w.dtype != self.weight_fp.dtype
        ):
            self.set_config(self.qc)  # the module was moved or cast after set_config
            w = self._weight
        return w

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is not None:
            return packed_linear(x, self._current_packed(x.device), self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        cfg = "fp" if self.qc is None else self.qc.key
        return (
            f"{self.name!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"config={cfg}, storage={self.storage}"
        )


__all__ = ["KEEP_ORIGINAL", "DequantCache", "QuantLinear", "entry_nbytes"]
