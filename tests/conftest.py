"""Shared fixtures: a fresh plugin registry per test that asks for one."""
from __future__ import annotations

import pytest


@pytest.fixture
def fresh_registry(monkeypatch):
    """Drop the cached plugin manager/registry before and after the test."""
    from gauss_plugins import plugins

    plugins.reset()
    yield plugins
    plugins.reset()
