"""Entry-point guard: every user-facing failure is one clear line on stderr, not a traceback.

``CoaloraError`` (bad input: the message names the key or file and what is allowed) exits 2, or
the error's own ``exit_code``; an operating-system error while reading or writing a file (a full
disk, a read-only or missing directory, permissions) becomes one line naming the file and the
cause. ``COALORA_FULL_ERROR=1`` re-raises with the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

from coalora.errors import CoaloraError

HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EDQUOT: "the disk quota is exceeded",
}


def describe_os_error(e: OSError) -> str:
    where = e.filename or "a file"
    cause = HINTS.get(e.errno) or e.strerror or type(e).__name__
    return f"{where}: {cause}"


def guarded(fn: Callable[[Any], Any], cfg: Any) -> Any:
    try:
        return fn(cfg)
    except CoaloraError as e:
        if os.environ.get("COALORA_FULL_ERROR"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:
        if os.environ.get("COALORA_FULL_ERROR") or e.errno is None:
            raise
        print(f"error: {describe_os_error(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
