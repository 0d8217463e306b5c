"""GGUF tensor types (coalora.quant.gguf_types, docs/gguf.md): our decode equals gguf-py's
dequantize bit for bit on every type, our encode is at least as good as gguf-py's quantize where it
has one, the bits per weight and the row rule match gguf's table, and the search never loses to RTN."""

from __future__ import annotations

import math
from importlib.metadata import version

import numpy as np
import pytest
import torch

from coalora.errors import ConfigError
from coalora.quant.gguf_types import (
    GGUF_TYPES,
    allowed,
    allowed_types,
    check_row,
    decode,
    encode,
    fake_quantize_gguf,
    gguf_errors,
)

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # noqa: E402

NAMES = list(GGUF_TYPES)
BITS = {  # GGUF's table: 8 · type_size / block
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q8_0": 8.5,
    "IQ4_NL": 4.5,
    "Q2_K": 2.625,
    "Q3_K": 3.4375,
    "Q4_K": 4.5,
    "Q5_K": 5.5,
    "Q6_K": 6.5625,
    "IQ4_XS": 4.25,
}


def matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a few outliers, one all-zero block and one constant block."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[0, 5], W[1, 300 % cols], W[rows - 1, cols - 1] = 0.4, -0.3, 0.25  # outliers
    W[2, :256] = 0.0
    W[3, :256] = 0.0125
    return W


MATRICES = {"8x256": matrix(8, 256, 0), "4x512": matrix(4, 512, 1)}


def as_bits(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def rel_err(What: torch.Tensor, W: torch.Tensor) -> float:
    return ((What - W) ** 2).sum().item() / (W**2).sum().item()


def gguf_can_quantize(name: str) -> bool:
    try:
        quants.quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType[name])
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_registry_matches_gguf_table(name):
    t = GGUF_TYPES[name]
    qt = GGMLQuantizationType[name]
    assert t.ggml_type == qt.value
    assert (t.block, t.type_size) == GGML_QUANT_SIZES[qt]
    block, type_size = GGML_QUANT_SIZES[qt]
    assert t.bits_per_weight == 8 * type_size / block == BITS[name]


@pytest.mark.parametrize("search", [False, True], ids=["rtn", "search"])
@pytest.mark.parametrize("shape", list(MATRICES))
@pytest.mark.parametrize("name", NAMES)
def test_our_decode_equals_gguf_dequantize_bit_for_bit(name, shape, search):
    W = MATRICES[shape]
    raw = encode(W, name, search=search)
    qt = GGMLQuantizationType[name]
    assert raw.dtype == torch.uint8
    assert tuple(raw.shape) == quants.quant_shape_to_byte_shape(W.shape, qt)
    ours = decode(raw, name, W.shape)
    ref = quants.dequantize(raw.numpy(), qt)
    assert ref.shape == tuple(W.shape)
    np.testing.assert_array_equal(as_bits(ours), as_bits(ref))
    assert torch.equal(fake_quantize_gguf(W, name, search=search), ours)
    assert rel_err(ours, W) < 0.2  # a sane encoding, not only a decodable one


@pytest.mark.parametrize("name", NAMES)
def test_decode_of_gguf_bytes_and_error_vs_gguf_quantize(name):
    if not gguf_can_quantize(name):
        pytest.skip(f"gguf-py {version('gguf')} only dequantizes {name}")
    qt = GGMLQuantizationType[name]
    for W in MATRICES.values():
        theirs = quants.quantize(W.numpy(), qt)
        ref = quants.dequantize(theirs, qt)
        np.testing.assert_array_equal(as_bits(decode(theirs, name, W.shape)), as_bits(ref))
        theirs_err = rel_err(torch.from_numpy(ref), W)
        assert rel_err(fake_quantize_gguf(W, name), W) <= 1.02 * theirs_err
        # RTN is the same rule, but rounds against the scale the block stores (fp16)
        assert rel_err(fake_quantize_gguf(W, name, search=False), W) <= 1.001 * theirs_err


def test_gguf_py_quantizes_the_32_weight_types():
    """The comparison above runs at least for the five types issue #22 found gguf-py quantizes."""
    assert all(gguf_can_quantize(n) for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))


