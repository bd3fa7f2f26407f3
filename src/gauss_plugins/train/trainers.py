"""The training loop, reached through the plugin registry (kind ``trainer``).

The core never imports a training framework. ``gauss train``, ``gauss demo`` and
:func:`gauss_plugins.train.compare.run_comparison` call :func:`get_trainer`, which asks the
registry for an available ``trainer`` component (the Lightning integration registers
``lightning``) and, when there is none, raises :class:`TrainerUnavailableError` with one line
that says why and what to install.
"""
from __future__ import annotations

from typing import Callable, Dict

from gauss_plugins.components import Component

__all__ = ["TrainerUnavailableError", "get_trainer", "trainer_component"]

Trainer = Callable[..., Dict[str, float]]


class TrainerUnavailableError(RuntimeError):
    """No training loop can run here; the message names the missing piece."""


def trainer_component(name: str = "auto") -> Component:
    """The registered trainer ``name`` (``"auto"``: the available one of highest priority),
    without importing it; :class:`TrainerUnavailableError` says why there is none."""
    from gauss_plugins.plugins import get_registry

    registry = get_registry()
    components = registry.components("trainer")
    if not components:
        raise TrainerUnavailableError(
            "training needs a trainer plugin and none is registered (is gauss_integrations blocked by "
            "GAUSS_PLUGINS_LOAD / GAUSS_PLUGINS_DENY? see `gauss plugins`); install one with "
            "pip install \"gauss-plugins[lightning]\"")
    if name == "auto":
        reasons = []
        for comp in components:
            avail = comp.availability()
            if avail:
                return comp
            reasons.append(f"{comp.name}: {avail.reason}")
        raise TrainerUnavailableError("training is not available here: " + "; ".join(reasons))
    try:
        comp = registry.get("trainer", name)
    except KeyError as exc:
        raise TrainerUnavailableError(exc.args[0]) from None
    avail = comp.availability()
    if not avail:
        raise TrainerUnavailableError(f"trainer {name!r} is not available here: {avail.reason}")
    return comp


def get_trainer(name: str = "auto") -> Trainer:
    """The ``run(config, output_dir, progress=True, log=print, sequences=None) -> metrics``
    callable of trainer ``name`` (see :func:`trainer_component`)."""
    comp = trainer_component(name)
    try:
        return comp.load()
    except ImportError as exc:
        # The check passed but an import below it failed (a broken install): one line, the
        # cause kept for whoever debugs with a traceback.
        raise TrainerUnavailableError(f"trainer {comp.name!r} ({comp.provider}) failed to import: {exc}") from exc
