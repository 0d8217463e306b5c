"""coalora.report.bench results-file helpers: tensor data bytes of a safetensors file, per-part
provenance kept across runs, and a table section's head."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from coalora.report.bench import (
    part_provenance,
    read_part_results,
    safetensors_data_bytes,
    stamp_parts,
    table_section,
)


def test_safetensors_data_bytes_counts_tensor_data_only(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7, dtype=torch.uint8)}, str(path))
    assert safetensors_data_bytes(path) == 3 * 5 * 4 + 7
    assert path.stat().st_size > 67  # the JSON header is not counted


def test_parts_keep_their_own_provenance(tmp_path):
    path = tmp_path / "r.json"
    assert read_part_results(path) == {}
    results = {"bytes": [1]}
    stamp_parts(results, ["bytes"], "python a.py")
    path.write_text(json.dumps({"results": results}))
    again = read_part_results(path)
    again["switch"] = [2]
    stamp_parts(again, ["switch"], "python a.py --parts switch")
    assert again["meta"]["bytes"]["command"] == "python a.py"
    assert part_provenance(again, "switch")[0].endswith("`python a.py --parts switch`")
    assert part_provenance(again, "deploy") == []


def test_table_section_head():
    lines = table_section({}, "bytes", "Title", "a | b | c")
    assert lines == ["### Title", "", "| a | b | c |", "|---|---|---|"]
