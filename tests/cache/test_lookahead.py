"""LookaheadCache: the agreed API, its invariants (property tests) and its baselines."""
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from gauss_plugins.cache import BudgetError, CacheConfig, LookaheadCache
from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, SparseOptimizer
from gauss_plugins.embedding.backing import pack_state
from gauss_plugins.plugins import get_registry
from gauss_plugins.stores.tierps import TierPS

DIM = 4


def _table(capacity, name="items"):
    return DynamicEmbeddingTable(DynamicTableConfig(name=name, dim=DIM, optimizer="rowwise_adagrad",
                                                    initial_capacity=min(16, capacity), max_capacity=capacity))


def _store(path, ram_rows=8):
    # A RAM tier of a few rows: most rows the cache evicts go to the disk tier.
    return TierPS(dim=DIM, state_dim=1, path=path, ram_bytes=ram_rows * (4 * (DIM + 1) + 25))


def _step(table, opt, ids):
    target = torch.sin(ids.to(torch.float32))[:, None]  # rows move apart, each to its own target
    loss = (table(ids) - target).pow(2).sum()
    loss.backward()
    opt.step()


def _reference(batches):
    table = _table(1 << 12)
    opt = SparseOptimizer(table)
    table.train()
    for ids in batches:
        _step(table, opt, ids)
    return table


class _Checked:
    """Trains through the cache and checks, at every point it can see, that no row is used
    while absent and that the budget holds (installs and evictions included)."""

    def __init__(self, table, cache, budget):
        self.table, self.cache, self.budget = table, cache, budget
        self.max_len = 0
        backing = table.backing
        install = backing.install

        def checked_install(t, ids, got, **kw):
            rows = install(t, ids, got, **kw)
            self.max_len = max(self.max_len, len(t))
            assert len(t) <= budget, f"{len(t)} rows resident, budget {budget}"
            return rows
        backing.install = checked_install

    def run(self, batches):
        opt = SparseOptimizer(self.table)
        self.table.train()
        for ids in self.cache.wrap(batches):
            assert bool((self.table.find(ids) >= 0).all()), "a row was used while absent"
            assert len(self.table) <= self.budget
            _step(self.table, opt, ids)
            self.cache.step_done()
            assert len(self.table) <= self.budget