@pytest.mark.parametrize("name", NAMES)
def test_search_never_loses_to_rtn_weighted_or_not(name):
    W = MATRICES["4x512"]
    F = torch.distributions.Exponential(1.0).sample(W.shape) ** 2  # a skewed importance
    F[:, :7] *= 50.0
    plain = gguf_errors(W, [name], search=False)
    assert gguf_errors(W, [name])[0] <= plain[0]
    weighted_rtn = gguf_errors(W, [name], weight=F, search=False)[0]
    weighted = gguf_errors(W, [name], weight=F)[0]
    assert weighted <= weighted_rtn
    What = fake_quantize_gguf(W, name, weight=F)
    assert math.isclose((F * (What - W) ** 2).sum().item(), weighted, rel_tol=1e-5)


def test_errors_fall_with_bits():
    W = MATRICES["4x512"]
    names = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    errs = gguf_errors(W, names).tolist()
    assert errs == sorted(errs, reverse=True)
    for a, b in [("Q4_0", "Q5_0"), ("Q4_1", "Q5_1"), ("IQ4_NL", "Q5_0"), ("IQ4_XS", "Q5_K")]:
        assert gguf_errors(W, [a])[0] > gguf_errors(W, [b])[0]


def test_row_rule():
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"):
        assert not allowed(name, 576) and allowed(name, 1536)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"):
        assert allowed(name, 576) and allowed(name, 1536) and not allowed(name, 100)
    assert set(allowed_types(576)) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}
    with pytest.raises(
        ValueError, match=r"GGUF type Q4_K needs rows .* multiple of 256.* 576"
    ) as e:
        encode(torch.zeros(2, 576), "Q4_K")
    assert "\n" not in str(e.value) and isinstance(e.value, ConfigError)
    check_row("Q4_K", 1536)
    errs = gguf_errors(torch.randn(2, 576), ["Q4_0", "Q4_K"], disallowed=math.inf)
    assert math.isfinite(errs[0]) and errs[1] == math.inf


def test_bad_inputs_fail_clearly():
    with pytest.raises(ConfigError, match="'Q4_2' is not supported; allowed: Q2_K"):
        encode(torch.zeros(1, 32), "Q4_2")
    with pytest.raises(ConfigError, match="inf or NaN"):
        encode(torch.full((1, 32), math.nan), "Q4_0")
    with pytest.raises(ConfigError, match="weight has shape"):
        encode(torch.zeros(1, 32), "Q4_0", weight=torch.ones(1, 64))
    with pytest.raises(ConfigError, match="do not hold shape"):
        decode(torch.zeros(17, dtype=torch.uint8), "Q4_0", (1, 32))


def test_zero_weights_encode_to_zeros():
    W = torch.zeros(2, 256)
    for name in NAMES:
        assert torch.equal(fake_quantize_gguf(W, name), W)


def test_decode_accepts_bytes_and_keeps_dtype():
    W = MATRICES["8x256"].half()
    raw = encode(W, "Q4_K")
    a = decode(raw.numpy().tobytes(), "Q4_K", W.shape)
    assert torch.equal(a, decode(raw, "Q4_K", W.shape))
    assert fake_quantize_gguf(W, "Q4_K").dtype == torch.float16


def test_blocks_written_and_read_back_through_a_gguf_file(tmp_path):
    """GGUFWriter stores our blocks as-is (raw_dtype) and GGUFReader hands the same bytes back."""
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    W = MATRICES["4x512"]
    for name in ("Q4_K", "IQ4_NL", "Q6_K"):
        writer.add_tensor(name, encode(W, name).numpy(), raw_dtype=GGMLQuantizationType[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(path).tensors:
        assert t.tensor_type == GGMLQuantizationType[t.name]
        assert [int(x) for x in t.shape] == [512, 4]  # ggml order: innermost first
        assert np.array_equal(np.asarray(t.data), encode(W, t.name).numpy())


def test_chunking_does_not_change_the_bytes(monkeypatch):
    from coalora.quant import gguf_types

    W = MATRICES["4x512"]
    whole = {n: encode(W, n) for n in ("Q4_1", "Q3_K", "IQ4_XS")}
    decoded = {n: decode(raw, n, W.shape) for n, raw in whole.items()}
    monkeypatch.setattr(gguf_types, "_CHUNK", 256)  # one 256-weight super-block per step
    for name, raw in whole.items():
        assert torch.equal(encode(W, name), raw)
        assert torch.equal(decode(raw, name, W.shape), decoded[name])
        assert gguf_errors(W, [name])[0] == pytest.approx(
            ((fake_quantize_gguf(W, name) - W) ** 2).sum().item(), rel=1e-6
        )
