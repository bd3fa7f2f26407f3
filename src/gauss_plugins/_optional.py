"""Optional dependencies: import them on use, and say exactly how to install a missing one.

The core imports only torch, pluggy and numpy. Every other package belongs to an extra of
the ``gauss-plugins`` distribution; code that needs one calls :func:`require` at the point
of use, so a missing extra fails with the ``pip install`` line that fixes it.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# What to run for each extra. torchrec is special on CPU machines: its metadata names the
# CUDA fbgemm-gpu, so the extra brings fbgemm-gpu-cpu and torchrec comes with --no-deps.
_INSTALL_HINT = {
    "torchrec": 'pip install "gauss-plugins[torchrec]" && pip install --no-deps torchrec==1.8.0',
}


def install_hint(extra: str) -> str:
    """The shell command that installs ``extra``."""
    return _INSTALL_HINT.get(extra, f'pip install "gauss-plugins[{extra}]"')


class MissingExtraError(ImportError):
    """A feature needs a package from an extra that is not installed."""

    def __init__(self, module: str, extra: str, feature: str | None = None, cause: BaseException | None = None):
        what = feature or f"this feature"
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None and not isinstance(cause, ModuleNotFoundError) else ""
        super().__init__(
            f"{what} needs the '{module}' package, which is not importable{detail}. "
            f"Install the '{extra}' extra: {install_hint(extra)}",
            name=module,
        )
        self.module = module
        self.extra = extra


def is_installed(module: str) -> bool:
    """True when ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # ModuleNotFoundError, or a broken binary dependency
        raise MissingExtraError(module, extra, feature, cause=exc) from exc
