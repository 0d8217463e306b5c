"""configset.json: save/load round-trip and strict validation with messages that name the problem."""

from __future__ import annotations

import json
import sys

import pytest

from coalora.errors import ConfigError
from coalora.quant.config import QuantSpace
from coalora.search.configset import ConfigSet, make_provenance


@pytest.fixture()
def saved(tmp_path, layout, space):
    configs = layout.random_configs(space, 5)
    cs = ConfigSet.from_model_configs(
        configs,
        space=space,
        objectives=[{"bits": c.average_bits(), "loss": float(i)} for i, c in enumerate(configs)],
        pareto=[i % 2 == 0 for i in range(5)],
        sources=["allocation@3.0", "random", "search/iter1", "search/iter1", "search/iter2"],
        provenance=make_provenance(seed=0, model="tiny", task="sst2"),
    )
    path = cs.save(tmp_path / "configset.json")
    return path, configs


def _rewrite(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_round_trip(saved, layout, space):
    path, configs = saved
    cs = ConfigSet.load(path, expected_names=layout.names, space=space)
    assert cs.schema_version == 1 and len(cs) == 5
    assert cs.to_model_configs() == configs
    assert [e.source for e in cs.entries][0] == "allocation@3.0"
    assert cs.entries[0].avg_bits == pytest.approx(configs[0].average_bits())
    assert [e.pareto for e in cs.entries] == [True, False, True, False, True]
    assert set(cs.provenance) >= {"git_sha", "seed", "model", "task", "created", "command"}
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_expected_names_reorder_entries(saved, layout):
    path, configs = saved
    cs = ConfigSet.load(path, expected_names=list(reversed(layout.names)))
    assert cs.layer_names == list(reversed(layout.names))
    assert [dict(c) for c in cs.to_model_configs()] == [dict(c) for c in configs]


def test_dict_options_accepted(saved, layout):
    path, configs = saved

    def to_dict(d):
        e = d["entries"][0]
        e["options"] = {
            n: dict(zip(d["space"], row)) for n, row in zip(d["layer_names"], e["options"])
        }

    _rewrite(path, to_dict)
    assert ConfigSet.load(path).to_model_configs()[0] == configs[0]


def test_wrong_layer_names(saved, layout):
    path, _ = saved
    expected = [*layout.names[1:], "classifier.dense"]
    with pytest.raises(ConfigError) as e:
        ConfigSet.load(path, expected_names=expected)
    msg = str(e.value)
    assert "layer names do not match" in msg
    assert "classifier.dense" in msg and layout.names[0] in msg  # missing and unknown both named


def test_unknown_option(saved, layout):
    path, _ = saved

    def bad(d):
        d["entries"][2]["options"][1][0] = 5

    _rewrite(path, bad)
    with pytest.raises(ConfigError) as e:
        ConfigSet.load(path)
    msg = str(e.value)
    assert "'c0002'" in msg and layout.names[1] in msg and "'bits'" in msg
    assert "value 5" in msg and "[2, 3, 4, 8]" in msg


def test_option_outside_given_space(saved):
    path, _ = saved
    with pytest.raises(ConfigError, match=r"space field 'bits' has values \[8\] outside"):
        ConfigSet.load(path, space=QuantSpace(bits=[2, 3, 4]))


@pytest.mark.parametrize("version", [2, "1", None])
def test_bad_schema_version(saved, version):
    path, _ = saved
    _rewrite(path, lambda d: d.update(schema_version=version))
    with pytest.raises(
        ConfigError, match=r"schema_version .* is not supported \(supported versions: \[1\]\)"
    ):
        ConfigSet.load(path)


def test_missing_schema_version_and_keys(saved):
    path, _ = saved
    _rewrite(path, lambda d: d.pop("schema_version"))
    with pytest.raises(ConfigError, match="missing key 'schema_version'"):
        ConfigSet.load(path)
    _rewrite(path, lambda d: (d.update(schema_version=1), d.pop("numels")))
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['numels'\]"):
        ConfigSet.load(path)
    _rewrite(path, lambda d: (d.update(numels={}), d["entries"][0].pop("avg_bits")))
    with pytest.raises(ConfigError, match="numels"):  # numels now present but empty
        ConfigSet.load(path)


def test_entry_missing_key(saved, layout):
    path, _ = saved
    _rewrite(path, lambda d: d["entries"][1].pop("avg_bits"))
    with pytest.raises(ConfigError, match=r"entry 'c0001' is missing key\(s\) \['avg_bits'\]"):
        ConfigSet.load(path)


def test_malformed_json(saved):
    path, _ = saved
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ConfigError, match=r"not valid JSON \(line \d+, column \d+"):
        ConfigSet.load(path)


def test_avg_bits_inconsistent(saved):
    path, _ = saved
    _rewrite(path, lambda d: d["entries"][3].update(avg_bits=3.0))
    with pytest.raises(ConfigError, match=r"entry 'c0003': avg_bits 3.0 does not match .*computed"):
        ConfigSet.load(path)


def test_no_botorch_import():
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "import sys, coalora.search.configset, coalora.search; print('botorch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root
    )
    assert out.stdout.strip() == "False"
