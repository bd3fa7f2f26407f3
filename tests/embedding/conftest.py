"""Shared fixtures: every table test runs once per available index backend."""
from __future__ import annotations

import pytest
import torch


def _cpu_ext_reason() -> str:
    from gauss_kernels.hash_table import cpu_ext

    return "" if cpu_ext.available() else f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}"


@pytest.fixture(params=["torch", "cpu_ext"])
def backend(request) -> str:
    if request.param == "cpu_ext":
        reason = _cpu_ext_reason()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def index_factory():
    """make(name, device, capacity) -> a HashIndex of that backend (skips when unavailable)."""
    return make_index


def index_backends():
    """(name, factory) of every hash index to run the conformance tests on."""
    out = [pytest.param("torch", "cpu", id="torch-cpu"), pytest.param("cpu_ext", "cpu", id="cpu_ext")]
    out.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))
    out.append(pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu))
    return out


def make_index(name: str, device: str, capacity: int):
    from gauss_plugins import get_registry

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "cpu_ext":
        reason = _cpu_ext_reason()
        if reason:
            pytest.skip(reason)
    comp = get_registry().get("table_backend", name)
    avail = comp.availability()
    if not avail:
        pytest.skip(f"{name}: {avail.reason}")
    return comp.create(capacity, torch.device(device))
