"""WikiText-2 / C4 token-block data: packing, budgets, seeded order, hub fallback, errors."""

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coalora.data.lm import (
    LMDataModule,
    evenly_spaced,
    pack_documents,
    pack_ids,
    tokenize_text,
    validate_lm_task,
)
from coalora.errors import ConfigError, DataError
from coalora.models import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the of and a in to was is for on as with by he at from his an were are".split()


def task(name="wikitext2", **kw):
    t = OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml")
    for k, v in kw.items():
        t[k] = v
    return t


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml"))


def wiki_text(n_lines: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = [" = Heading = \n", " \n"]
    for _ in range(n_lines):
        idx = torch.randint(0, len(WORDS), (12,), generator=g).tolist()
        lines.append(" " + " ".join(WORDS[i] for i in idx) + " . \n")
    return "".join(lines)


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    (d / "wiki.valid.raw").write_text(wiki_text(200, 0), encoding="utf-8")
    (d / "wiki.test.raw").write_text(wiki_text(120, 1), encoding="utf-8")
    return tmp_path


def test_blocks_are_contiguous_slices_of_the_tokenized_text(tok, data_dir):
    dm = LMDataModule(task(block_length=16, eval_blocks=None), tok, str(data_dir))
    dm.setup("validate")
    ids = tokenize_text(tok, (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text())
    blocks = dm.val_set.blocks
    assert blocks.shape == (len(ids) // 16, 16)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]
    assert dm.sources["test"].startswith("local:")


def test_pack_ids_drops_the_partial_block():
    assert pack_ids(list(range(10)), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_ids([1, 2], 4).shape == (0, 4)


def test_budgets_seeded_order_and_batch_contract(tok, data_dir):
    t = task(block_length=16, max_train_blocks=20, eval_blocks=5)
    dm = LMDataModule(t, tok, str(data_dir), batch_size=4, eval_batch_size=3, seed=7)
    dm.setup("fit")
    assert dm.budget() == {
        "block_length": 16,
        "train_split": "valid",
        "eval_split": "test",
        "train_blocks": 20,
        "train_tokens": 320,
        "eval_blocks": 5,
        "eval_predicted_tokens": 75,
    }
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert bool((batch["attention_mask"] == 1).all())
    assert [b["input_ids"].shape[0] for b in dm.val_dataloader()] == [3, 2]

    # evaluation blocks: evenly spread over the whole split, independent of the seed
    full = LMDataModule(task(block_length=16, eval_blocks=None), tok, str(data_dir))
    full.setup("validate")
    spread = evenly_spaced(len(full.val_set), 5)
    assert spread[0] == 0 and spread[-1] == len(full.val_set) - 1
    assert torch.equal(dm.val_set.blocks, full.val_set.blocks[spread])
    other = LMDataModule(t, tok, str(data_dir), batch_size=4, seed=8)
    other.setup("fit")
    assert torch.equal(other.val_set.blocks, dm.val_set.blocks)
    assert not torch.equal(other.train_set.blocks, dm.train_set.blocks)  # seeded train subset

    again = LMDataModule(t, tok, str(data_dir), batch_size=4, seed=7)
    again.setup("fit")
    first = [b["input_ids"] for b in again.train_dataloader()]
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(dm.train_dataloader(), first))


def test_calibration_batches_are_fixed_by_seed(tok, data_dir):
    dm = LMDataModule(task(block_length=16, max_train_blocks=10), tok, str(data_dir), batch_size=4)
    a = dm.calibration_batches(3, seed=1)
    b = dm.calibration_batches(3, seed=1)
    c = dm.calibration_batches(3, seed=2, batch_size=2)
    assert len(a) == 3 and a[0]["input_ids"].shape == (4, 16) and c[0]["input_ids"].shape == (2, 16)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"][:2], c[0]["input_ids"])
    assert set(a[0]) == {"input_ids", "attention_mask", "labels"}
    # another run seed trains on another subset, but seed=1 draws the same calibration batches
    other = LMDataModule(task(block_length=16, max_train_blocks=10), tok, str(data_dir),
                         batch_size=4, seed=5)  # fmt: skip
    other.setup("fit")
    assert not torch.equal(other.train_set.blocks, dm.train_set.blocks)
    d = other.calibration_batches(3, seed=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, d))


def test_missing_local_file_offline_is_one_line(tok, data_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = LMDataModule(task(train_split="train"), tok, str(data_dir))
    with pytest.raises(DataError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and "wiki.train.raw" in msg and "paths.data_dir" in msg
    assert "Salesforce/wikitext" in msg
    off = LMDataModule(task(train_split="train"), tok, str(data_dir), allow_hub=False)
    with pytest.raises(DataError, match="data.allow_hub=false"):
        off.setup("fit")
    unset = LMDataModule(task(), tok, None, allow_hub=False)
    with pytest.raises(DataError, match="paths.data_dir is unset"):
        unset.setup("validate")


def test_hub_fallback_joins_the_lines(tok, monkeypatch):
    import datasets

    text = wiki_text(60, 3)
    lines = text.splitlines(keepends=True)
    calls = []

    def fake_load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return {"text": lines}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dm = LMDataModule(task(block_length=16, eval_blocks=None), tok, None)
    dm.setup("validate")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test", False)]
    assert dm.val_set.blocks.flatten().tolist() == tokenize_text(tok, text)[: dm.val_set.num_tokens]
    assert dm.sources["test"] == "hub:Salesforce/wikitext/wikitext-2-raw-v1/test"


def test_c4_offline_is_one_line(tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = LMDataModule(task("c4"), tok, None)
    with pytest.raises(DataError) as e:
        dm.setup("validate")
    msg = str(e.value)
    assert "\n" not in msg and "allenai/c4" in msg and "validation" in msg


def test_pack_documents_separates_with_eos_and_reads_only_the_budget(tok):
    def docs():
        yield "the cat"
        yield ""
        yield "a dog and a bird"
        for _ in range(3):
            yield "more text here"
        raise AssertionError("read past the token budget")

    blocks = pack_documents(docs(), tok, block_length=4, max_blocks=2)
    flat = blocks.flatten().tolist()
    cat = tok("the cat", add_special_tokens=False).input_ids
    assert blocks.shape == (2, 4)
    assert flat[: len(cat) + 1] == cat + [tok.eos_token_id]


def test_task_validation_names_the_key():
    validate_lm_task(task())
    validate_lm_task(task("c4"))
    with pytest.raises(ConfigError, match="train_split and task.eval_split are both 'test'"):
        validate_lm_task(task(train_split="test"))
    with pytest.raises(ConfigError, match="task.mode must be min"):
        validate_lm_task(task(mode="max"))
    with pytest.raises(ConfigError, match="task.block_length=4"):
        validate_lm_task(task(block_length=4))
    with pytest.raises(ConfigError, match="needs task.max_train_blocks"):
        validate_lm_task(task("c4", max_train_blocks=None))
    with pytest.raises(ConfigError, match="task.source='ptb'"):
        validate_lm_task(task(source="ptb"))


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_task_configs_compose(name, compose):
    cfg = compose([f"task={name}", "model=tiny_llama"])
    assert cfg.task.kind == "causal_lm" and cfg.task.monitor == "val/ppl"
    assert cfg.task.higher_is_better is False and cfg.task.mode == "min"
    validate_lm_task(cfg.task)


def test_real_wikitext_split_sizes(tok):
    data_dir = os.environ.get("COALORA_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "wikitext-2-raw" / "wiki.valid.raw").is_file():
        pytest.skip("needs COALORA_DATA_DIR with wikitext-2-raw")
    dm = LMDataModule(task(max_train_blocks=None, eval_blocks=32), tok, data_dir)
    dm.setup("fit")
    b = dm.budget()
    assert b["eval_blocks"] == 32 and b["train_blocks"] > 500  # ~200k words in wiki.valid.raw
    assert dm.sources["valid"].endswith("wiki.valid.raw")


def test_non_integer_budgets_are_one_line():
    for key in ("block_length", "max_train_blocks", "eval_blocks"):
        with pytest.raises(ConfigError, match=f"task.{key}='abc' must be an integer") as e:
            validate_lm_task(task(**{key: "abc"}))
        assert "\n" not in str(e.value)


def test_a_non_utf8_text_file_is_one_line(tok, data_dir):
    (data_dir / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b"caf\xe9 au lait\n" * 50)
    dm = LMDataModule(task(block_length=16), tok, str(data_dir))
    with pytest.raises(DataError, match=r"wiki\.test\.raw is not UTF-8 text") as e:
        dm.setup("validate")
    assert "\n" not in str(e.value) and "byte 3" in str(e.value)


def test_eval_blocks_above_the_split_warn_with_both_numbers(tok, data_dir, caplog):
    dm = LMDataModule(task(block_length=16, eval_blocks=100000), tok, str(data_dir))
    with caplog.at_level("WARNING", logger="coalora.data.lm"):
        dm.setup("validate")
    n = len(dm.val_set)
    assert 0 < n < 100000
    assert f"task.eval_blocks=100000 but split 'test' has only {n} blocks" in caplog.text


def test_block_length_above_the_models_context_warns_with_both_numbers(caplog):
    from coalora.data.lm import check_context_length

    with caplog.at_level("WARNING", logger="coalora.data.lm"):
        check_context_length(task(block_length=4096), max_positions=2048)
    assert "task.block_length=4096" in caplog.text and "max_position_embeddings=2048" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="coalora.data.lm"):
        check_context_length(task(block_length=512), max_positions=2048)
        check_context_length(task(block_length=512), max_positions=None)
    assert caplog.text == ""
