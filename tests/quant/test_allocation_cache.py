"""Cached error tables and allocations: checksummed, healed when damaged, shared by concurrent
runs, identical across thread counts (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coalora.quant.error_table as error_table
from coalora.cachefile import json_value, read_verified
from coalora.quant import QuantSpace
from coalora.quant.allocation import (
    allocation_path,
    cached_allocation,
    cached_allocations,
    cached_error_table,
    table_path,
)

SMALL = QuantSpace(bits=[2, 3, 4], bits0=[8], dtype1=["bf16", "fp32"], block0=[16, 64], block1=[16])
BUDGETS = [2.3, 2.6, 3.0, 3.4, 3.8]
ROOT = Path(__file__).resolve().parents[2]


def tiny_weights(big: bool = False) -> dict[str, torch.Tensor]:
    """Four small layers; ``big``: three MiniLM-sized ones, large enough for torch to split
    reductions across threads."""
    g = torch.Generator().manual_seed(3)
    if big:
        return {f"enc.{i}.w": torch.randn(1536, 384, generator=g) * 0.05 for i in range(3)}
    return {f"enc.{i}.w": torch.randn(16 * (i + 1), 64, generator=g) * 0.1 for i in range(4)}


def allocations_json(cache_dir: str | None, big: bool = False) -> str:
    """The allocations at BUDGETS through the cache, as canonical JSON (for comparisons)."""
    weights = tiny_weights(big)
    table = cached_error_table(weights, SMALL, cache_dir, "tiny")
    out = cached_allocations(table, BUDGETS, SMALL, cache_dir, "tiny")
    digest = hashlib.sha256(table.costs.numpy().tobytes()).hexdigest()  # bit-level table check
    return json.dumps(
        {"table": digest, **{f"{b:g}": c.to_dict() for b, c in out.items()}}, sort_keys=True
    )


def test_table_file_carries_a_checksum_and_heals(tmp_path, caplog):
    weights = tiny_weights()
    first = cached_error_table(weights, SMALL, tmp_path, "tiny")
    path = table_path(tmp_path, "tiny", SMALL, "mse")
    meta_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert b'"sha256"' in path.read_bytes()[8 : 8 + meta_len]

    path.write_bytes(path.read_bytes()[:-40])  # truncated
    with caplog.at_level(logging.WARNING):
        again = cached_error_table(weights, SMALL, tmp_path, "tiny")
    assert torch.equal(again.costs, first.costs)
    assert f"ignoring error table {path}" in caplog.text
    caplog.clear()

    data = bytearray(path.read_bytes())  # tampered: valid header, one cost changed
    data[-9] ^= 0x40
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        healed = cached_error_table(weights, SMALL, tmp_path, "tiny")
    assert torch.equal(healed.costs, first.costs) and "SHA-256 does not match" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # rewritten: a clean hit now
        cached_error_table(weights, SMALL, tmp_path, "tiny")
    assert caplog.text == ""


def test_allocation_cache_is_verified_and_records_the_solve(tmp_path, caplog):
    weights = tiny_weights()
    table = cached_error_table(weights, SMALL, tmp_path, "tiny")
    config, info = cached_allocation(table, 3.0, SMALL, tmp_path, "tiny")
    path = allocation_path(tmp_path, "tiny", SMALL, table, "exact", 3.0)
    stored = json_value(read_verified(path))
    assert stored["solve"]["status"] == info.status and stored["solve"]["gap"] == info.gap
    assert config.average_bits() <= 3.0

    # a tampered allocation (a 3.0 budget relabelled with 2-bit layers) is detected, not trusted
    text = path.read_bytes().replace(b'"bits": 4', b'"bits": 2').replace(b'"bits": 3', b'"bits": 2')
    path.write_bytes(text)
    with caplog.at_level(logging.WARNING):
        again, _ = cached_allocation(table, 3.0, SMALL, tmp_path, "tiny")
    assert again == config and f"ignoring allocation {path}" in caplog.text


def test_read_only_cache_still_allocates(tmp_path, caplog, monkeypatch):
    import coalora.cachefile as cf
    from coalora.errors import StorageError

    def denied(path, data):
        raise StorageError(f"cannot write {path}: read-only file system (EROFS)")

    monkeypatch.setattr(cf, "atomic_write_bytes", denied)
    with caplog.at_level(logging.WARNING):
        got = allocations_json(str(tmp_path))
    assert got == allocations_json(None)
    assert "not caching error table" in caplog.text and "not caching allocation" in caplog.text


def _worker(cache_dir: str, out: mp.Queue) -> None:
    out.put(allocations_json(cache_dir))


def test_two_concurrent_runs_on_an_empty_cache_agree(tmp_path, monkeypatch):
    slow_build = error_table.build_error_table

    def slow(*a, **k):  # widen the race window: both processes miss the empty cache
        import time

        time.sleep(0.3)
        return slow_build(*a, **k)

    monkeypatch.setattr(error_table, "build_error_table", slow)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    a, b = q.get(timeout=120), q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert a == b == allocations_json(str(tmp_path))  # and equal to what the cache now serves


@pytest.mark.parametrize("threads", [["1", "2"]])
def test_thread_count_does_not_change_allocations(tmp_path, threads):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from tests.quant.test_allocation_cache import allocations_json; "
        "print(allocations_json(None, big=True))"
    )
    outs = []
    for n in threads:
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        r = subprocess.run(
            [sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    assert outs[0] == outs[1]


def test_old_table_without_checksum_loads_but_is_rebuilt_in_the_cache(tmp_path, caplog):
    """Explicit loads accept a pre-checksum file (verified when a checksum is present); the cache
    never trusts one: it warns, rebuilds and writes a checksummed file."""
    from safetensors.torch import save_file

    weights = tiny_weights()
    table = cached_error_table(weights, SMALL, None, "tiny")
    path = table_path(tmp_path, "tiny", SMALL, "mse")
    meta = {
        "version": "1",
        "kind": table.kind,
        "fingerprint": table.fingerprint,
        "names": json.dumps(table.names),
        "options": json.dumps([qc.key for qc in table.options]),
    }
    tensors = {"costs": table.costs, "numels": torch.tensor(table.numels)}
    save_file(tensors, str(path), metadata=meta)  # the version-1 layout, no sha256
    assert torch.equal(error_table.ErrorTable.load(path).costs, table.costs)
    with pytest.raises(ValueError, match="no checksum"):
        error_table.ErrorTable.load(path, require_checksum=True)
    with caplog.at_level(logging.WARNING):
        cached_error_table(weights, SMALL, tmp_path, "tiny")
    assert "no checksum (written by an older coalora)" in caplog.text
    assert error_table.ErrorTable.load(path, require_checksum=True).fingerprint == table.fingerprint
