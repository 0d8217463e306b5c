"""Checksummed, locked cache files (coalora.cachefile): corrupt files heal, read-only caches
warn, concurrent misses compute once."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

import pytest

import coalora.cachefile as cf
from coalora.errors import StorageError


def test_round_trip_and_envelope(tmp_path):
    p = tmp_path / "c.json"
    assert cf.write_verified(p, b'{"a": 1}\n')
    assert cf.read_verified(p) == b'{"a": 1}\n'
    assert p.read_bytes().startswith(b"#coalora-cache v1 sha256=")
    assert cf.read_verified(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b.replace(b'"a": 1', b'"a": 7'), "modified"),
        (lambda b: b.split(b"\n", 1)[1], "no coalora-cache header"),
        (lambda b: b"", "no coalora-cache header"),
    ],
)
def test_damaged_file_is_a_miss_with_a_warning(tmp_path, caplog, damage, reason):
    p = tmp_path / "c.json"
    cf.write_verified(p, b'{"a": 1}\n')
    p.write_bytes(damage(p.read_bytes()))
    with caplog.at_level(logging.WARNING):
        assert cf.read_verified(p, "allocation") is None
    assert str(p) in caplog.text and reason in caplog.text


def test_get_or_compute_heals_a_corrupt_file(tmp_path, caplog):
    p = tmp_path / "v.json"
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    def get():
        return cf.get_or_compute(p, compute, cf.json_bytes, cf.json_value, what="value")

    assert get() == {"x": 1} and get() == {"x": 1} and len(calls) == 1
    p.write_bytes(p.read_bytes()[:-2])
    with caplog.at_level(logging.WARNING):
        assert get() == {"x": 2}
    assert caplog.text.count(f"ignoring value {p}") == 1  # one warning per damaged file
    assert get() == {"x": 2} and len(calls) == 2  # rewritten: a hit again


def test_stale_content_is_recomputed(tmp_path, caplog):
    p = tmp_path / "v.json"
    cf.write_verified(p, cf.json_bytes({"version": 0}))

    def decode(b):
        d = cf.json_value(b)
        if d["version"] != 1:
            raise ValueError("another version")
        return d

    with caplog.at_level(logging.WARNING):
        out = cf.get_or_compute(p, lambda: {"version": 1}, cf.json_bytes, decode)
    assert out == {"version": 1} and "another version" in caplog.text
    assert cf.json_value(cf.read_verified(p)) == {"version": 1}


def test_unwritable_cache_warns_and_still_returns(tmp_path, caplog, monkeypatch):
    def denied(path, data):
        raise StorageError(f"cannot write {path}: read-only file system (EROFS)")

    monkeypatch.setattr(cf, "atomic_write_bytes", denied)
    with caplog.at_level(logging.WARNING):
        out = cf.get_or_compute(tmp_path / "v.json", lambda: [1, 2], cf.json_bytes, cf.json_value)
    assert out == [1, 2]
    assert "not caching" in caplog.text and "read-only file system" in caplog.text


def test_no_lock_file_possible_computes_uncached(tmp_path, caplog, monkeypatch):
    real_open = cf.os.open

    def no_create(path, flags, *a):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(cf.os, "open", no_create)
    with caplog.at_level(logging.WARNING):
        out = cf.get_or_compute(tmp_path / "v.json", lambda: 5, cf.json_bytes, cf.json_value)
    assert out == 5 and "not writable" in caplog.text
    assert not (tmp_path / "v.json").exists()


def _slow_compute_worker(path: str, tag: str, out: mp.Queue) -> None:
    def compute():
        time.sleep(0.5)  # both processes are inside get_or_compute at the same time
        return {"by": tag}

    out.put(cf.get_or_compute(Path(path), compute, cf.json_bytes, cf.json_value))


def test_concurrent_misses_compute_once(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    path = tmp_path / "shared.json"
    procs = [ctx.Process(target=_slow_compute_worker, args=(str(path), t, q)) for t in "ab"]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1]  # the second waited for the lock and read the first's file
    assert cf.json_value(cf.read_verified(path)) == results[0]
