"""WePS embedded: lookups against a dict model under random pushes, snapshots, bad input."""
from __future__ import annotations

import threading

import pytest
import torch

from gauss_plugins.stores.base import ChangeBatch
from gauss_plugins.stores.weps import WePS


def _check(store, model, space, default):
    q = torch.tensor(space)
    got = store.lookup(q)
    for j, i in enumerate(space):
        if i in model:
            assert got.found[j] and torch.equal(got.values[j], model[i]), i
        else:
            assert not got.found[j] and torch.equal(got.values[j], default), i
    assert len(store) == len(model)


@pytest.mark.parametrize("max_layers,merge_fraction", [(1, 0.25), (3, 10.0), (6, 0.25)])
def test_random_pushes_match_a_dict(max_layers, merge_fraction):
    g = torch.Generator().manual_seed(max_layers)
    store = WePS(3, default=[1.0, 2.0, 3.0], max_layers=max_layers, merge_fraction=merge_fraction, retain=100)
    model = {}
    space = list(range(-40, 40)) + [-(2 ** 63), 2 ** 63 - 1]
    for step in range(60):
        ids = torch.tensor(space)[torch.randint(0, len(space), (12,), generator=g)]
        vals = torch.randn(12, 3, generator=g)
        deleted = torch.tensor(space)[torch.randint(0, len(space), (4,), generator=g)]
        store.apply_changes(ChangeBatch(ids, vals, None, deleted, version=step + 1))
        for i in deleted.tolist():
            model.pop(i, None)
        for i, v in zip(ids.tolist(), vals):  # an upsert in the same push wins over its tombstone
            model[i] = v
        assert store.version == step + 1
        _check(store, model, space, torch.tensor([1.0, 2.0, 3.0]))
    assert store.stats()["layers"] <= max_layers + 1
    exported = {i: v for b in store.export(batch_size=7) for i, v in zip(b.ids.tolist(), b.values)}
    assert exported.keys() == model.keys()


def test_snapshots_are_immutable_and_addressable():
    store = WePS(2, retain=2)
    store.put([1, 2], torch.ones(2, 2))
    v1 = store.version
    snap1 = store.snapshot()
    store.delete([1])
    store.put([2, 3], torch.full((2, 2), 5.0))
    assert snap1.lookup([1, 2, 3]).found.tolist() == [True, True, False]
    assert torch.equal(snap1.get([2]), torch.ones(1, 2))
    assert store.lookup([1, 2, 3]).found.tolist() == [False, True, True]
    assert store.snapshot(store.version) is store.snapshot()
    with pytest.raises(KeyError, match="not retained"):
        store.snapshot(v1)  # retain=2: only the last two versions


def test_bad_input_changes_nothing():
    store = WePS(2)
    store.put([1], torch.ones(1, 2))
    before = store.version
    with pytest.raises(ValueError):
        store.put([1, 2], torch.ones(3, 2))
    with pytest.raises(TypeError):
        store.put(torch.tensor([1.0]), torch.ones(1, 2))
    with pytest.raises(ValueError):
        store.put(torch.tensor([[1]]), torch.ones(1, 2))
    with pytest.raises(ValueError):
        store.apply_changes(ChangeBatch(torch.tensor([9]), torch.ones(1, 2), None, torch.empty(0, dtype=torch.int64), 0))
    assert store.version == before and len(store) == 1
    with pytest.raises(ValueError):
        WePS(0)
    with pytest.raises(ValueError):
        WePS(2, default=[1.0, 2.0, 3.0])


def test_readers_never_see_half_a_push():
    """Each push writes the same value to all ids; a reader must never see two values mixed."""
    store = WePS(1, max_layers=2, merge_fraction=0.5)
    ids = torch.arange(2000)
    store.apply_changes(ChangeBatch(ids, torch.zeros(2000, 1), None, torch.empty(0, dtype=torch.int64), 1))
    stop = threading.Event()
    torn = []

    def reader():
        while not stop.is_set():
            v = store.get(ids)
            if not bool((v == v[0]).all()):
                torn.append(v.unique().tolist())

    t = threading.Thread(target=reader)
    t.start()
    for step in range(2, 60):
        store.apply_changes(ChangeBatch(ids, torch.full((2000, 1), float(step)), None,
                                        torch.empty(0, dtype=torch.int64), step))
    stop.set()
    t.join()
    assert not torn


def test_state_is_kept():
    store = WePS(2, state_dim=1)
    store.put([7], torch.ones(1, 2), state=torch.full((1, 1), 3.0))
    got = store.lookup([7, 8])
    assert got.state.tolist() == [[3.0], [0.0]]
