"""Without a C++ compiler (or with a broken build) tables still work, on the torch backend."""
from __future__ import annotations

import shutil

import pytest
import torch

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, TorchHashIndex


def test_no_compiler_selects_the_torch_backend(monkeypatch, fresh_registry):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    from gauss_plugins import get_registry

    comp = get_registry().select("table_backend", "auto", device=torch.device("cpu"))
    assert comp.name == "torch"
    avail = get_registry().availability("table_backend", "cpu_ext")
    assert not avail and "compiler" in avail.reason
    t = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4))
    assert isinstance(t.index, TorchHashIndex)
    t.train()
    with torch.no_grad():
        assert t(torch.tensor([1, 2])).shape == (2, 4)


def test_failed_build_falls_back_with_a_warning(monkeypatch, fresh_registry):
    from gauss_kernels.hash_table import cpu_ext

    def broken():
        raise cpu_ext.ExtensionBuildError("building cpu_hash_index.cpp failed: simulated")

    monkeypatch.setattr(cpu_ext, "load_ops", broken)
    with pytest.warns(RuntimeWarning, match="cpu_ext.*failed.*torch"):
        t = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, backend="auto"))
    assert isinstance(t.index, TorchHashIndex)
    with pytest.raises(cpu_ext.ExtensionBuildError):
        DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, backend="cpu_ext"))


def test_extension_cache_key_changes_with_the_source(tmp_path, monkeypatch):
    from gauss_kernels.hash_table import cpu_ext

    cxx = cpu_ext._compiler()
    if cxx is None:
        pytest.skip("no compiler")
    monkeypatch.setenv("GAUSS_PLUGINS_CACHE", str(tmp_path))
    first = cpu_ext._library_path(cxx)
    assert first.startswith(str(tmp_path))
    src = tmp_path / "copy.cpp"
    src.write_text(open(cpu_ext._SOURCE).read() + "\n// changed\n")
    monkeypatch.setattr(cpu_ext, "_SOURCE", str(src))
    assert cpu_ext._library_path(cxx) != first
