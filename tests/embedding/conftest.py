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


@pytest.fixture
def trains_like_unbounded(tmp_path):
    """check(eviction_options, during=None) -> (table, backing): trains a 512-row C++-index
    table (row-wise Adagrad, LRU, evicting every step) through a TierPS on 60 batches over
    1,500 ids, ``during(table)`` wrapping the training (e.g. a monkeypatch context), and
    asserts that the store then holds exactly what an unbounded table trained to: every
    evicted row went out with its optimizer state and came back when seen again."""
    from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, SparseOptimizer
    from gauss_plugins.embedding.backing import pack_state
    from gauss_plugins.stores.tierps import TierPS

    reason = _cpu_ext_reason()
    if reason:
        pytest.skip(reason)

    def check(eviction_options, during=None):
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 1500, (32,), generator=gen) for _ in range(60)]

        def make(**kw):
            return DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=8, optimizer="rowwise_adagrad",
                                                            backend="cpu_ext", **kw))

        def train(table):
            opt = SparseOptimizer(table)
            table.train()
            for ids in batches:
                (table(ids) - 0.5).pow(2).sum().backward()
                opt.step()
                opt.zero_grad()

        unbounded = make(initial_capacity=2048, max_capacity=2048)
        small = make(initial_capacity=512, max_capacity=512, eviction="lru", evict_fraction=0.0,
                     eviction_options=eviction_options)
        store = TierPS(dim=8, state_dim=1, path=str(tmp_path / "ps"))
        backing = small.attach_store(store)
        train(unbounded)
        if during is None:
            train(small)
        else:
            with during(small):
                train(small)
        assert backing.counters["evicted_rows"] > 300 and backing.counters["restored_rows"] > 0
        seen = torch.unique(torch.cat(batches))
        small.detach_store()  # flush: the store now holds every trained row
        got = store.lookup(seen)
        assert bool(got.found.all())
        torch.testing.assert_close(got.values, unbounded.get(seen)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got.state, pack_state(unbounded, unbounded.find(seen)), atol=1e-6, rtol=0)
        return small, backing

    return check
