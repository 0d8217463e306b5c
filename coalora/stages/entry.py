"""Entry-point guard: bad input is printed as one clear line (exit 2), not a traceback wall."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from coalora.errors import CoaloraError


def guarded(fn: Callable[[Any], Any], cfg: Any) -> Any:
    try:
        return fn(cfg)
    except CoaloraError as e:
        if os.environ.get("COALORA_FULL_ERROR"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
