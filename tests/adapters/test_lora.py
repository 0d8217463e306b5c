import torch
from torch import nn

from coalora.adapters import LoRALinear, inject


def test_zero_b_reproduces_base_output():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))


def test_delta_matches_dense_delta_weight_with_mix():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    nn.init.normal_(lora.lora_B)
    mix = torch.eye(4) + 0.1 * torch.randn(4, 4)
    x = torch.randn(7, 16)
    with lora.mixing(mix):
        dense = x @ lora.delta_weight().T
        torch.testing.assert_close(lora.delta(x), dense, rtol=1e-5, atol=1e-5)
        # s * B M A with s = alpha / r
        expected = 2.0 * lora.lora_B @ mix @ lora.lora_A
        torch.testing.assert_close(lora.delta_weight(), expected)
    # outside the block the layer is plain LoRA again
    torch.testing.assert_close(lora.delta_weight(), 2.0 * lora.lora_B @ lora.lora_A)


def test_anchored_mixing_mixes_only_what_training_added():
    """``anchor_mixing``: B_eff = B₀ + (B − B₀) M in the forward, the dense delta and the fold;
    at the anchor M has no effect; the anchor is not in the state dict."""
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    nn.init.normal_(lora.lora_B)
    lora.anchor_mixing()
    b0 = lora.lora_B.detach().clone()
    mix = torch.eye(4) + 0.3 * torch.randn(4, 4)
    x = torch.randn(7, 16)
    with lora.mixing(mix):  # B = B₀: the mixing changes nothing yet
        torch.testing.assert_close(lora.delta(x), 2.0 * x @ (b0 @ lora.lora_A).T)
    with torch.no_grad():
        lora.lora_B.add_(0.5 * torch.randn_like(lora.lora_B))  # "training" moved B
    expected_B = b0 + (lora.lora_B - b0) @ mix
    with lora.mixing(mix):
        torch.testing.assert_close(lora.effective_B(), expected_B)
        torch.testing.assert_close(lora.delta(x), x @ lora.delta_weight().T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lora.delta_weight(), 2.0 * expected_B @ lora.lora_A)
        mixed = lora(x)
    lora.fold(mix)  # the exported plain LoRA
    torch.testing.assert_close(lora(x), mixed, rtol=1e-5, atol=1e-6)
    assert "lora_B0" not in lora.state_dict()


def test_inject_wraps_named_modules_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    out = inject(model, ["0"], lambda _, m: LoRALinear(m, 2, 4))
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], nn.Linear)
    assert set(out) == {"0"}
