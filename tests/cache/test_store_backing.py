"""A table backed by TierPS: evicted rows (with optimizer state) go to the store and come
back on re-admission, so training through a small table equals an unbounded one."""
import pytest
import torch

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, SparseOptimizer
from gauss_plugins.embedding.backing import pack_state
from gauss_plugins.stores.tierps import TierPS


def _table(name="t", dim=8, optimizer="rowwise_adagrad", **kw):
    return DynamicEmbeddingTable(DynamicTableConfig(name=name, dim=dim, optimizer=optimizer, **kw))


def _train(table, batches, lr_target):
    opt = SparseOptimizer(table)
    table.train()
    for ids in batches:
        out = table(ids)
        loss = (out - lr_target).pow(2).sum()
        loss.backward()
        opt.step()


def _all_rows(table, ids):
    """Values and state of ``ids`` wherever they live (table first, else its store)."""
    values, present = table.get(ids)
    if table.backing is not None and not bool(present.all()):
        got = table.backing.store.lookup(ids[~present])
        assert bool(got.found.all()), "a row trained before is neither in the table nor in its store"
        values[~present] = got.values
    return values


@pytest.mark.parametrize("optimizer,state_dim", [("rowwise_adagrad", 1), ("adam", 17), ("sgd", 0)])
def test_evict_most_rows_then_train_equals_unbounded(tmp_path, optimizer, state_dim):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 400, (48,), generator=gen) for _ in range(60)]
    unbounded = _table(optimizer=optimizer, initial_capacity=512, max_capacity=1 << 12)
    small = _table(optimizer=optimizer, initial_capacity=64, max_capacity=64, eviction="lru", evict_fraction=0.25)
    # A RAM tier of ~20 rows: most evicted rows sit on the disk tier (a cold store).
    store = TierPS(dim=8, state_dim=state_dim, path=str(tmp_path / "ps"), ram_bytes=20 * (4 * (8 + state_dim) + 25))
    backing = small.attach_store(store)
    _train(unbounded, batches[:30], 0.5)
    _train(small, batches[:30], 0.5)
    assert len(small) <= 64 and backing.counters["evicted_rows"] > 300
    small.evict(ids=small.index.keys_and_rows()[0])  # evict every row, then keep training
    assert len(small) == 0
    _train(unbounded, batches[30:], 0.5)
    _train(small, batches[30:], 0.5)
    assert backing.counters["restored_rows"] > 0
    seen = torch.unique(torch.cat(batches))
    torch.testing.assert_close(_all_rows(small, seen), unbounded.get(seen)[0], atol=1e-6, rtol=0)
    # The optimizer state came back too: it equals the unbounded table's, row by row.
    small.detach_store()          # flush: the store now holds every trained row
    got = store.lookup(seen)
    assert bool(got.found.all())
    if state_dim:
        rows = unbounded.find(seen)
        torch.testing.assert_close(got.state, pack_state(unbounded, rows), atol=1e-6, rtol=0)
    store.close()


def test_only_changed_rows_are_written_and_delete_reaches_the_store(tmp_path):
    table = _table(initial_capacity=16, max_capacity=16, eviction="lru")
    store = TierPS(dim=8, state_dim=1, path=str(tmp_path / "ps"))
    backing = table.attach_store(store)
    table.train()
    with torch.no_grad():
        table(torch.arange(8))             # inserted, never updated: recreated from the seed
    table.evict(ids=torch.arange(8))
    assert backing.counters["written_back_rows"] == 0 and len(store) == 0
    _train(table, [torch.arange(4)], 1.0)
    table.evict(ids=torch.arange(4))
    assert backing.counters["written_back_rows"] == 4 and len(store) == 4
    _train(table, [torch.tensor([1])], 1.0)  # re-admitted from the store
    assert backing.counters["restored_rows"] == 1
    table.delete(torch.tensor([1, 2]))
    assert not bool(store.lookup(torch.tensor([1, 2])).found.any())
    table.set(torch.tensor([100]), torch.ones(1, 8))
    assert backing.flush(table) == 1 and bool(store.lookup(torch.tensor([100])).found.all())
    assert backing.flush(table) == 0  # clean now
    store.close()