def _rows_everywhere(table, store, ids):
    values, present = table.get(ids)
    rows = table.find(ids)
    state = torch.zeros(ids.numel(), 1)
    if bool(present.any()):
        state[present] = pack_state(table, rows[present])
    if not bool(present.all()):
        got = store.lookup(ids[~present])
        assert bool(got.found.all()), "a trained row is neither resident nor in the store (lost on eviction)"
        values[~present], state[~present] = got.values, got.state
    return values, state


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_ids=st.integers(4, 60), batch=st.integers(1, 16), steps=st.integers(1, 14), window=st.integers(1, 5),
       budget=st.integers(1, 40), policy=st.sampled_from(["lookahead", "lru", "lfu"]), prefetch=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cache_invariants_and_equality_with_an_unbounded_table(num_ids, batch, steps, window, budget, policy,
                                                               prefetch, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, num_ids, (batch,), generator=gen) for _ in range(steps)]
    biggest = max(torch.unique(b).numel() for b in batches)
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(tmp)
        table = _table(budget)
        cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=budget, window=window, policy=policy,
                                                                   prefetch=prefetch), ids_fn=lambda b: {"items": b})
        checked = _Checked(table, cache, budget)
        if biggest > budget:
            with pytest.raises(BudgetError, match="budget_rows"):
                checked.run(batches)
            cache.close()
            store.close()
            return
        checked.run(batches)
        stats = cache.stats()
        if policy == "lookahead":
            assert stats["misses_at_use"] == 0
        assert stats["steps"] == steps
        cache.flush()
        ref = _reference(batches)
        seen = torch.unique(torch.cat(batches))
        values, state = _rows_everywhere(table, store, seen)
        torch.testing.assert_close(values, ref.get(seen)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(state, pack_state(ref, ref.find(seen)), atol=1e-6, rtol=0)
        cache.close()
        store.close()


def _zipf_batches(n_ids, n_batches, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, n_ids + 1, dtype=torch.float64) ** 1.1
    return [torch.multinomial(p, batch, replacement=True, generator=gen) for _ in range(n_batches)]


def test_lookahead_prefetches_everything_and_beats_fetch_on_miss(tmp_path):
    batches = _zipf_batches(2000, 40, 64)
    out = {}
    for policy in ("lookahead", "lru", "lfu"):
        store = _store(str(tmp_path / policy), ram_rows=64)
        table = _table(200)
        with LookaheadCache({"items": table}, store, CacheConfig(budget_rows=200, window=6, policy=policy),
                            ids_fn=lambda b: {"items": b}) as cache:
            _Checked(table, cache, 200).run(batches)
            out[policy] = cache.stats()
        store.close()
    la = out["lookahead"]
    assert la["misses_at_use"] == 0 and la["prefetched_rows"] > 0 and la["prefetched_bytes"] == la["prefetched_rows"] * 4 * (DIM + 1)
    assert la["hits_at_use"] == sum(torch.unique(b).numel() for b in batches)
    assert la["evicted_rows"] > 0 and la["written_back_rows"] > 0
    assert max(s["window"] for s in la["per_step"]) > 1
    for baseline in ("lru", "lfu"):
        assert out[baseline]["misses_at_use"] > 0 and out[baseline]["prefetched_rows"] == 0
        assert all(s["window"] == 1 for s in out[baseline]["per_step"])
    assert len(la["per_step"]) == 40 and set(la["per_step"][0]) >= {"hits_at_use", "stall_ms", "window"}


def test_window_shrinks_when_the_budget_is_tight_and_grows_back(tmp_path):
    # Batches of 10 distinct ids, budget 25: two batches fit, three do not.
    small = [torch.arange(10 * i, 10 * i + 10) for i in range(6)]
    tiny = [torch.tensor([0]) for _ in range(6)]
    store = _store(str(tmp_path / "s"))
    table = _table(25)
    cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=25, window=4),
                           ids_fn=lambda b: {"items": b})
    _Checked(table, cache, 25).run(small + tiny)
    windows = [s["window"] for s in cache.stats()["per_step"]]
    assert windows[:4] == [2, 2, 2, 2] and windows[4] == 4, windows  # the tiny batches behind fit again
    cache.close()
    c2 = LookaheadCache({"items": _table(25, "b")}, _store(str(tmp_path / "b")),
                        CacheConfig(budget_rows=25, window=4, min_window=3), ids_fn=lambda b: {"items": b})
    with pytest.raises(BudgetError, match="min_window"):
        list(c2.wrap(small))
    c2.close()


