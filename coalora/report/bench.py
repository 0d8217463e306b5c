"""Helpers for benchmark scripts: timing medians, variants interleaved round-robin with paired
ratios, the peak RSS of one process and child processes that report it, machine description and
load average, results files written part by part with each part's provenance, and writing one
named section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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


# ---------------------------------------------------------------- interleaved timing
def median_ms(xs: Sequence[float]) -> float:
    """Median of times in seconds, in milliseconds rounded to 0.01."""
    return round(statistics.median(xs) * 1e3, 2)


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """(q25, q75); both the value itself for a single sample."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    progress: Callable[[str, int, float], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every ``fns[name]()`` ``reps`` times, round-robin in one process so that load from
    other jobs hits all variants alike; the order rotates each round (no variant always runs
    first). Returns (wall seconds, process CPU seconds) per name, one entry per round, so that
    entry ``r`` of two names is a paired sample. ``progress(name, round, seconds)`` is called
    after every timed call."""
    order = list(fns)
    for _ in range(warmup):
        for name in order:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in order}
    cpu: dict[str, list[float]] = {name: [] for name in order}
    for r in range(reps):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            t, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            if progress is not None:
                progress(name, r, wall[name][-1])
    return wall, cpu


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """a / b: the ratio of the medians and the median [q25, q75] of the per-round ratios."""
    paired = [x / y for x, y in zip(a, b, strict=True)]
    q25, q75 = quartiles(paired)
    return {
        "ratio_of_medians": round(statistics.median(a) / statistics.median(b), 4),
        "paired_median": round(statistics.median(paired), 4),
        "paired_q25": round(q25, 4),
        "paired_q75": round(q75, 4),
    }


# ---------------------------------------------------------------- memory of one process
def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); -1 when unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def measure_peak_rss(fn: Callable[[], object]) -> dict[str, int | None]:
    """Run ``fn()`` and return KiB: ``rss_after_setup_kb`` (VmRSS before it), ``peak_setup_kb``
    (VmHWM before it: the process so far), ``peak_steps_kb`` (VmHWM of ``fn`` alone, after a
    reset through ``/proc/self/clear_refs``; None where the kernel refuses the reset) and
    ``peak_process_kb``. VmHWM belongs to the address space, so a child process does not
    inherit its parent's peak; ``ru_maxrss`` does across ``fork`` + ``exec`` and is not used."""
    rss, peak_setup = status_kb("VmRSS"), status_kb("VmHWM")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        reset = True
    except OSError:
        reset = False
    fn()
    peak = status_kb("VmHWM")
    return {
        "rss_after_setup_kb": rss,
        "peak_setup_kb": peak_setup,
        "peak_steps_kb": peak if reset else None,
        "peak_process_kb": max(peak_setup, peak),
    }


def run_json_child(args: Sequence[str], timeout: float | None = None) -> dict:
    """``python <args>`` in a fresh process with one thread; returns the JSON object printed on
    its last stdout line. A failing child raises with the tail of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child {' '.join(args)} exited with {out.returncode}:\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- provenance
def safetensors_data_bytes(path: str | Path) -> int:
    """Bytes of tensor data in a ``.safetensors`` file: its size minus the 8-byte header length
    and the JSON header (https://huggingface.co/docs/safetensors, format)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")  # u64 header length, then the JSON header
    return path.stat().st_size - 8 - header


def read_part_results(json_path: str | Path) -> dict:
    """The ``results`` of a per-part results file (``{}`` when absent): parts not re-run keep
    their numbers, and :func:`stamp_parts` records which run produced each."""
    path = Path(json_path)
    return json.loads(path.read_text()).get("results", {}) if path.exists() else {}


def stamp_parts(results: dict, parts: Sequence[str], command: str) -> None:
    """Record date and command of this run under ``results["meta"][part]`` for each part."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = results.setdefault("meta", {})
    for part in parts:
        meta[part] = {"date": stamp, "command": command}


def part_provenance(results: dict, part: str) -> list[str]:
    """Markdown lines naming the run that produced ``part`` (empty when not recorded)."""
    m = results.get("meta", {}).get(part)
    return [f"Run {m['date']}: `{m['command']}`", ""] if m else []


def table_section(results: dict, part: str, title: str, header: str) -> list[str]:
    """``### title``, the run that produced ``part`` and the head of a markdown table whose
    column names are ``header`` joined by `` | ``."""
    cols = header.count(" | ") + 1
    head = [f"| {header} |", "|---" * cols + "|"]
    return [f"### {title}", "", *part_provenance(results, part), *head]


def load_average() -> str:
    """The 1/5/15-minute load average and the core count, e.g. ``2.1 / 1.8 / 1.5 on 2 cores``."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unavailable"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def repo_command(root: Path, argv: Sequence[str] | None = None) -> str:
    """``OMP_NUM_THREADS=1 python <script relative to root> <args>`` of this process."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    shown = script.relative_to(root) if script.is_relative_to(root) else Path(argv[0])
    return " ".join(["OMP_NUM_THREADS=1 python", str(shown), *argv[1:]])
