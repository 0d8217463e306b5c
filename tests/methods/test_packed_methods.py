"""Fixed-configuration methods with packed storage free the full-precision originals."""

from __future__ import annotations

import pytest
import torch

from coalora.quant import resident_weight_bytes

QLORA = ["method=qlora", "quant=budget", "quant.budget=3.0"]
QWHA = ["method=qwha", "quant=budget", "quant.budget=3.0"]


def _batch(dm):
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("method", [QLORA, QWHA], ids=["qlora", "qwha"])
def test_packed_fixed_methods_hold_only_the_packed_base_and_match_dequantized(built, method):
    _, packed, dm = built([*method, "quant.storage=packed"])
    _, dense, _ = built([*method, "quant.storage=dequantized"])
    held = resident_weight_bytes(packed.model)
    assert held["original"] == 0  # dropped: QLoRA never quantizes another configuration
    assert resident_weight_bytes(dense.model)["original"] > 0  # the dequantized path keeps it
    # the formula's bytes plus the padding of super-blocks (tiny_bert's matrices are smaller
    # than one), far below the dequantized fp32 copy
    assert packed.method.config.total_bits() / 8 <= held["quantized"]
    assert held["quantized"] < resident_weight_bytes(dense.model)["quantized"] / 4
    dense.load_state_dict(packed.state_dict(), strict=False)  # same adapter + head
    batch = _batch(dm)
    packed.model.eval(), dense.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(packed.model(**batch).logits, dense.model(**batch).logits)
    packed.model.train()
    loss = packed.method.training_loss(packed.model, batch, 0)
    loss.backward()
    grads = [p.grad for _, p in packed.method.trainable_parameters(packed.model)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_multiconfig_methods_keep_the_original_for_new_configurations(built):
    pool = ["method.pool.start=3.0", "method.pool.stop=4.2", "method.pool.step=0.4"]
    _, lit, _ = built(["method=coalora", *pool, "quant.storage=packed"])
    assert resident_weight_bytes(lit.model)["original"] > 0
