"""lm-eval on the in-memory tiny_llama over the local fixture task (tests/fixtures/lm_eval)."""

import builtins
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coalora import zeroshot
from coalora.errors import CoaloraError, ConfigError
from coalora.models import build_causal_lm, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lm_eval"

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml")
    return build_causal_lm(cfg, seed=0), build_tokenizer(cfg)


def test_local_task_resolves_its_jsonl_next_to_the_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for the JSONL here
    tasks = zeroshot.local_tasks([FIXTURE])
    assert list(tasks) == ["coalora_sci_mc"]
    files = tasks["coalora_sci_mc"]["dataset_kwargs"]["data_files"]
    assert Path(files["test"]) == FIXTURE / "coalora_sci_mc.jsonl"
    rows = [json.loads(line) for line in Path(files["test"]).read_text().splitlines()]
    assert len(rows) == 10 and all(r["answerKey"] in r["choices"]["label"] for r in rows)


def test_runs_the_fixture_task_on_the_in_memory_model(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    model.train()
    out = zeroshot.run_lm_eval(model, tok, ["coalora_sci_mc"], include=[FIXTURE], batch_size=4)
    row = out["coalora_sci_mc"]
    assert row["n"] == 10
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    assert row["acc"] * 10 == pytest.approx(round(row["acc"] * 10))  # a count over 10 items
    assert "acc_stderr" in row
    assert model.training  # mode restored
    again = zeroshot.run_lm_eval(model, tok, ["coalora_sci_mc"], include=[FIXTURE], batch_size=2)
    assert again["coalora_sci_mc"]["acc"] == row["acc"]  # batch size does not change scores


def test_the_score_is_the_models_own_choice_ranking(tiny):
    """acc equals the fraction of items whose answer has the highest summed log-likelihood,
    computed here directly with the model (lm-eval's multiple-choice rule)."""
    import torch

    model, tok = tiny
    rows = [json.loads(x) for x in (FIXTURE / "coalora_sci_mc.jsonl").read_text().splitlines()]
    correct = 0
    model.eval()
    for r in rows:
        ctx = tok(f"Question: {r['question']}\nAnswer:", add_special_tokens=False).input_ids
        scores = []
        for choice in r["choices"]["text"]:
            cont = tok(" " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            tgt = ids[0, 1:]
            scores.append(lp[len(ctx) - 1 :].gather(-1, tgt[len(ctx) - 1 :, None]).sum().item())
        correct += int(
            max(range(4), key=scores.__getitem__) == r["choices"]["label"].index(r["answerKey"])
        )
    got = zeroshot.run_lm_eval(model, tok, ["coalora_sci_mc"], include=[FIXTURE])
    assert got["coalora_sci_mc"]["acc"] == pytest.approx(correct / len(rows))


def test_bad_task_list_and_include_are_config_errors(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="must be a non-empty list"):
        zeroshot.run_lm_eval(model, tok, "coalora_sci_mc")
    with pytest.raises(ConfigError, match="does not exist"):
        zeroshot.local_tasks([FIXTURE / "missing"])


@pytest.mark.slow
def test_unknown_task_is_a_config_error(tiny):
    """Indexing lm-eval's built-in tasks takes ~20 s here, hence slow."""
    model, tok = tiny
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        zeroshot.run_lm_eval(model, tok, ["no_such_task_xyz"], include=[FIXTURE])


def test_missing_lm_eval_is_one_line(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(
        CoaloraError, match=r"needs lm-eval, which is not installed: pip install"
    ) as e:
        zeroshot.require_lm_eval()
    assert "\n" not in str(e.value)


class _Tok:
    """A callable tokenizer stub: whitespace ids, with specials as a prefix and/or suffix."""

    def __init__(self, prefix, suffix):
        self.prefix, self.suffix = prefix, suffix

    def __call__(self, text, add_special_tokens=True):
        ids = [len(w) for w in text.split()]
        if add_special_tokens:
            ids = self.prefix + ids + self.suffix
        return {"input_ids": ids}


def test_bos_policy_keeps_prefix_specials_and_drops_suffix_ones(tiny):
    assert zeroshot.add_bos_policy(_Tok([], [])) is None  # SmolLM2 / Qwen: no specials
    assert zeroshot.add_bos_policy(_Tok([1], [])) is None  # LLaMA: BOS prefix, lm-eval keeps it
    assert zeroshot.add_bos_policy(_Tok([101], [102])) is False  # BERT-style [SEP] suffix
    assert zeroshot.add_bos_policy(tiny[1]) is False


def _include_with_an_evil_task(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture task plus an unrequested task whose ``!function`` writes a marker on import."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for f in FIXTURE.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "evil-ran"
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def process(docs):\n    return docs\n"
    )
    (folder / "evil.yaml").write_text(
        "task: evil_task\ndataset_path: json\nprocess_docs: !function evil.process\n"
    )
    return folder, marker


def test_only_the_requested_tasks_yamls_are_loaded(tmp_path):
    """An unrequested task's ``!function`` is never imported (a task YAML can run code)."""
    folder, marker = _include_with_an_evil_task(tmp_path)
    assert zeroshot.local_task_files([folder]) == {
        "coalora_sci_mc": folder / "coalora_sci_mc.yaml",
        "evil_task": folder / "evil.yaml",
    }
    resolved = zeroshot.resolve_tasks(["coalora_sci_mc"], include=[folder])
    assert list(resolved.local) == ["coalora_sci_mc"] and resolved.names == ["coalora_sci_mc"]
    assert not marker.exists()
    zeroshot.local_tasks([folder], ["evil_task"])  # asked for: lm-eval's loader imports it
    assert marker.read_text() == "ran"


def test_unknown_task_fails_before_scoring(tmp_path, monkeypatch):
    """The name check needs no model: it runs before the evaluate stage scores anything."""

    class Index:  # lm-eval's task index without the ~20 s scan of its built-in tasks
        def __init__(self, include_defaults=True):
            self.all_tasks = ["arc_easy"] if include_defaults else []

    monkeypatch.setattr("lm_eval.tasks.TaskManager", Index)
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such'\]") as e:
        zeroshot.resolve_tasks(["coalora_sci_mc", "no_such"], include=[FIXTURE])
    assert "coalora_sci_mc" in str(e.value) and "\n" not in str(e.value)
    assert zeroshot.resolve_tasks(["arc_easy"]).specs == ["arc_easy"]
