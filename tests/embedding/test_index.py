"""Conformance of every hash-index backend with the HashIndex contract, against a dict.

Runs on the torch backend (CPU), the compiled cpu_ext backend, and on CUDA (torch, triton)
where a GPU is present.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gauss_plugins.embedding.index import IndexFullError

BACKENDS = [("torch", "cpu"), ("cpu_ext", "cpu"), pytest.param("triton", "cuda", marks=pytest.mark.gpu),
            pytest.param("torch", "cuda", marks=pytest.mark.gpu)]
EXTREMES = [-(2**63), 2**63 - 1, -1, 0, 1]

key_st = st.one_of(st.integers(-30, 30), st.sampled_from(EXTREMES), st.integers(-(2**63), 2**63 - 1))
op_st = st.tuples(st.sampled_from(["insert", "remove", "find"]), st.lists(key_st, min_size=0, max_size=24))


class DictIndex:
    """The contract, spelled out with a dict and a free-row stack."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.map = {}

    def insert(self, keys):
        new = [k for k in dict.fromkeys(keys) if k not in self.map]
        if len(self.map) + len(new) > self.capacity:
            return None
        return new


def _check_against(index, model: DictIndex, device):
    keys, rows = index.keys_and_rows()
    got = dict(zip(keys.cpu().tolist(), rows.cpu().tolist()))
    assert got == model.map
    assert len(index) == len(model.map)
    if got:
        assert len(set(got.values())) == len(got), "two keys share a row"
        assert min(got.values()) >= 0 and max(got.values()) < index.capacity


@pytest.mark.parametrize("name,device", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, min_size=1, max_size=25), capacity=st.integers(1, 40))
def test_random_operations_match_a_dict(index_factory, name, device, ops, capacity):
    index = index_factory(name, device, capacity)
    model = DictIndex(capacity)
    for op, keys in ops:
        t = torch.tensor(keys, dtype=torch.int64, device=device)
        if op == "find":
            expect = [model.map.get(k, -1) for k in keys]
            assert index.find(t).cpu().tolist() == expect
            assert index.find(t, default=-7).cpu().tolist() == [model.map.get(k, -7) for k in keys]
        elif op == "insert":
            new = model.insert(keys)
            if new is None:
                before = index.state_dict()
                with pytest.raises(IndexFullError):
                    index.insert(t)
                after = index.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before), "failed insert changed the index"
                continue
            rows, is_new = index.insert(t)
            rows, is_new = rows.cpu().tolist(), is_new.cpu().tolist()
            for k, r in zip(keys, rows):
                model.map.setdefault(k, r)
                assert model.map[k] == r, "one key, two rows"
            assert sorted(k for k, n in zip(keys, is_new) if n) == sorted(new)
        else:
            expect = [model.map.get(k, -1) for k in keys]
            assert index.remove(t).cpu().tolist() == expect
            for k in keys:
                model.map.pop(k, None)
        _check_against(index, model, device)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_large_churn_rehash_and_state_roundtrip(index_factory, name, device):
    g = torch.Generator().manual_seed(1)
    index = index_factory(name, device, 5000)
    model = {}
    for step in range(30):
        keys = torch.randint(-(2**62), 2**62, (800,), generator=g)
        keys[:200] = torch.randint(-300, 300, (200,), generator=g)
        if step % 3 == 2:
            rows = index.remove(keys.to(device)).cpu()
            for k, r in zip(keys.tolist(), rows.tolist()):
                assert r == model.get(k, -1)
            for k in keys.tolist():
                model.pop(k, None)
        else:
            if len(model) + 800 > index.capacity:
                index.rehash(index.capacity * 2)
            rows, _ = index.insert(keys.to(device))
            for k, r in zip(keys.tolist(), rows.cpu().tolist()):
                assert model.setdefault(k, r) == r
        assert len(index) == len(model)
    probe = torch.tensor(list(model)[:1000] + [123456789, -987654321], dtype=torch.int64)
    assert index.find(probe.to(device)).cpu().tolist() == [model.get(k, -1) for k in probe.tolist()]
    assert index.load_factor <= 0.75 + 1e-9

    # portable state: same keys, rows and allocator order in a fresh index of any backend
    state = index.state_dict()
    new_keys = torch.tensor([10**15 + i for i in range(50)])
    next_row = int(state["next_row"])
    expected = (state["free_rows"].tolist() + list(range(next_row, next_row + 50)))[:50]
    for other in ("torch", "cpu_ext"):
        fresh = index_factory(other, "cpu", 1)
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        assert all(torch.equal(state[k].cpu(), again[k].cpu()) for k in state), other
        # allocation follows the exported order: free rows first, then fresh ones
        assert fresh.insert(new_keys)[0].tolist() == expected, other


@pytest.mark.parametrize("name,device", BACKENDS)
def test_rehash_keeps_rows(index_factory, name, device):
    index = index_factory(name, device, 100)
    keys = torch.arange(-50, 50, device=device) * 7919
    rows, is_new = index.insert(keys)
    assert bool(is_new.all()) and sorted(rows.cpu().tolist()) == list(range(100))
    index.remove(keys[:10])
    index.rehash(1000)
    assert index.capacity == 1000 and index.num_slots >= 1000 / 0.75
    assert torch.equal(index.find(keys[10:]), rows[10:])
    assert bool((index.find(keys[:10]) == -1).all())
    with pytest.raises(ValueError, match="grow"):
        index.rehash(10)


@pytest.mark.parametrize("name,device", BACKENDS)
def test_bad_keys_are_refused(index_factory, name, device):
    index = index_factory(name, device, 10)
    index.insert(torch.tensor([1, 2], device=device))
    before = index.state_dict()
    with pytest.raises(TypeError, match="int64"):
        index.find(torch.tensor([1.0], device=device))
    with pytest.raises(TypeError, match="float ids"):
        index.insert(torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match="1-D"):
        index.insert(torch.tensor([[1, 2]], device=device))
    with pytest.raises(TypeError, match="int64"):
        index.remove(torch.tensor([1], dtype=torch.int32, device=device))
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="device|on cuda"):
            index.insert(torch.tensor([3], device="cuda"))
    after = index.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cpu_ext_refuses_cuda_and_reports_memory(index_factory):
    index = index_factory("cpu_ext", "cpu", 1000)
    index.insert(torch.arange(1000))
    # full: 12-byte slots at load factor 0.75 = 16 bytes per key (+ the small meta tensor)
    assert index.memory_bytes() / 1000 == pytest.approx(16, abs=0.1)
    from gauss_kernels.hash_table.cpu_ext import CpuHashIndex

    with pytest.raises(ValueError, match="CPU only"):
        CpuHashIndex(10, "cuda")


@pytest.mark.parametrize("name,device", BACKENDS)
def test_absent_keys_after_heavy_churn(index_factory, name, device):
    """Removals must not leave probe paths without an end (tombstone build-up)."""
    index = index_factory(name, device, 12)
    for round_ in range(20):
        keys = torch.arange(12, device=device) + 100 * round_
        index.insert(keys)
        index.remove(keys if round_ < 19 else keys[:2])
    absent = torch.arange(-50, -1, device=device)
    assert bool((index.find(absent) == -1).all())
    assert len(index) == 10
