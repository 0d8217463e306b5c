"""Console entry points: ``coalora <stage> [overrides]`` and ``coalora-<stage> [overrides]`` run
the stages of train.py, evaluate.py, export.py, search.py and scripts/compare.py from any
directory (README, "Usage").

The primary config directory is absolute, so the working directory does not matter: a wheel
installs the repository's ``conf/`` as ``coalora/conf``; a source checkout or an editable install
reads the ``conf/`` beside the package. Each stage is a module of this package
(``coalora.cli.train`` ...) so Hydra names the job after the stage (``train.log``), as it does for
the root scripts, which are these same apps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

STAGES = ("train", "evaluate", "export", "search", "compare")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
USAGE = (
    "usage: coalora <stage> [key=value ...] [hydra flags: --cfg job, --help, -m ...]\n"
    f"stages: {', '.join(STAGES)} (configs: conf/<stage>.yaml; README, 'Usage')"
)


def config_dir() -> Path:
    """``coalora/conf`` when installed from a wheel, else the checkout's ``conf/``."""
    installed = PACKAGE_DIR / "conf"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "conf"


def stage_app(config_name: str) -> Callable[[Callable[[Any], None]], Callable[[], None]]:
    """``@hydra.main`` on ``conf/<config_name>.yaml`` by absolute path. Without the training
    stack (a loader-only install) it exits with one line naming the extra to install."""
    try:
        import hydra
    except ModuleNotFoundError as e:
        raise SystemExit(
            f"error: the {config_name} stage needs the training stack ({e.name} is not "
            "installed): pip install 'coalora[train]'"
        ) from None
    return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)


def main(argv: list[str] | None = None) -> None:
    """``coalora <stage> ...``: the stage's Hydra app on the remaining arguments."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; allowed: {list(STAGES)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"coalora {stage}", *rest]  # Hydra parses sys.argv
    import_module(f"coalora.cli.{stage}").main()


__all__ = ["STAGES", "config_dir", "main", "stage_app"]