def test_store_that_does_not_fit_is_refused(tmp_path):
    table = _table(optimizer="adam")
    store = TierPS(dim=8, state_dim=1, path=str(tmp_path / "ps"))
    with pytest.raises(ValueError, match="state_dim=17"):
        table.attach_store(store)
    assert table.backing is None
    with pytest.raises(TypeError, match="lookup"):
        table.attach_store(object())
    store.close()


def test_syncer_reads_evicted_rows_from_the_store(tmp_path):
    from gauss_plugins.stores.syncer import TableSource

    table = _table(initial_capacity=16, max_capacity=16, eviction="lru")
    store = TierPS(dim=8, state_dim=1, path=str(tmp_path / "ps"))
    table.attach_store(store)
    source = TableSource(table)
    v0 = source.version
    _train(table, [torch.arange(6)], 1.0)
    table.evict(ids=torch.arange(3))
    table.delete(torch.tensor([5]))
    batch = source.changes_since(v0)
    assert batch.ids.tolist() == [0, 1, 2, 3, 4]            # evicted rows are changes, not deletions
    assert batch.deleted.tolist() == [5]
    torch.testing.assert_close(batch.values[:3], store.lookup(torch.arange(3)).values)
    full = source.changes_since(0, full=True)
    assert full.ids.tolist() == [0, 1, 2, 3, 4]
    store.close()


@pytest.mark.parametrize("eval_unknown", ["default", "init"])
def test_eval_reads_evicted_rows_from_the_store(tmp_path, eval_unknown):
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 200, (32,), generator=gen) for _ in range(20)]
    unbounded = _table(initial_capacity=256, max_capacity=1024, eval_unknown=eval_unknown)
    small = _table(initial_capacity=32, max_capacity=32, eviction="lru", eval_unknown=eval_unknown)
    store = TierPS(dim=8, state_dim=1, path=str(tmp_path / "ps"), ram_bytes=10 * (4 * 9 + 25))
    small.attach_store(store)
    _train(unbounded, batches, 0.5)
    _train(small, batches, 0.5)
    unbounded.eval()
    small.eval()
    probe = torch.arange(-5, 210)        # trained ids, evicted ones among them, and never-seen ids
    assert int((small.find(probe) < 0).sum()) > 150
    torch.testing.assert_close(small(probe), unbounded(probe), atol=1e-6, rtol=0)
    offsets = torch.arange(0, probe.numel() + 1, 5)
    torch.testing.assert_close(small.lookup_pooled(probe, offsets, mode="mean"),
                               unbounded.lookup_pooled(probe, offsets, mode="mean"), atol=1e-6, rtol=0)
    assert len(small) <= 32              # eval read the store without inserting anything
    store.close()


def test_eviction_of_known_live_rows_hands_every_row_and_its_dirty_flag_to_write_later(tmp_path):
    """``evict(ids, live_distinct=True)`` with a deferred writer (the lookahead cache's): the
    writer gets copies of every evicted row with a flag saying which changed (no read back of
    the mask on the device); writing the flagged ones equals the immediate write-back."""
    table = _table(initial_capacity=16, max_capacity=16)
    store = TierPS(dim=8, state_dim=1, path=str(tmp_path / "ps"))
    backing = table.attach_store(store)
    table.train()
    with torch.no_grad():
        table(torch.arange(8))                 # clean: recreated from the seed
    _train(table, [torch.tensor([2, 5])], 1.0)  # changed
    handed = []
    backing.write_later = lambda event, ids, values, state, dirty: handed.append((event, ids, values, state, dirty))
    victims = torch.tensor([5, 1, 2])
    expected = table.get(victims)[0]
    assert torch.equal(table.evict(ids=victims, live_distinct=True), victims)
    (event, ids, values, state, dirty), = handed
    assert event is None and torch.equal(ids, victims) and dirty.tolist() == [True, False, True]
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    assert state.shape == (3, 1) and len(store) == 0 and len(table) == 5
    assert not bool(table.contains(victims).any())
    backing.write_later = None                 # the immediate path for a plain eviction
    table.evict(ids=torch.tensor([0, 3]))
    assert backing.counters["written_back_rows"] == 0  # both clean
    store.close()
