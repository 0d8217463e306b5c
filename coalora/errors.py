"""User-facing errors: raised for bad input, printed by the entry points as one clear line."""

from __future__ import annotations


class CoaloraError(Exception):
    """Bad configuration or input. The message names the config key and the allowed values."""


class ConfigError(CoaloraError, ValueError):
    """A config value is not allowed."""


class DataError(CoaloraError, FileNotFoundError):
    """Task data can be found neither locally nor on the hub."""


class StorageError(CoaloraError, OSError):
    """A file could not be written (full disk, read-only folder, no permission); names the path."""
