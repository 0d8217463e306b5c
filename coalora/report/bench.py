"""Helpers for benchmark scripts: timing medians, machine description, and writing one named
section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from coalora.io import atomic_write_text


def median_time(fn: Callable[[], object], reps: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine_line() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"{platform.platform()}"
    )


def header_lines(title: str, command: str | None = None) -> list[str]:
    cmd = command or " ".join(["python", *sys.argv])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"## {title}",
        "",
        f"* command: `{cmd}`",
        f"* date: {date}",
        f"* machine: {machine_line()}",
        "",
    ]


def write_section(path: str | Path, title: str, body: str) -> None:
    """Replace the ``## title`` section (up to the next ``## ``) or append it."""
    path = Path(path)
    heading = f"## {title}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + ("\n" + text[end + 1 :] if end >= 0 else "")
    atomic_write_text(path, text.rstrip("\n") + "\n")


def emit_markdown(lines: list[str], out: str | Path | None = None) -> str:
    """Join ``lines`` into a markdown block, print it, and write it atomically to ``out`` if given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        atomic_write_text(Path(out), text)
    return text
