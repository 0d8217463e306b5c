"""``coalora.deploy.load`` on damaged or hostile exports (docs/packed.md, "What load checks"):
manifest paths, the manifest's own digest, numbers, the architecture allowlist, schema damage,
and the spellings of a budget. Each case is one ``CoaloraError`` line naming the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from deploy.packed_helpers import copy_export, edit_manifest, lora_model, relist

from coalora import deploy
from coalora.deploy.format import pick_label
from coalora.errors import CoaloraError

IDS = torch.tensor([[2, 7, 11, 40, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# --- 1. manifest paths -------------------------------------------------------------------


def _outside(tmp_path: Path, src: Path, name: str) -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    target = out / name
    target.write_bytes(src.read_bytes())
    return target


def test_an_absolute_config_path_is_refused(export, tmp_path):
    bad = copy_export(export, tmp_path / "abs")
    evil = _outside(tmp_path, bad / "configs" / "3.0.json", "evil.json")

    def change(m):
        m["configurations"]["2.5"]["config"] = str(evil)
        relist(Path("/"), m, str(evil))

    edit_manifest(bad, change)
    with pytest.raises(CoaloraError, match=r"configurations\['2.5'\]\.config='/.*' is absolute"):
        deploy.load(bad, budget="2.5")


def test_a_parent_directory_path_is_refused_even_without_verify(export, tmp_path):
    bad = copy_export(export, tmp_path / "dotdot")
    _outside(tmp_path, bad / "adapters" / "3.0.safetensors", "a.safetensors")
    rel = "../outside/a.safetensors"

    def change(m):
        m["configurations"]["2.5"]["adapter"] = rel
        relist(bad, m, rel)

    edit_manifest(bad, change)
    for verify in (True, False):
        with pytest.raises(
            CoaloraError, match=r"configurations\['2.5'\]\.adapter='\.\./outside/a\.safetensors'"
        ):
            deploy.load(bad, budget="2.5", verify=verify)


def test_a_symlink_out_of_the_export_is_refused(export, tmp_path):
    bad = copy_export(export, tmp_path / "link")
    link = bad / "adapters" / "2.5.safetensors"
    target = _outside(tmp_path, link, "same.safetensors")  # same bytes: the sha256 matches
    link.unlink()
    os.symlink(target, link)
    needle = r"\.adapter='adapters/2.5.safetensors' resolves outside the export \(to .*outside"
    with pytest.raises(CoaloraError, match=needle):
        deploy.load(bad, budget="2.5")
    with pytest.raises(CoaloraError, match=needle):
        deploy.load(bad, budget="3.0", verify=False)  # another configuration: still refused


def test_a_path_not_listed_in_files_is_refused(export, tmp_path):
    bad = copy_export(export, tmp_path / "unlisted")
    (bad / "configs" / "extra.json").write_text((bad / "configs" / "3.0.json").read_text())
    edit_manifest(bad, lambda m: m["configurations"]["2.5"].update(config="configs/extra.json"))
    with pytest.raises(
        CoaloraError, match=r"configurations\['2.5'\]\.config='configs/extra.json' is not listed"
    ):
        deploy.load(bad, budget="2.5")


def test_an_absolute_files_entry_is_never_opened(export, tmp_path):
    bad = copy_export(export, tmp_path / "files_abs")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the export")
    edit_manifest(bad, lambda m: relist(Path("/"), m, str(secret)))
    with pytest.raises(CoaloraError, match=r"files\['/.*secret.txt'\] is absolute"):
        deploy.load(bad, budget="2.5")


# --- 2. the manifest's own digest and its numbers -----------------------------------------


def test_an_edited_manifest_fails_verification(export, tmp_path):
    bad = copy_export(export, tmp_path / "scaling")
    path = bad / "manifest.json"
    text = path.read_text()
    assert '"scaling": 2.0' in text
    path.write_text(text.replace('"scaling": 2.0', '"scaling": 3.0', 1))
    with pytest.raises(CoaloraError, match=r"manifest.json: content differs from its digest"):
        deploy.load(bad, budget="2.5")
    unsigned = copy_export(export, tmp_path / "unsigned")
    m = json.loads((unsigned / "manifest.json").read_text())
    m.pop("manifest_sha256", None)
    (unsigned / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CoaloraError, match=r"manifest.json: no manifest_sha256"):
        deploy.load(unsigned, budget="2.5")


def _set(*keys_value):
    *keys, value = keys_value

    def change(m):
        node = m
        for k in keys[:-1]:
            node = node[k] if not callable(k) else k(node)
        node[keys[-1]] = value

    return change


def _first(d):
    return next(iter(d))


def _shape_of_first_target(value):
    return lambda m: m["targets"].update({_first(m["targets"]): value})


def _shape_of_first_entry(value):
    return lambda m: m["entries"][_first(m["entries"])].update(shape=value)


BAD_NUMBERS = {
    "scaling NaN": (_set("configurations", "2.5", "scaling", float("nan")), r"\.scaling=nan"),
    "scaling inf": (_set("configurations", "2.5", "scaling", float("inf")), r"\.scaling=inf"),
    "scaling negative": (_set("configurations", "2.5", "scaling", -2.0), r"\.scaling=-2\.0"),
    "scaling zero": (_set("configurations", "2.5", "scaling", 0.0), r"\.scaling=0\.0"),
    "scaling text": (_set("configurations", "2.5", "scaling", "2.0"), r"\.scaling='2\.0'"),
    "average_bits NaN": (
        _set("configurations", "2.5", "average_bits", float("nan")),
        r"\.average_bits=nan",
    ),
    "target shape zero": (_shape_of_first_target([0, 32]), r"targets\['.*'\]=\[0, 32\]"),
    "target shape negative": (_shape_of_first_target([-32, 32]), r"targets\['.*'\]=\[-32, 32\]"),
    "entry shape float": (_shape_of_first_entry([32.5, 32]), r"entries\['.*'\]\.shape"),
    "file size negative": (
        lambda m: m["files"]["base.safetensors"].update(bytes=-1),
        r"files\['base.safetensors'\]\.bytes=-1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_non_finite_or_non_positive_numbers_are_refused(export, tmp_path, case):
    change, needle = BAD_NUMBERS[case]
    bad = copy_export(export, tmp_path / "numbers")
    edit_manifest(bad, change)
    with pytest.raises(CoaloraError, match=needle):
        deploy.load(bad, budget="2.5")


def test_a_bad_option_in_a_configuration_file_names_the_file(export, tmp_path):
    bad = copy_export(export, tmp_path / "bits")
    rel = "configs/2.5.json"
    config = json.loads((bad / rel).read_text())
    config["layers"][_first(config["layers"])]["bits"] = -3
    (bad / rel).write_text(json.dumps(config))
    edit_manifest(bad, lambda m: relist(bad, m, rel))
    with pytest.raises(CoaloraError, match=r"configs/2.5.json: .*bits=-3 is not allowed"):
        deploy.load(bad, budget="2.5")


# --- 3. the architecture allowlist --------------------------------------------------------


@pytest.mark.parametrize(
    "arch", ["pipeline", "Trainer", "AutoModel", "PreTrainedModel", "BertConfig", "os"]
)
def test_architecture_must_be_a_transformers_model_class(export, tmp_path, arch):
    bad = copy_export(export, tmp_path / "arch")
    edit_manifest(bad, lambda m: m.update(architecture=arch))
    with pytest.raises(
        CoaloraError, match=rf"architecture='{arch}' is not allowed: .*PreTrainedModel"
    ):
        deploy.load(bad, budget="2.5")


# --- 4. schema damage ---------------------------------------------------------------------


def _drop(*keys):
    def change(m):
        node = m
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return change


def _transpose_non_square_entry(m):
    key = next(k for k, e in m["entries"].items() if e["shape"][0] != e["shape"][1])
    m["entries"][key]["shape"] = m["entries"][key]["shape"][::-1]


def _unknown_target_entry(m):
    key = _first(m["entries"])
    m["entries"]["no.such.layer::" + key.split("::", 1)[1]] = m["entries"][key]


SCHEMA = {
    "files missing": (_drop("files"), r"manifest.json: key 'files' is missing"),
    "files a list": (_set("files", []), r"key 'files' must be an object"),
    "files empty": (_set("files", {}), r"files does not list 'packed.safetensors'"),
    "targets missing": (_drop("targets"), r"key 'targets' is missing"),
    "entries missing": (_drop("entries"), r"key 'entries' is missing"),
    "configurations empty": (_set("configurations", {}), r"key 'configurations' is empty"),
    "configuration without config": (
        _drop("configurations", "2.5", "config"),
        r"configurations\['2.5'\]\.config is missing",
    ),
    "tied not a name": (_set("tied", {"a.weight": 3}), r"tied\['a.weight'\]=3"),
    "entry transposed": (_transpose_non_square_entry, r"entries\['.*'\]\.shape=\[.*\] but targets"),
    "entry for no target": (_unknown_target_entry, r"entries\['no.such.layer::.*'\] names no"),
    "entry option differs from key": (
        lambda m: m["entries"][_first(m["entries"])].update(option="b9"),
        r"entries\['.*'\]\.option='b9'",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA))
def test_schema_damage_is_one_line_naming_the_key(export, tmp_path, case):
    change, needle = SCHEMA[case]
    bad = copy_export(export, tmp_path / "schema")
    edit_manifest(bad, change)
    with pytest.raises(CoaloraError, match=needle) as e:
        deploy.load(bad, budget="2.5")
    assert "\n" not in str(e.value)


def test_a_configuration_missing_a_layer_names_the_layer(export, tmp_path):
    bad = copy_export(export, tmp_path / "layer")
    rel = "configs/2.5.json"
    config = json.loads((bad / rel).read_text())
    dropped = _first(config["layers"])
    del config["layers"][dropped]
    (bad / rel).write_text(json.dumps(config))
    edit_manifest(bad, lambda m: relist(bad, m, rel))
    with pytest.raises(CoaloraError, match=rf"configs/2.5.json: .*missing layers \['{dropped}'\]"):
        deploy.load(bad, budget="2.5")


def test_a_manifest_that_is_not_an_object_is_refused(export, tmp_path):
    bad = copy_export(export, tmp_path / "list")
    (bad / "manifest.json").write_text("[]")
    with pytest.raises(CoaloraError, match=r"manifest.json: must be a JSON object, got list"):
        deploy.load(bad)


# --- 12. budget spellings -----------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_labels(tmp_path_factory):
    model, names, configs, adapters, scaling = lora_model(labels=("3", "2.5"))
    out = tmp_path_factory.mktemp("labels") / "packed"
    deploy.save_packed(model, names, configs, adapters, out, scaling=scaling)
    return out


@pytest.mark.parametrize("budget", [3, 3.0, "3", "3.0", "3.00", " 3.0 "])
def test_every_spelling_of_an_exported_budget_is_accepted(whole_labels, budget):
    model = deploy.load(whole_labels, budget=budget)
    assert model.coalora_export["label"] == "3"


def test_budget_spellings_match_the_label_not_its_spelling(export):
    manifest = deploy.read_manifest(export, verify=False)
    for budget in (3, "3", "3.000", 3.0):
        assert pick_label(manifest, budget, export) == "3.0"
    assert pick_label(manifest, "2.50", export) == "2.5"
    for budget in (3.3, "3.3", "abc", True, float("nan")):
        with pytest.raises(
            CoaloraError, match=r"is not in this export; available: \['2.5', '3.0'\]"
        ):
            pick_label(manifest, budget, export)
