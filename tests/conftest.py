"""Shared fixtures: a fresh plugin registry per test that asks for one; the benchmark
scripts (benchmarks/ is not a package) loaded as modules; Triton kernel modules imported
for the interpreter or for the compiler."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys

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


@contextlib.contextmanager
def _triton_modules(names, interpret: bool):
    """Fresh imports of the modules ``names`` (in that order) with ``TRITON_INTERPRET`` set
    to 1 or 0: ``triton.jit`` picks the interpreter or the compiler when a module is
    imported. Afterwards the copies are dropped, with the attributes the imports set on the
    parent packages (``from package import mod`` reads those before ``sys.modules``), and
    the variable is restored, so later tests import the modules as they need them."""

    def drop():
        for name in names:
            sys.modules.pop(name, None)
            parent_name, _, leaf = name.rpartition(".")
            parent = sys.modules.get(parent_name)
            if parent is not None and hasattr(parent, leaf):
                delattr(parent, leaf)

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    drop()
    try:
        yield [importlib.import_module(name) for name in names]
    finally:
        drop()
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="session")
def triton_modules():
    """The context manager above: ``with triton_modules(names, interpret) as modules``."""
    return _triton_modules


@pytest.fixture
def interp():
    """``gauss_kernels.hash_table.triton_index`` with its kernels in the Triton interpreter
    (tiny shapes; numpy on CPU). Function-scoped: the interpreted modules must be gone before
    a test that compiles the kernels (the gpu tests) runs."""
    pytest.importorskip("triton")
    with _triton_modules(("gauss_kernels.hash_table.triton_kernels", "gauss_kernels.hash_table.triton_index"),
                        interpret=True) as modules:
        yield modules[-1]
