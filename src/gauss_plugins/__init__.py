"""gauss-plugins: PyTorch extensions for real-time, large-scale generative recommendation.

``import gauss_plugins`` imports torch and pluggy only. Components (attention backends,
embedding stores, policies, export targets...) are found through the plugin registry::

    from gauss_plugins import get_registry
    get_registry().components("attention_backend")

Write a plugin with :data:`hookimpl` (see :mod:`gauss_plugins.hookspecs`).
"""
from __future__ import annotations

from gauss_plugins._optional import MissingExtraError, require
from gauss_plugins.components import Availability, Component, requires_cuda, requires_modules
from gauss_plugins.plugins import get_plugin_manager, get_registry, hookimpl, reset

__version__ = "0.1.0"

__all__ = [
    "Availability",
    "Component",
    "MissingExtraError",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "require",
    "requires_cuda",
    "requires_modules",
    "reset",
]
