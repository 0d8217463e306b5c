"""GlueDataModule end to end on the fixture files with an offline word-level tokenizer."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from coalora.data import GlueDataModule
from coalora.data.batching import LengthGroupedSampler
from coalora.errors import DataError


def make_dm(task_cfg, tokenizer, data_dir, name="sst2", overrides=None, **kwargs):
    task = task_cfg(name, **(overrides or {}))
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("eval_batch_size", 16)
    return GlueDataModule(task, tokenizer, str(data_dir), allow_hub=False, **kwargs)


def tiny_bert(tokenizer, num_labels):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def test_sst2_batches_feed_a_model(task_cfg, word_tokenizer, glue_dir):
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.source.startswith("local:") and dm.num_labels == 2 and dm.task.name == "sst2"
    assert len(dm.train_set) == 64 and len(dm.val_set) == 32
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    batch = batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    # dynamic padding: the longest row of the batch has no padding, nothing exceeds max_length
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1] <= dm.task.max_length
    assert (batch["input_ids"][batch["attention_mask"] == 0] == word_tokenizer.pad_token_id).all()
    assert (batch["input_ids"][:, 0] == word_tokenizer.cls_token_id).all()
    out = tiny_bert(word_tokenizer, dm.num_labels)(**batch)
    assert out.logits.shape == (8, 2) and torch.isfinite(out.loss)
    val = list(dm.val_dataloader())
    assert [len(b["labels"]) for b in val] == [16, 16]


def test_val_loader_is_length_sorted_and_train_loader_is_seeded(task_cfg, word_tokenizer, glue_dir):
    def first_labels(seed, epoch=0):
        dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return torch.cat([b["input_ids"][:, 1] for b in loader]).tolist(), dm

    a, dm = first_labels(0)
    b, _ = first_labels(0)
    c, _ = first_labels(1)
    d, _ = first_labels(0, epoch=1)
    assert a == b and a != c and a != d
    # evaluation visits every example once, longest first (stable), and pads little
    loader = dm.val_dataloader()
    order = list(loader.sampler)
    lengths = list(dm.val_set.lengths)
    assert sorted(order) == list(range(len(dm.val_set)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    val_labels = torch.cat([b["labels"] for b in loader]).tolist()
    assert val_labels == [int(dm.val_set.labels[i]) for i in order]


def test_pair_task_and_regression_labels(task_cfg, word_tokenizer, glue_dir):
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent, name="stsb", batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4,)
    assert (batch["token_type_ids"] == 1).any()  # second sentence present
    out = tiny_bert(word_tokenizer, 1)(**batch)
    assert out.logits.shape == (4, 1) and torch.isfinite(out.loss)


def test_truncation_to_max_length(task_cfg, word_tokenizer, glue_dir):
    dm = make_dm(
        task_cfg, word_tokenizer, glue_dir.parent, name="rte", overrides={"max_length": 16}
    )
    dm.setup()
    assert int(dm.train_set.lengths.max()) == 16
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] == 16


def test_sample_limits(task_cfg, word_tokenizer, glue_dir):
    limits = {"max_train_samples": 10, "max_eval_samples": 5}
    full = make_dm(task_cfg, word_tokenizer, glue_dir.parent)
    full.setup()
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent, overrides=limits)
    dm.setup()
    assert len(dm.train_set) == 10 and len(dm.val_set) == 5
    assert dm.val_set.labels.tolist() == full.val_set.labels[:5].tolist()  # eval: first N
    again = make_dm(task_cfg, word_tokenizer, glue_dir.parent, overrides=limits)
    again.setup()
    other = make_dm(task_cfg, word_tokenizer, glue_dir.parent, overrides=limits, seed=3)
    other.setup()
    assert (again.train_set.input_ids == dm.train_set.input_ids).all()  # seeded subset
    assert other.train_set.input_ids.tolist() != dm.train_set.input_ids.tolist()


def test_group_by_length(task_cfg, word_tokenizer, glue_dir):
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent, group_by_length=True, batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    order = list(loader.sampler)
    assert sorted(order) == list(range(64))
    grouped = LengthGroupedSampler(dm.train_set.lengths, batch_size=4, mega_batch_mult=2, seed=0)
    lengths = dm.train_set.lengths
    chunks = [list(grouped)[i : i + 8] for i in range(0, 64, 8)]
    assert all(
        [lengths[i] for i in c] == sorted((lengths[i] for i in c), reverse=True) for c in chunks
    )
    padded = sum(b["input_ids"].numel() for b in loader)
    plain = make_dm(task_cfg, word_tokenizer, glue_dir.parent, batch_size=4)
    plain.setup()
    assert padded <= sum(b["input_ids"].numel() for b in plain.train_dataloader())


def test_calibration_batches_are_fixed(task_cfg, word_tokenizer, glue_dir):
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent)
    a = dm.calibration_batches(3, seed=1)  # sets itself up
    b = dm.calibration_batches(3, seed=1)
    c = dm.calibration_batches(3, seed=2)
    assert len(a) == 3 and all(len(x["labels"]) == 8 for x in a)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert [x["input_ids"].tolist() for x in a] != [x["input_ids"].tolist() for x in c]
    many = dm.calibration_batches(10, seed=0, batch_size=16)  # 160 > 64 rows: cycles
    assert len(many) == 10 and all(len(x["labels"]) == 16 for x in many)


def test_validate_stage_needs_only_the_dev_file(task_cfg, word_tokenizer, tmp_path, glue_dir):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_bytes((glue_dir / "SST-2" / "dev.tsv").read_bytes())
    dm = make_dm(task_cfg, word_tokenizer, tmp_path)
    dm.setup("validate")
    assert len(dm.val_set) == 32
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert str(folder / "train.tsv") in str(err.value)


def test_missing_data_is_one_clear_line(task_cfg, word_tokenizer, tmp_path):
    dm = make_dm(task_cfg, word_tokenizer, tmp_path, name="qnli")
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert isinstance(err.value, DataError) and "\n" not in msg
    assert "paths.data_dir" in msg and str(tmp_path / "glue" / "QNLI" / "train.tsv") in msg
    assert "allow_hub=false" in msg


def test_missing_data_with_failing_hub_names_the_hub_id(task_cfg, word_tokenizer, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\nlong details ...")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    task = task_cfg("rte")
    dm = GlueDataModule(task, word_tokenizer, None, allow_hub=True)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "\n" not in msg and "paths.data_dir=None" in msg
    assert "'nyu-mll/glue' (config 'rte')" in msg and "ConnectionError" in msg
    assert "glue/RTE/train.tsv" in msg and err.value.__suppress_context__


def test_hub_fallback_maps_columns(task_cfg, word_tokenizer, monkeypatch):
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        rows = {
            "sentence1": ["a man is here .", "b"],
            "sentence2": ['" a man', "c"],
            "label": [1, 0],
        }
        return {"train": FakeSplit(rows), "validation": FakeSplit(rows)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = GlueDataModule(task_cfg("mrpc"), word_tokenizer, None, batch_size=2)
    raw = dm.load_raw()
    assert calls == [("nyu-mll/glue", "mrpc")] and dm.source == "hub:nyu-mll/glue/mrpc"
    assert raw["train"] == {
        "#1 String": ["a man is here .", "b"],
        "#2 String": ['" a man', "c"],
        "label": [1, 0],
    }
    dm.setup()
    assert next(iter(dm.val_dataloader()))["labels"].tolist() == [1, 0]


class FakeSplit(dict):
    """Column access like ``datasets.Dataset``: ``split[column] -> list``."""


def test_sampler_state_resumes_mid_epoch(task_cfg, word_tokenizer, glue_dir):
    """A loader built with a resume position yields the rest of that epoch's batches."""
    ref = make_dm(task_cfg, word_tokenizer, glue_dir.parent, group_by_length=True)
    ref.setup()
    loader = ref.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = [b["input_ids"].tolist() for b in loader]
    dm = make_dm(task_cfg, word_tokenizer, glue_dir.parent, group_by_length=True)
    dm.setup()
    dm.resume_position = (1, 3)
    resumed = dm.train_dataloader()
    assert [b["input_ids"].tolist() for b in resumed] == epoch1[3:]
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == len(epoch1)  # the next epoch is whole again
    dm.resume_position = (1, len(epoch1))  # a checkpoint at the end of epoch 1
    assert dm.train_dataloader().sampler.state_dict()["epoch"] == 2
    with pytest.raises(ValueError, match="seed=0, this run has 5"):
        other = make_dm(task_cfg, word_tokenizer, glue_dir.parent, seed=5, group_by_length=True)
        other.setup()
        other.train_dataloader().sampler.load_state_dict(loader.sampler.state_dict())
