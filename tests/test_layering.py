"""Imports point down: the engine rooms never import the rooms that assemble a run, and no code
or script cites files that are not in this repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWER = ["quant", "adapters", "models", "data", "methods", "search", "deploy"]


def sources(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("room", LOWER)
def test_lower_rooms_do_not_import_stages_or_lit(room):
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sources(f"coalora/{room}")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"from coalora\.(stages|lit)|import coalora\.(stages|lit)", line)
    ]
    assert not bad, bad


@pytest.mark.parametrize("room", ["search", "quant"])
def test_search_and_quant_do_not_import_methods(room):
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sources(f"coalora/{room}")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "from coalora.methods" in line or "import coalora.methods" in line
    ]
    assert not bad, bad


def test_no_citation_of_files_outside_the_repository():
    pattern = re.compile(r"DESIGN|STYLE|algorithms\.md|papers\.md")
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sources("coalora", "scripts")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, bad


def test_scripts_use_the_installed_package():
    bad = [
        str(p.relative_to(ROOT)) for p in sources("scripts") if "sys.path.insert" in p.read_text()
    ]
    assert not bad, bad