def test_rows_changed_between_iterations_are_seen_and_policy_state_is_kept(tmp_path):
    """The cache keeps its own record of the rows it holds; a new iteration starts from what
    the table holds (evaluation installs rows and drops others between iterations), keeping
    the policy state of the rows it knew."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 60, (12,), generator=gen) for _ in range(16)]
    store = _store(str(tmp_path / "s"))
    table = _table(30)
    cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=30, window=3),
                           ids_fn=lambda b: {"items": b})
    checked = _Checked(table, cache, 30)
    checked.run(batches[:8])
    record = cache._tables["items"].rows
    assert sorted(record.index.keys_and_rows()[0].tolist()) == sorted(table.index.keys_and_rows()[0].tolist())
    keys = table.index.keys_and_rows()[0]
    dropped, kept = keys[:5], keys[5:]
    table.evict(ids=dropped)                       # as evaluation drops rows behind the cache's back
    rebuilt = record.rebuilt(kept, 30)             # what the next wrap() does
    for name in ("last_use", "uses"):
        assert torch.equal(getattr(rebuilt, name)[rebuilt.find(kept)], getattr(record, name)[record.find(kept)])
    assert bool((rebuilt.find(dropped) < 0).all())
    checked.run(batches[8:])                       # a new iteration: no row used while absent
    assert cache.stats()["misses_at_use"] == 0
    record = cache._tables["items"].rows
    assert sorted(record.index.keys_and_rows()[0].tolist()) == sorted(table.index.keys_and_rows()[0].tolist())
    cache.close()
    store.close()


def test_bad_arguments_leave_tables_untouched(tmp_path):
    store = _store(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="max_capacity"):
        LookaheadCache({"items": _table(10)}, store, CacheConfig(budget_rows=20), ids_fn=lambda b: b)
    t = DynamicEmbeddingTable(DynamicTableConfig(name="c", dim=DIM, optimizer="rowwise_adagrad", admission="counting"))
    with pytest.raises(ValueError, match="admission='always'"):
        LookaheadCache({"c": t}, store, CacheConfig(budget_rows=20), ids_fn=lambda b: b)
    assert t.backing is None
    first, second = _table(64, "first"), _table(64, "second")
    bad = TierPS(dim=DIM + 1, state_dim=1, path=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="do not fit"):
        LookaheadCache({"first": first, "second": second}, {"first": store, "second": bad},
                       CacheConfig(budget_rows=20), ids_fn=lambda b: b)
    assert first.backing is None and second.backing is None  # the first one was detached again
    bad.close()
    with pytest.raises(ValueError, match="no store"):
        LookaheadCache({"items": _table(64)}, {"other": store}, CacheConfig(budget_rows=20), ids_fn=lambda b: b)
    with pytest.raises(ValueError, match="budget_rows"):
        CacheConfig(budget_rows=0)
    with pytest.raises(ValueError, match="min_window"):
        CacheConfig(budget_rows=4, window=2, min_window=3)
    with pytest.raises(LookupError):
        LookaheadCache({"items": _table(64)}, store, CacheConfig(budget_rows=20, policy="nope"), ids_fn=lambda b: b)
    store.close()


def test_policies_are_registered_components():
    names = {c.name for c in get_registry().components("cache_policy")}
    assert {"lookahead", "lru", "lfu"} <= names
    assert get_registry().create("cache_policy", "lookahead").lookahead


def test_owner_fn_limits_write_back(tmp_path):
    store = _store(str(tmp_path / "s"))
    table = _table(8)
    batches = [torch.arange(8 * i, 8 * i + 8) for i in range(4)]
    cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=8, window=1),
                           ids_fn=lambda b: {"items": b}, exchange=lambda ids: ids,
                           owner_fn=lambda ids: ids % 2 == 0)
    _Checked(table, cache, 8).run(batches)
    cache.flush()
    got = store.lookup(torch.arange(32))
    assert got.found.tolist() == [i % 2 == 0 for i in range(32)]  # odd rows are another replica's
    cache.close()
    store.close()


def test_a_cache_dropped_without_close_stops_its_thread(tmp_path):
    import gc
    import threading

    store = _store(str(tmp_path / "s"))
    before = sum(t.name == "gauss-lookahead-cache" for t in threading.enumerate())
    cache = LookaheadCache({"items": _table(16)}, store, CacheConfig(budget_rows=16), ids_fn=lambda b: {"items": b})
    assert sum(t.name == "gauss-lookahead-cache" for t in threading.enumerate()) == before + 1
    del cache
    gc.collect()
    for t in threading.enumerate():
        if t.name == "gauss-lookahead-cache":
            t.join(timeout=5)
    assert sum(t.name == "gauss-lookahead-cache" for t in threading.enumerate()) == 0
    store.close()


class _GatedStore:
    """A store whose writes wait for ``gate``: a write-back still queued on the worker."""

    def __init__(self, store):
        import threading

        self.inner, self.gate = store, threading.Event()
        self.dim, self.state_dim = store.dim, store.state_dim

    def put(self, ids, values, state=None):
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.put(ids, values, state)

    def lookup(self, ids):
        return self.inner.lookup(ids)

    def delete(self, ids):
        return self.inner.delete(ids)


@pytest.mark.parametrize("owner_serves_reads", [False, True])
def test_drain_before_exchange_only_for_a_store_other_replicas_read(tmp_path, owner_serves_reads):
    import threading

    store = _GatedStore(_store(str(tmp_path / "s"), ram_rows=64))
    table = _table(16)
    batches = [torch.arange(8 * i, 8 * i + 8) for i in range(4)] + [torch.arange(0, 8)]
    cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=16, window=2),
                           ids_fn=lambda b: {"items": b}, exchange=lambda ids: ids,
                           owner_fn=lambda ids: torch.ones_like(ids, dtype=torch.bool),
                           owner_serves_reads=owner_serves_reads)
    opt = SparseOptimizer(table)
    table.train()
    it = cache.wrap(batches)
    _step(table, opt, next(it))
    _step(table, opt, next(it))   # admitting batch 2 evicted batch 0's rows: their write waits at the gate
    done = threading.Thread(target=cache.step_done)  # pulls batch 3 (the exchange) and admits it
    done.start()
    done.join(timeout=1.0)
    # A shared store must drain the write first; a store whose owner serves the reads need not.
    assert done.is_alive() == (not owner_serves_reads)
    store.gate.set()
    done.join(timeout=30)
    for ids in it:
        _step(table, opt, ids)
    cache.close()
    ref = _reference(batches)
    got = store.inner.lookup(torch.arange(32))
    assert got.found.all()
    # Batch 4 re-reads batch 0's ids after their write-back: it saw the written rows.
    assert torch.allclose(got.values, ref.get(torch.arange(32))[0], atol=1e-6)
    store.inner.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_ids=st.integers(4, 60), batch=st.integers(1, 12), steps=st.integers(1, 12), window=st.integers(1, 5),
       budget=st.integers(1, 30), prefetch=st.booleans(), seed=st.integers(0, 2**16))
def test_partitioned_replicas_cache_only_owned_rows_in_lockstep(num_ids, batch, steps, window, budget, prefetch,
                                                                seed):
    """Two replicas with ``owned_only`` caches, simulated in one process: each replica's batch is
    one half of every global batch, ``exchange`` hands each the two halves' ids (as a strategy's
    all-gather would). Each replica holds only rows it owns, every owned id of the global batch
    is resident at use, the budget holds, both make the same number of exchanges (a collective)
    at every step even when one's window shrinks and the other's does not, and the rows they
    train (each its own ids' gradients of the whole global batch) equal one unbounded table
    trained on the global batches."""
    gen = torch.Generator().manual_seed(seed)
    halves = [[torch.randint(0, num_ids, (batch,), generator=gen) for _ in range(2)] for _ in range(steps)]
    owned = [lambda ids, r=r: ids % 2 == r for r in range(2)]
    budget = max([budget] + [int(owned[r](torch.unique(torch.cat(h))).sum()) for h in halves for r in range(2)])
    calls = [0, 0]

    def exchange_for(rank):
        def exchange(ids):
            k = calls[rank]
            calls[rank] += 1
            assert torch.equal(ids, torch.unique(halves[k][rank])), "a replica exchanged another batch's ids"
            return [torch.unique(h) for h in halves[k]]
        return exchange

    with tempfile.TemporaryDirectory() as tmp:
        stores = [_store(f"{tmp}/r{r}") for r in range(2)]
        tables = [_table(budget) for _ in range(2)]
        caches = [LookaheadCache({"items": tables[r]}, stores[r], CacheConfig(budget_rows=budget, window=window,
                                                                               prefetch=prefetch),
                                 ids_fn=lambda b: {"items": b}, exchange=exchange_for(r), owner_fn=owned[r],
                                 owned_only=True) for r in range(2)]
        opts = [SparseOptimizer(t) for t in tables]
        gens = [caches[r].wrap([h[r] for h in halves]) for r in range(2)]
        for k in range(steps):
            got = [next(g) for g in gens]
            assert calls[0] == calls[1], "the replicas made different numbers of exchanges (collectives)"
            whole = torch.cat(halves[k])
            for r in range(2):
                assert torch.equal(got[r], halves[k][r])
                keys, _ = tables[r].index.keys_and_rows()
                assert bool(owned[r](keys).all()), "a replica holds a row it does not own"
                assert len(tables[r]) <= budget
                mine = whole[owned[r](whole)]
                assert bool((tables[r].find(mine) >= 0).all()), "an owned row was used while absent"
                assert torch.equal(caches[r].batch_ids()["items"], torch.unique(mine))
                if mine.numel():
                    tables[r].train()
                    _step(tables[r], opts[r], mine)
                caches[r].step_done()
        for g in gens:
            assert next(g, None) is None
        assert all(c.stats()["misses_at_use"] == 0 for c in caches)
        ref = _reference([torch.cat(h) for h in halves])
        for r in range(2):
            caches[r].flush()
            seen = torch.unique(torch.cat([torch.cat(h) for h in halves]))
            seen = seen[owned[r](seen)]
            values, state = _rows_everywhere(tables[r], stores[r], seen)
            torch.testing.assert_close(values, ref.get(seen)[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(state, pack_state(ref, ref.find(seen)), atol=1e-6, rtol=0)
            caches[r].close()
            stores[r].close()


def test_owned_only_needs_exchange_and_owner(tmp_path):
    store = _store(str(tmp_path / "s"))
    table = _table(8)
    with pytest.raises(ValueError, match="owned_only"):
        LookaheadCache({"items": table}, store, CacheConfig(budget_rows=8), ids_fn=lambda b: {"items": b},
                       exchange=lambda ids: [ids], owned_only=True)
    assert table.backing is None  # refused before anything was attached
    store.close()
