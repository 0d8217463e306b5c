"""Atomic writers: permissions follow the umask, storage failures are one line, directories are
replaced without deleting what the project did not write (docs/reliability.md)."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

import coalora.io as cio
from coalora.errors import CoaloraError, StorageError
from coalora.io import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    replace_dir_atomically,
)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_current_umask_reads_without_changing(umask022):
    assert current_umask() == 0o022
    assert current_umask() == 0o022


def test_files_are_0644_under_umask_022(tmp_path, umask022):
    assert mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
    assert mode(atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})) == 0o644
    old = os.umask(0o027)
    try:
        assert mode(atomic_write_text(tmp_path / "c.txt", "x")) == 0o640
    finally:
        os.umask(old)


def test_replaced_dir_is_0755_under_umask_022(tmp_path, umask022):
    out = replace_dir_atomically(
        tmp_path / "export", lambda d: (d / "f.json").write_text("{}"), is_ours=lambda p: False
    )
    assert mode(out) == 0o755 and mode(out / "f.json") == 0o644


def test_nothing_left_when_the_writer_fails(tmp_path):
    def bad(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "x.bin", bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code,cause",
    [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")],
)
def test_storage_errors_name_path_and_cause(tmp_path, code, cause):
    def full(tmp: str) -> None:
        raise OSError(code, os.strerror(code))

    target = tmp_path / "results.json"
    with pytest.raises(StorageError) as e:
        atomic_write(target, full)
    msg = str(e.value)
    assert str(target) in msg and cause in msg and "\n" not in msg
    assert isinstance(e.value, CoaloraError) and isinstance(e.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_hidden_enospc_is_named_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as ``unexpected pos``: the free space decides."""

    class Full:
        f_bavail = 0

    def torch_like(tmp: str) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 64")

    monkeypatch.setattr(cio.os, "statvfs", lambda p: Full())
    with pytest.raises(StorageError, match=r"ckpt: no space left on device \(ENOSPC\)"):
        atomic_write(tmp_path / "last.ckpt", torch_like)


def test_unrelated_errors_are_not_storage_errors(tmp_path):
    def bug(tmp: str) -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        atomic_write(tmp_path / "x", bug)


def test_read_only_folder_is_one_line(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(StorageError, match=r"cannot write .*r.json: permission denied"):
        atomic_write_text(tmp_path / "r.json", "{}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_real_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError, match="permission denied"):
            atomic_write_text(ro / "x.txt", "x")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ replace_dir_atomically
def build_files(names):
    def build(d: Path) -> None:
        for n in names:
            (d / n).write_text(n)

    return build


def test_replace_creates_and_replaces_our_dir(tmp_path):
    target = tmp_path / "out"
    replace_dir_atomically(target, build_files(["a", "marker"]), is_ours=lambda p: False)
    assert sorted(p.name for p in target.iterdir()) == ["a", "marker"]
    ours = lambda p: (p / "marker").is_file()  # noqa: E731
    replace_dir_atomically(target, build_files(["b", "marker"]), is_ours=ours)
    assert sorted(p.name for p in target.iterdir()) == ["b", "marker"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old dir left


def test_refuses_a_foreign_non_empty_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("weights")
    with pytest.raises(CoaloraError, match=r"run is a non-empty directory .* overwrite=true"):
        replace_dir_atomically(run, build_files(["a"]), is_ours=lambda p: False)
    assert (run / "checkpoints" / "last.ckpt").read_text() == "weights"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    replace_dir_atomically(run, build_files(["a"]), is_ours=lambda p: False, overwrite=True)
    assert [p.name for p in run.iterdir()] == ["a"]


def test_empty_dir_is_replaced_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    replace_dir_atomically(tmp_path / "empty", build_files(["a"]), is_ours=lambda p: False)
    assert (tmp_path / "empty" / "a").is_file()
    f = tmp_path / "file.txt"
    f.write_text("keep")
    with pytest.raises(CoaloraError, match=r"file.txt exists and is not a directory"):
        replace_dir_atomically(f, build_files(["a"]), is_ours=lambda p: True, overwrite=True)
    assert f.read_text() == "keep"


def test_failed_build_keeps_the_old_dir(tmp_path):
    target = tmp_path / "out"
    replace_dir_atomically(target, build_files(["old"]), is_ours=lambda p: True)

    def bad(d: Path) -> None:
        (d / "new").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        replace_dir_atomically(target, bad, is_ours=lambda p: True)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_swap_puts_the_old_dir_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    replace_dir_atomically(target, build_files(["old"]), is_ours=lambda p: True)
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the rename of the new directory into place
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(cio.os, "replace", flaky)
    monkeypatch.setattr(cio, "exchange_dirs", lambda a, b: False)  # the two-rename fallback
    with pytest.raises(OSError, match="I/O error"):
        replace_dir_atomically(target, build_files(["new"]), is_ours=lambda p: True)
    monkeypatch.undo()
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
