"""Bad data files fail with one line naming the file (and line); eval limits are honoured."""

from __future__ import annotations

import shutil

import pytest

from coalora.data import GlueDataModule
from coalora.data.glue_tsv import TsvFormatError, read_glue_columns
from coalora.errors import CoaloraError


def copy_sst2(glue_dir, tmp_path):
    dst = tmp_path / "glue" / "SST-2"
    shutil.copytree(glue_dir / "SST-2", dst)
    return dst


def make_dm(task_cfg, tokenizer, data_dir, **kwargs):
    return GlueDataModule(
        task_cfg("sst2"), tokenizer, str(data_dir), batch_size=8, allow_hub=False, **kwargs
    )


@pytest.mark.parametrize("split_file", ["train.tsv", "dev.tsv"])
def test_header_only_file_is_one_line(tmp_path, task_cfg, word_tokenizer, glue_dir, split_file):
    folder = copy_sst2(glue_dir, tmp_path)
    (folder / split_file).write_text("sentence\tlabel\n", encoding="utf-8")
    dm = make_dm(task_cfg, word_tokenizer, tmp_path)
    with pytest.raises(CoaloraError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert str(folder / split_file) in msg and "no data rows" in msg and "\n" not in msg


def test_non_utf8_bytes_name_file_and_line(tmp_path, task_cfg):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\nfine row \t1\ncaf\xe9 latin-1 \t0\n")
    with pytest.raises(TsvFormatError) as e:
        read_glue_columns(path, task_cfg("sst2"))
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: byte 4 of the line (0xe9) is not UTF-8") and "\n" not in msg


def test_bom_and_crlf_still_read(tmp_path, task_cfg):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\r\nok \xe2\x80\xa8 sep \t1\r\n")
    data = read_glue_columns(path, task_cfg("sst2"))
    assert data["sentence"] == ["ok \u2028 sep "] and data["label"] == [1]


def test_max_eval_samples_option_before_and_after_setup(task_cfg, word_tokenizer, glue_dir):
    full = make_dm(task_cfg, word_tokenizer, glue_dir.parent)
    full.setup("validate")
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent, max_eval_samples=5)
    dm.setup("validate")
    assert len(dm.val_set) == 5
    assert dm.val_set.labels.tolist() == full.val_set.labels[:5].tolist()
    full.limit_eval_samples(3)  # after setup: the first 3 rows, exactly as if built with 3
    built3 = make_dm(task_cfg, word_tokenizer, glue_dir.parent, max_eval_samples=3)
    built3.setup("validate")
    assert len(full.val_set) == 3
    assert full.val_set.input_ids.tolist() == built3.val_set.input_ids.tolist()
    assert full.val_set.offsets.tolist() == built3.val_set.offsets.tolist()
    assert sum(len(b["labels"]) for b in full.val_dataloader()) == 3
    with pytest.raises(ValueError, match="max_eval_samples=0 must be an integer >= 1"):
        make_dm(task_cfg, word_tokenizer, glue_dir.parent, max_eval_samples=0)
