"""The user cache folder of gauss-plugins: compiled kernels, the C++ runner, downloaded data."""
from __future__ import annotations

import os

__all__ = ["cache_root"]


def cache_root(*parts: str) -> str:
    """``$GAUSS_PLUGINS_CACHE``, else ``$XDG_CACHE_HOME/gauss_plugins``, else
    ``~/.cache/gauss_plugins``; ``parts`` are joined below it."""
    root = os.environ.get("GAUSS_PLUGINS_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "gauss_plugins")
    return os.path.join(root, *parts)
