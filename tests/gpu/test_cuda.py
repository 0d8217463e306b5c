"""CUDA checks (``-m gpu``; skipped without a GPU): the packed format decodes bit-identically on
the GPU, packed and dequantized storage give the same logits there, and a bf16-autocast
training step of CoA-LoRA on tiny_llama trains only the adapters. ``scripts/gpu_check.sh`` runs
them on a lent GPU machine."""

from __future__ import annotations

import pytest
import torch
from support import TINY_LM

from coalora.quant import NF4, QuantConfig, fake_quantize
from coalora.quant.nf import quantize_nf
from coalora.quant.packing import dequantize_packed, pack_quantized, packed_linear
from coalora.stages.build import build_untrained

pytestmark = pytest.mark.gpu

CONFIGS = [NF4, QuantConfig(3, 8, "fp32", 64, 256), QuantConfig(2, 4, "fp16", 16, 64)]


@pytest.mark.parametrize("qc", CONFIGS, ids=str)
def test_packed_entries_decode_bit_identically_on_cuda(qc):
    W = torch.randn(96, 320, generator=torch.Generator().manual_seed(0))
    p = pack_quantized(quantize_nf(W, qc))
    cpu = dequantize_packed(p)
    assert torch.equal(cpu, fake_quantize(W, qc))
    assert torch.equal(dequantize_packed(p.to("cuda")).cpu(), cpu)
    x = torch.randn(4, 320, device="cuda")
    torch.testing.assert_close(packed_linear(x, p.to("cuda")), x @ cpu.cuda().T)


def _built(storage: str, cache, out):
    overrides = [*TINY_LM, "method=qlora", "quant=budget", "quant.budget=3.0",
                 f"quant.storage={storage}"]  # fmt: skip
    dm, model, method, _ = build_untrained(overrides, cache, out / storage)
    dm.setup("fit")
    return dm, model.cuda(), method


def test_packed_and_dequantized_storage_give_the_same_logits_on_cuda(tmp_path):
    dm, packed, _ = _built("packed", tmp_path / "cache", tmp_path)
    _, dense, _ = _built("dequantized", tmp_path / "cache", tmp_path)
    dense.load_state_dict(packed.state_dict(), strict=False)  # same adapters and head
    batch = {k: v.cuda() for k, v in next(iter(dm.train_dataloader())).items()}
    packed.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(packed(**batch).logits, dense(**batch).logits)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = packed(**batch).logits.float(), dense(**batch).logits.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_a_bf16_coalora_step_on_cuda_trains_only_the_adapters(tmp_path):
    overrides = [*TINY_LM, "method=coalora", "method.pool.step=0.5", "method.eval_budgets=[3.0]"]
    dm, model, method, _ = build_untrained(overrides, tmp_path / "cache", tmp_path / "run")
    dm.setup("fit")
    model.cuda().train()
    for module in method.modules().values():  # the mapper lives beside the model
        module.cuda()
    batch = {k: v.cuda() for k, v in next(iter(dm.train_dataloader())).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += [p for m in method.modules().values() for p in m.parameters()]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = method.training_loss(model, batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
