"""Shared fixtures: a fresh plugin registry per test that asks for one; the benchmark
scripts (benchmarks/ is not a package) loaded as modules."""
from __future__ import annotations

import importlib.util
import os

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="session")
def load_benchmark():
    """``load(name)``: a fresh module of ``benchmarks/<name>.py`` (each call executes it anew)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def fresh_registry(monkeypatch):
    """Drop the cached plugin manager/registry before and after the test."""
    from gauss_plugins import plugins

    plugins.reset()
    yield plugins
    plugins.reset()
