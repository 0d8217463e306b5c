"""What every export writer leaves on disk (docs/reliability.md, "Exports"): the old export when
the swap fails or the process is killed in it, one line for a full disk or a read-only folder,
modes that follow the umask, and the tokenizer beside a packed export."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deploy.packed_helpers import TARGETS, minilm_tokenizer, tiny_bert

from coalora import deploy
from coalora.errors import CoaloraError, StorageError
from coalora.quant import NF3, NF4, ModelQuantConfig, target_linear_names

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[2, 7, 11, 40, 3]])


def plain_model():
    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    return model, names, numels


def export_at(out: Path, label: str = "nf4", overwrite: bool = False, **kw) -> Path:
    model, names, numels = plain_model()
    option = NF4 if label == "nf4" else NF3
    config = ModelQuantConfig.uniform(numels, option)
    return deploy.save_packed(model, names, {label: config}, None, out, overwrite=overwrite, **kw)


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --- 6. the swap --------------------------------------------------------------------------


def _fail_replace(monkeypatch, fail_from: int, fail_to: int | None = None) -> list[tuple]:
    """``os.replace`` raises EIO on calls ``fail_from``..``fail_to`` (1-based), and the atomic
    exchange is reported unavailable, so the two-rename swap runs."""
    import coalora.io

    real = os.replace
    calls: list[tuple] = []

    def replace(src, dst, *a, **kw):
        calls.append((str(src), str(dst)))
        n = len(calls)
        if n >= fail_from and (fail_to is None or n <= fail_to):
            raise OSError(errno.EIO, "Input/output error (injected)", str(src))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(coalora.io, "exchange_dirs", lambda a, b: False, raising=False)
    return calls


def test_a_failed_second_rename_puts_the_old_export_back(tmp_path, monkeypatch):
    out = export_at(tmp_path / "out")
    before = deploy.read_manifest(out)
    calls = _fail_replace(monkeypatch, fail_from=2, fail_to=2)
    with pytest.raises(OSError):
        export_at(out, label="nf3", overwrite=True)
    assert len(calls) >= 2  # the first rename happened: the target was moved aside
    monkeypatch.undo()
    assert deploy.read_manifest(out) == before and deploy.labels(out) == ["nf4"]
    deploy.load(out)  # whole and loadable
    assert leftovers(tmp_path, {"out"}) == []


def test_when_the_old_export_cannot_be_put_back_it_is_kept_and_named(tmp_path, monkeypatch):
    out = export_at(tmp_path / "out")
    before = deploy.read_manifest(out)
    _fail_replace(monkeypatch, fail_from=2)  # the second rename and the way back both fail
    with pytest.raises(StorageError, match=r"the previous export is kept at (\S+)") as e:
        export_at(out, label="nf3", overwrite=True)
    monkeypatch.undo()
    kept = Path(str(e.value).split("kept at ")[1].split()[0].rstrip(";,"))
    assert kept.parent == tmp_path and deploy.read_manifest(kept) == before
    deploy.load(kept)
    assert "\n" not in str(e.value)


def test_a_failed_exchange_leaves_the_old_export(tmp_path, monkeypatch):
    import coalora.io

    out = export_at(tmp_path / "out")
    before = deploy.read_manifest(out)

    def broken(a, b):
        raise OSError(errno.EIO, "Input/output error (injected)", str(a))

    monkeypatch.setattr(coalora.io, "exchange_dirs", broken, raising=False)
    monkeypatch.setattr(os, "replace", lambda *a, **k: broken(*a))  # before the fix: the renames
    with pytest.raises(OSError):
        export_at(out, label="nf3", overwrite=True)
    monkeypatch.undo()
    assert deploy.read_manifest(out) == before
    assert leftovers(tmp_path, {"out"}) == []


KILL = """
import os, shutil, sys
sys.path[:0] = [{root!r}, {tests!r}]
from deploy.test_export_files import export_at
from pathlib import Path
moves = []
real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst, *a, **k):
    moves.append(src)
    if len(moves) == 2:
        os._exit(9)  # killed between the two renames of a two-rename swap
    return real_replace(src, dst, *a, **k)
def rmtree(path, *a, **k):
    if moves or Path(path).name.endswith((".old", ".tmp")):
        os._exit(9)  # killed right after the swap, before the old export is deleted
    return real_rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree
