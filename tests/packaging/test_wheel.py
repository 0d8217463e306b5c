"""``pip wheel .`` ships what a non-editable install needs to train from any directory: every
config under coalora/conf (not conf/local), the console entry points, py.typed and the license;
the installed ``coalora-train`` composes the job from the packaged configs."""

from __future__ import annotations

import email
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "coalora", "conf"]
SCRIPTS = {
    "coalora": "coalora.cli:main",
    **{f"coalora-{s}": f"coalora.cli.{s}:main" for s in ("train", "evaluate", "export", "search")},
    "coalora-compare": "coalora.cli.compare:main",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout is left untouched), with a
    machine-specific conf/local/default.yaml that must not ship."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if not path.exists():
            continue  # the build says what a missing file breaks
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    (src / "conf" / "local" / "default.yaml").write_text("seed: 7\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    out = subprocess.run([*cmd, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (found,) = (tmp / "dist").glob("coalora-*.whl")
    return found


def test_wheel_holds_configs_entry_points_types_and_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        info = next(n for n in files if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        meta = email.message_from_bytes(z.read(f"{info}/METADATA"))
    shipped = {
        f"coalora/conf/{p.relative_to(ROOT / 'conf')}"
        for p in (ROOT / "conf").rglob("*.yaml")
        if p.parent.name != "local"
    }
    assert "coalora/conf/train.yaml" in shipped and "coalora/conf/model/minilm_l6.yaml" in shipped
    assert shipped <= files, sorted(shipped - files)[:5]
    assert not [f for f in files if f.startswith("coalora/conf/local/")]
    assert {"coalora/py.typed", f"{info}/licenses/LICENSE"} <= files
    lines = entry_points.split("[console_scripts]", 1)[1].split("[", 1)[0].split("\n")
    declared = dict(line.split(" = ") for line in lines if " = " in line)
    assert declared == SCRIPTS
    assert meta["License-Expression"] == "Apache-2.0"


def test_installed_console_script_composes_from_the_packaged_configs(wheel, tmp_path):
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(installed)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # -S: no .pth files, so the checkout's editable install cannot supply what the wheel lacks
    path = os.pathsep.join([str(installed), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("PROJECT_ROOT", None)
    # what pip's generated `coalora-train` script does
    script = "import sys; from coalora.cli.train import main; sys.argv[0] = 'coalora-train'; main()"
    out = subprocess.run(
        [sys.executable, "-S", "-c", script, "method=qlora", "--info", "config"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    searched, composed = out.stdout.split("\nConfig\n******\n")
    assert f"| main     | file://{installed / 'coalora' / 'conf'} |" in searched
    assert str(ROOT) not in out.stdout
    assert "| method/qlora " in searched and "name: qlora" in composed
