"""A frozen linear whose every configuration quantizes ``W − L`` instead of ``W``.

For one adapter over many configurations initialised to carry a low-rank part ``L = L1 L2`` of
the weight (``method.init=lpq|lq``; docs/methods.md, "Quantization-aware initialisation"): the
base of configuration ``c`` is ``quantize_c(W − L)`` and the adapter starts at ``s·B·A = L``,
so the effective weight starts at ``deq(quantize_c(W − L)) + L`` for every ``c`` (the CoA-LoRA
code's ``lora-lpq``, arXiv 2509.25214; LQ-LoRA's decomposition, arXiv 2311.12023 §3).

:class:`ResidualQuantLinear` keeps the original ``W`` as ``weight_fp`` (what allocations,
sensitivities and error tables read) and the factors ``L1`` (d_out, r), ``L2`` (r, d_in) as
non-persistent buffers: ``r·(d_in + d_out)`` numbers, not a second full-precision copy. Every path
that quantizes — the base switch and its cache, packed storage, ``freeze``, a packed export —
quantizes :func:`coalora.quant.lq.subtract_lowrank`, computed per layer when an entry is made.
"""

from __future__ import annotations

from torch import Tensor, nn

from coalora.quant.linear import DequantCache, QuantLinear
from coalora.quant.lq import subtract_lowrank


class ResidualQuantLinear(QuantLinear):
    """``QuantLinear`` whose configurations (and full precision) serve ``W − L1 L2``."""

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        cache: DequantCache | None,
        l1: Tensor,
        l2: Tensor,
    ) -> None:
        super().__init__(linear, name, cache)
        r = l1.shape[1] if l1.dim() == 2 else -1
        if tuple(l1.shape) != (self.out_features, r) or tuple(l2.shape) != (r, self.in_features):
            raise ValueError(
                f"{name}: low-rank factors {tuple(l1.shape)} @ {tuple(l2.shape)} do not fit a "
                f"({self.out_features}, {self.in_features}) weight"
            )
        self.register_buffer("lowrank_l1", l1.detach(), persistent=False)  # (d_out, r)
        self.register_buffer("lowrank_l2", l2.detach(), persistent=False)  # (r, d_in)

    def _source(self) -> Tensor:
        return subtract_lowrank(self._original(), self.lowrank_l1, self.lowrank_l2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", minus rank-{self.lowrank_l1.shape[1]} part"


__all__ = ["ResidualQuantLinear"]
