"""GGUF types as a configuration space: options, the row rule in error tables and allocation,
the quantized layer (dequantized and packed storage), the search encoding and configsets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

from coalora.errors import CoaloraError, ConfigError
from coalora.quant import DequantCache, QuantLinear
from coalora.quant.allocation import allocate, build_error_table
from coalora.quant.config import (
    GGUFOption,
    GGUFSpace,
    ModelQuantConfig,
    QuantSpace,
    option_from_dict,
    option_from_key,
)
from coalora.quant.error_table import ErrorTable
from coalora.quant.gguf_types import fake_quantize_gguf
from coalora.search.configset import ConfigSet
from coalora.search.encoding import Encoder, nearest_allowed

SPACE = GGUFSpace(("Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q6_K", "Q8_0"))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {  # 256-wide rows take every type; 64-wide rows only the 32-weight blocks
        "wide.a": torch.randn(8, 256, generator=g),
        "wide.b": torch.randn(4, 512, generator=g) * 3,
        "narrow.a": torch.randn(16, 64, generator=g),
        "narrow.b": torch.randn(8, 96, generator=g) * 0.5,
    }


@pytest.fixture(scope="module")
def table(weights) -> ErrorTable:
    return build_error_table(weights, SPACE)


def test_space_from_cfg_and_bad_values():
    space = QuantSpace.from_cfg(OmegaConf.create({"kind": "gguf", "gguf": ["Q8_0", "Q4_0"]}))
    assert isinstance(space, GGUFSpace) and space.gguf == ("Q4_0", "Q8_0")  # ordered by bits
    assert [o.storage_bits() for o in space.options()] == [4.5, 8.5]
    assert space.fields == ("gguf",) and space.index(GGUFOption("Q8_0")) == (1,)
    assert space.from_index([0]) == GGUFOption("Q4_0")
    nf = QuantSpace.from_cfg({"kind": "nf", "bits": [4], "gguf": ["Q4_0"]})  # gguf ignored
    assert isinstance(nf, QuantSpace) and nf.kind == "nf" and nf.bits == (4,)
    assert QuantSpace.from_cfg({"kind": "gguf"}).gguf[0] == "Q2_K"  # default: every type
    with pytest.raises(ConfigError, match=r"quant.space.kind='ggml' is not allowed; allowed"):
        QuantSpace.from_cfg({"kind": "ggml"})
    with pytest.raises(ConfigError, match=r"\['Q4_9'\] not supported; allowed: \['Q2_K'"):
        QuantSpace.from_cfg({"kind": "gguf", "gguf": ["Q4_0", "Q4_9"]})
    with pytest.raises(ConfigError, match="duplicate"):
        GGUFSpace(("Q4_0", "Q4_0"))
    with pytest.raises(ConfigError, match="gguf=gguf-Q6_K is not allowed"):
        space.validate(GGUFOption("Q6_K"))


def test_option_round_trips(tmp_path):
    o = GGUFOption("IQ4_XS")
    assert o.key == "gguf-IQ4_XS" and option_from_key(o.key) == o
    assert option_from_dict(o.to_dict()) == o and o.storage_bits() == 4.25
    assert option_from_key("b4-b08-fp32-B064-B1256").bits == 4
    config = ModelQuantConfig({"a": o, "b": GGUFOption("Q8_0")}, {"a": 256, "b": 768})
    assert config.average_bits() == pytest.approx((4.25 * 256 + 8.5 * 768) / 1024)
    back = ModelQuantConfig.from_json(config.to_json(tmp_path / "c.json"))
    assert back == config
    with pytest.raises(ValueError, match=r"layers\['a'\]: GGUF type 'Q9' is not supported"):
        ModelQuantConfig.from_dict({"version": 1, "layers": {"a": {"gguf": "Q9", "numel": 4}}})


def test_error_table_marks_what_rows_cannot_hold(weights, table):
    allowed = table.allowed()
    k_types = [k for k, o in enumerate(table.options) if o.type in ("Q3_K", "Q4_K", "Q6_K")]
    assert allowed[:2].all()  # 256 and 512 wide rows take everything
    assert not allowed[2:, k_types].any() and allowed[2:].sum() == 2 * 3
    # each finite cell is Σ (W − decode(encode(W)))²
    W, o = weights["narrow.b"], table.options.index(GGUFOption("Q5_0"))
    want = (W - fake_quantize_gguf(W, "Q5_0")).square().sum(dtype=torch.float64)
    assert table.costs[3, o].item() == pytest.approx(want.item(), rel=1e-6)
    numels = torch.tensor([w.numel() for w in weights.values()], dtype=torch.float64)
    lo = (torch.tensor([3.4375, 3.4375, 4.5, 4.5], dtype=torch.float64) * numels).sum()
    assert table.min_average_bits() == pytest.approx(float(lo / numels.sum()))
    assert table.max_average_bits() == 8.5
    back = ErrorTable.from_bytes(table.to_bytes())
    assert torch.equal(back.costs, table.costs) and back.options == table.options


def _brute_force(table: ErrorTable, budget: float) -> float:
    bits = table.storage_bits()
    best = math.inf
    for choice in itertools.product(range(len(table.options)), repeat=len(table.names)):
        cost = sum(table.costs[i, k].item() for i, k in enumerate(choice))
        avg = sum(bits[k] * n for k, n in zip(choice, table.numels)) / sum(table.numels)
        if avg <= budget + 1e-9 and cost < best:
            best = cost
    return best


@pytest.mark.parametrize("solver", ["exact", "milp", "lagrangian"])
@pytest.mark.parametrize("budget", [4.0, 5.0, 6.5])
def test_allocation_keeps_to_allowed_types(table, solver, budget):
    config, info = allocate(None, budget, SPACE, table=table, solver=solver, return_info=True)
    assert config.average_bits() <= budget + 1e-9
    for name, d_in in zip(table.names, (256, 512, 64, 96)):
        assert config[name].allows(d_in), (name, config[name])
    cost = sum(table.costs[i, table.options.index(config[n])].item() for i, n in enumerate(config))
    if solver != "lagrangian":
        assert cost == pytest.approx(_brute_force(table, budget), rel=1e-9)


def test_budget_below_the_reachable_range_names_it(table):
    with pytest.raises(ValueError, match=r"min achievable 3\.\d+"):
        allocate(None, 3.44, SPACE, table=table)


def test_layer_storages_agree_and_the_row_rule_is_enforced(weights):
    lin = torch.nn.Linear(256, 8)
    with torch.no_grad():
        lin.weight.copy_(weights["wide.a"])
    x = torch.randn(3, 256, requires_grad=True)
    outs = []
    for storage in ("dequantized", "packed"):
        layer = QuantLinear(lin, "wide.a", DequantCache(64, storage=storage))
        layer.set_config(GGUFOption("Q4_K"))
        y = layer(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        outs.append((y.detach(), g))
        if storage == "packed":
            assert layer.current_nbytes() == 8 * 144  # one Q4_K block per 256-weight row
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    want = torch.nn.functional.linear(x, fake_quantize_gguf(weights["wide.a"], "Q4_K"), lin.bias)
    assert torch.equal(outs[0][0], want.detach())
    narrow = QuantLinear(torch.nn.Linear(64, 4), "narrow")
    with pytest.raises(CoaloraError, match="Q6_K needs rows that hold whole blocks; .* 64 inputs"):
        narrow.set_config(GGUFOption("Q6_K"))


def test_search_decoding_repairs_to_the_nearest_allowed_type(weights):
    names = list(weights)
    numels = {n: w.numel() for n, w in weights.items()}
    in_features = {n: w.shape[1] for n, w in weights.items()}
    enc = Encoder.create(names, numels, SPACE, in_features=in_features)
    assert enc.dim == 4 and enc.bounds()[1].tolist() == [5] * 4
    q6k = SPACE.position(GGUFOption("Q6_K"))
    config = enc.decode([q6k] * 4)
    assert [config[n].type for n in names] == ["Q6_K", "Q6_K", "Q5_0", "Q5_0"]  # 6.56 → 5.5
    q3k = SPACE.position(GGUFOption("Q3_K"))
    assert enc.decode([q3k] * 4)["narrow.a"].type == "Q4_0"  # 3.44 → 4.5
    assert nearest_allowed(GGUFOption("Q4_K"), SPACE, 64) == GGUFOption("Q4_0")  # tie → heavier
    assert enc.encode(config).tolist() == [q6k, q6k, 3, 3]


def test_configset_round_trip(tmp_path, weights):
    numels = {n: w.numel() for n, w in weights.items()}
    configs = [
        ModelQuantConfig({n: GGUFOption(t) for n in numels}, numels) for t in ("Q4_0", "Q8_0")
    ]
    cs = ConfigSet.from_model_configs(configs, space=SPACE)
    assert cs.space == {"gguf": list(SPACE.gguf)} and cs.entries[0].options[0] == ["Q4_0"]
    back = ConfigSet.load(cs.save(tmp_path / "configset.json"), space=SPACE)
    assert back.to_model_configs() == configs
    with pytest.raises(ConfigError, match=r"space has fields \['gguf'\] but the model's space"):
        ConfigSet.load(tmp_path / "configset.json", space=QuantSpace())
