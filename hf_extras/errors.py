"""The package's error type: the bottom floor of hf_extras, importable from every other module.

`ConfigError` is a `ValueError`, so callers that catch `ValueError` keep working; `hf-extras` prints it as one
`hf-extras: error: ...` line (exit status 2) instead of a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad key or value in a run configuration (YAML, command line or data file); the message names it."""