export_at(Path({out!r}), label="nf3", overwrite=True)
"""


def test_a_kill_during_the_swap_leaves_a_loadable_export(tmp_path):
    out = export_at(tmp_path / "out")
    code = KILL.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 9, r.stderr[-2000:]
    assert out.is_dir(), sorted(p.name for p in tmp_path.iterdir())
    assert deploy.labels(out) in (["nf4"], ["nf3"])
    deploy.load(out)


# --- 9. full disk, read-only folder -------------------------------------------------------


def _safetensors_error(code: int, text: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(f"Error while serializing: I/O error: {text} (os error {code})")


STORAGE = {
    "safetensors ENOSPC": (
        lambda: _safetensors_error(errno.ENOSPC, "No space left on device"),
        r"no space left on device \(ENOSPC\)",
    ),
    "OSError ENOSPC": (
        lambda: OSError(errno.ENOSPC, "No space left on device"),
        r"no space left on device \(ENOSPC\)",
    ),
    "safetensors EROFS": (
        lambda: _safetensors_error(errno.EROFS, "Read-only file system"),
        r"read-only file system \(EROFS\)",
    ),
    "OSError EACCES in the temporary folder": (
        lambda: PermissionError(errno.EACCES, "Permission denied", "/x/.out.abc.tmp/base"),
        r"permission denied \(EACCES\)",
    ),
}


@pytest.mark.parametrize("case", list(STORAGE))
def test_a_storage_failure_is_one_line_naming_out_dir(tmp_path, monkeypatch, case):
    import safetensors.torch

    make, cause = STORAGE[case]
    old = export_at(tmp_path / "out")
    before = deploy.read_manifest(old)

    def full(*a, **k):
        raise make()

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    for out, overwrite in ((tmp_path / "new", False), (old, True)):
        with pytest.raises(
            StorageError, match=rf"^cannot write {re.escape(str(out))}: {cause}$"
        ) as e:
            export_at(out, label="nf3", overwrite=overwrite)
        assert "\n" not in str(e.value) and ".tmp" not in str(e.value)
    monkeypatch.undo()
    assert leftovers(tmp_path, {"out"}) == [] and deploy.read_manifest(old) == before


def test_a_read_only_parent_names_out_dir(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, dir=None, **k):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, ".out.x.tmp"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(
        StorageError, match=rf"^cannot write {re.escape(str(tmp_path / 'out'))}: read-only"
    ):
        export_at(tmp_path / "out")


def test_a_full_disk_in_the_peft_writer_is_one_line(tmp_path, monkeypatch):
    import coalora.deploy.writer as writer

    def full(*a, **k):
        raise _safetensors_error(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", full)
    out = tmp_path / "adapter"
    with pytest.raises(StorageError, match=rf"^cannot write {re.escape(str(out))}: no space left"):
        writer.write_export(out, {"adapter_model.safetensors": {"a": torch.zeros(2)}})
    assert list(tmp_path.iterdir()) == []


# --- 10. modes follow the umask -----------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_modes_follow(root: Path, mask: int) -> None:
    found = modes(root)
    want = {
        k: (0o777 if (root / k).is_dir() else 0o666) & ~mask for k in found
    }  # 0644 / 0755 under umask 022
    wrong = {k: oct(v) for k, v in found.items() if v != want[k]}
    assert not wrong, f"umask {oct(mask)}: {wrong}"


def test_packed_export_modes_follow_the_umask(tmp_path, umask):
    assert_modes_follow(export_at(tmp_path / "packed"), umask)


def test_peft_and_merged_export_modes_follow_the_umask(tmp_path, umask):
    from coalora.deploy.writer import write_export

    files = {
        "adapter_model.safetensors": {"base_model.model.x.lora_A.weight": torch.zeros(2, 3)},
        "adapter_config.json": {"peft_type": "LORA"},
        "README.md": "card\n",
        "tokenizer": minilm_tokenizer(),
    }
    assert_modes_follow(write_export(tmp_path / "peft", files), umask)
    merged = {"model": tiny_bert(), "tokenizer": minilm_tokenizer(), "README.md": "card\n"}
    assert_modes_follow(write_export(tmp_path / "merged", merged), umask)


def test_a_cached_safetensors_file_follows_the_umask(tmp_path, umask):
    from safetensors.torch import save_file

    from coalora.io import atomic_write

    path = atomic_write(tmp_path / "t.safetensors", lambda p: save_file({"x": torch.ones(2)}, p))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --- 11. the tokenizer --------------------------------------------------------------------


def test_a_packed_export_ships_the_runs_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = minilm_tokenizer()
    out = export_at(tmp_path / "packed", tokenizer=tok)
    sentence = "Packed exports keep their tokenizer, don't they?"
    for served in (AutoTokenizer.from_pretrained(str(out)), deploy.load_tokenizer(out)):
        assert (
            len(served) == len(tok) and served(sentence)["input_ids"] == tok(sentence)["input_ids"]
        )
    assert "tokenizer.json" in deploy.read_manifest(out)["files"]
    assert "load_tokenizer" in (out / "README.md").read_text()
    bare = export_at(tmp_path / "bare")
    with pytest.raises(CoaloraError, match=r"has no tokenizer"):
        deploy.load_tokenizer(bare)
    (out / "vocab.txt").write_text("[PAD]\n")  # a file the tokenizer would read, not listed
    with pytest.raises(CoaloraError, match=r"\['vocab.txt'\] not listed in manifest.json"):
        deploy.load_tokenizer(out)
    (out / "vocab.txt").unlink()
    data = bytearray((out / "tokenizer.json").read_bytes())
    data[-2] ^= 0x01
    (out / "tokenizer.json").write_bytes(bytes(data))  # a listed file changed
    with pytest.raises(CoaloraError, match=r"tokenizer.json: sha256 differs"):
        deploy.load_tokenizer(out)
