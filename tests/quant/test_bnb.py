"""quant=bnb_nf4: bitsandbytes Linear4bit replacement (QLoRA's kernel path), on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coalora.quant.bnb import replace_with_bnb_nf4


def test_replace_with_bnb_nf4_keeps_outputs_close():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False))
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = model(x)
        layers = replace_with_bnb_nf4(model, ["0", "2"])
        y_q = model(x)
    assert set(layers) == {"0", "2"}
    assert all(isinstance(model[i], bnb.nn.Linear4bit) for i in (0, 2))
    assert model[0].weight.quant_type == "nf4" and model[0].weight.compress_statistics
    assert model[2].bias is None and not any(p.requires_grad for p in model.parameters())
    assert ((y_q - y).norm() / y.norm()).item() < 0.2
    with pytest.raises(TypeError, match="not nn.Linear"):
        replace_with_bnb_nf4(model, ["1"])
