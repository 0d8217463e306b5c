"""The GLUE TSV reader: tab-only splitting, BOM, header-less CoLA, label mapping, clear errors."""

from __future__ import annotations

import csv

import pytest

from coalora.data.glue_tsv import (
    LABEL,
    TsvFormatError,
    find_task_files,
    read_glue_columns,
    read_glue_tsv,
    read_tsv,
)


def test_bare_quotes_stay_in_one_row(tmp_path, task_cfg):
    path = tmp_path / "train.tsv"
    path.write_text(
        'sentence\tlabel\n" wow , he said . \t1\na plain one \t0\n" the end \t1\n', encoding="utf-8"
    )
    # A CSV reader with default quoting merges the rows between the two quotes ...
    with open(path, newline="") as f:
        assert len(list(csv.reader(f, delimiter="\t"))) < 4
    # ... splitting on tabs keeps them apart and the quotes verbatim.
    data = read_glue_columns(path, task_cfg("sst2"))
    assert data["sentence"] == ['" wow , he said . ', "a plain one ", '" the end ']
    assert data[LABEL] == [1, 0, 1]


@pytest.mark.parametrize("task_name, split, rows", [("mrpc", "train", 10), ("rte", "dev", 6)])
def test_fixture_rows_with_quotes(task_name, split, rows, task_cfg, glue_dir):
    task = task_cfg(task_name)
    path = glue_dir / task.glue_dir / f"{split}.tsv"
    data = read_glue_columns(path, task)
    assert len(data[LABEL]) == rows
    assert any('"' in s for field in task.text_fields for s in data[field])


def test_mrpc_bom_is_stripped(task_cfg, glue_dir):
    path = glue_dir / "MRPC" / "dev.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    names, rows = read_tsv(path)
    assert names[0] == "Quality"
    assert names == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    ds = read_glue_tsv(path, task_cfg("mrpc"))
    assert set(ds.column_names) == {"#1 String", "#2 String", LABEL}
    assert set(ds[LABEL]) <= {0, 1} and len(ds) == len(rows) == 6


def test_cola_has_no_header(task_cfg, glue_dir):
    task = task_cfg("cola")
    data = read_glue_columns(glue_dir / "CoLA" / "dev.tsv", task)
    assert len(data[LABEL]) == 8  # every line is a row, the first one included
    assert data["sentence"][0] == "The sailors rode the breeze clear of the rocks."
    assert 0 in data[LABEL] and 1 in data[LABEL]


def test_string_labels_map_through_label_names(task_cfg, glue_dir):
    task = task_cfg("rte")
    path = glue_dir / "RTE" / "dev.tsv"
    _, rows = read_tsv(path)
    data = read_glue_columns(path, task)
    expected = [task.label_names.index(r[-1]) for r in rows]
    assert data[LABEL] == expected and set(expected) == {0, 1}


def test_regression_labels_are_floats(task_cfg, glue_dir):
    task = task_cfg("stsb")
    data = read_glue_columns(glue_dir / "STS-B" / "train.tsv", task)
    assert all(isinstance(v, float) for v in data[LABEL])
    assert all(0.0 <= v <= 5.0 for v in data[LABEL])
    assert data[LABEL][0] == pytest.approx(5.0)
    assert read_glue_tsv(glue_dir / "STS-B" / "train.tsv", task).features[LABEL].dtype in (
        "float64",
        "float32",
    )


def test_empty_lines_and_crlf_are_tolerated(tmp_path, task_cfg):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"sentence\tlabel\r\na good film \t1\r\n\r\nbad \t0\n\n\n")
    data = read_glue_columns(path, task_cfg("sst2"))
    assert data == {"sentence": ["a good film ", "bad "], LABEL: [1, 0]}


def test_malformed_row_names_file_and_line(tmp_path, task_cfg):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nfine \t1\nbroken row without a label\nok \t0\n")
    with pytest.raises(TsvFormatError) as err:
        read_glue_columns(path, task_cfg("sst2"))
    msg = str(err.value)
    assert f"{path}:3" in msg and "expected 2" in msg and "found 1" in msg
    assert "\n" not in msg
    data = read_glue_columns(path, task_cfg("sst2", skip_malformed=True))
    assert data[LABEL] == [1, 0]


def test_bad_labels_name_file_and_line(tmp_path, task_cfg):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(TsvFormatError, match=r"dev\.tsv:3: label 'maybe' is not one of"):
        read_glue_columns(path, task_cfg("rte"))
    path.write_text("sentence\tlabel\nx \t2\n")
    with pytest.raises(TsvFormatError, match=r"dev\.tsv:2: label 2 is outside \[0, 2\)"):
        read_glue_columns(path, task_cfg("sst2"))


def test_missing_column_is_named(tmp_path, task_cfg):
    path = tmp_path / "dev.tsv"
    path.write_text("text\tlabel\nx \t1\n")
    with pytest.raises(TsvFormatError, match=r"columns \['sentence'\] not found"):
        read_glue_columns(path, task_cfg("sst2"))


def test_find_task_files(tmp_path, task_cfg, glue_dir):
    task = task_cfg("sst2")
    files = find_task_files(glue_dir.parent, task)
    assert files == {
        "train": glue_dir / "SST-2" / "train.tsv",
        "validation": glue_dir / "SST-2" / "dev.tsv",
    }
    # data_dir may also point at the glue folder itself
    assert find_task_files(glue_dir, task) == files
    assert find_task_files(tmp_path, task) is None
    assert find_task_files(None, task) is None
    mnli = find_task_files(glue_dir.parent, task_cfg("mnli"), ("validation",))
    assert mnli == {"validation": glue_dir / "MNLI" / "dev_matched.tsv"}
