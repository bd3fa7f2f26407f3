"""Change tracking and bounded eviction of DynamicEmbeddingTable (issue 10).

changed_since(v) must return exactly the live rows changed after v (through growth,
evictions, checkpoint loads and change-log overflow) while visiting O(changed) entries;
sampled eviction must respect capacity, report its victims, drop their optimizer state and
pick (approximately) the policy's lowest-scored rows without scanning the table.
"""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer
from gauss_plugins.embedding.checkpoint import load_table, save_table


def make(backend, **kw):
    base = dict(name="t", dim=4, initial_capacity=16, max_capacity=1 << 20, backend=backend,
                optimizer=OptimizerConfig("adagrad", lr=0.1))
    base.update(kw)
    return DynamicEmbeddingTable(DynamicTableConfig(**base))


def train_step(table, opt, ids):
    table.train()
    table(torch.as_tensor(ids, dtype=torch.int64)).sum().backward()
    opt.step()
    opt.zero_grad()


def by_scan(table, version):
    """The reference: every live row whose stamp is newer than ``version`` (a full scan)."""
    ids, rows = table.index.keys_and_rows()
    rel = version - table._stamp_base
    keep = table.row_stamps[rows].to(torch.int64) > rel if rel >= 0 else torch.ones_like(rows, dtype=torch.bool)
    return sorted(ids[keep].tolist())


def test_changed_since_is_exact_through_growth_eviction_and_deletes(backend):
    g = torch.Generator().manual_seed(0)
    t = make(backend, initial_capacity=8, max_capacity=600, eviction="lru", evict_fraction=0.0)
    opt = SparseOptimizer(t)
    marks = [t.version]
    touched = [set()]  # ids written after each mark
    for step in range(60):
        ids = torch.randint(-400, 400, (40,), generator=g)
        if step % 7 == 3:
            chosen = torch.unique(ids[:5])
            t.set(chosen, torch.randn(chosen.numel(), 4, generator=g))
            new = set(chosen.tolist())
        elif step % 11 == 5:
            t.delete(ids[:10])
            new = set()
        else:
            train_step(t, opt, ids)
            new = set(ids.tolist())
        for s in touched:
            s |= new
        marks.append(t.version)
        touched.append(set())
    assert t.capacity == 600 and len(t) <= 600  # it grew, then evicted
    assert t.evicted_since(marks[0]).numel() > 0
    live = set(t.index.keys_and_rows()[0].tolist())
    for v, ids_after in zip(marks, touched):
        got, values, state = t.changed_since(v)
        assert got.tolist() == by_scan(t, v) == sorted(ids_after & live)
        assert torch.equal(values.float(), t.get(got)[0])
        assert torch.equal(state["sum"], t.opt_state["sum"][t.find(got)])
    t.changed_since(marks[-2])
    assert 0 < t.last_changed_scan <= 2 * 40  # the last step's log entries, not the table


def test_pull_cost_does_not_grow_with_the_table(backend):
    visited = []
    for size in (2_000, 200_000):
        t = make(backend, initial_capacity=size, max_capacity=size * 2)
        opt = SparseOptimizer(t)
        t.set(torch.arange(size), torch.zeros(size, 4))
        v = t.version
        train_step(t, opt, torch.arange(0, 1000, 10))      # 100 rows read and updated
        t.set(torch.tensor([-1, -2]), torch.ones(2, 4))     # 2 rows inserted
        ids, _, _ = t.changed_since(v)
        assert ids.numel() == 102
        visited.append(t.last_changed_scan)
    assert visited[0] == visited[1] <= 4 * 102, visited
    # a version older than the log reaches back scans once, and is still exact
    t._changes.limit = 1
    train_step(t, opt, torch.tensor([10]))
    train_step(t, opt, torch.tensor([20]))
    ids, _, _ = t.changed_since(v)
    assert ids.numel() == 102 and t.last_changed_scan == len(t)


def test_reads_recorded_by_the_policy_are_changes(backend):
    """LFU records training reads: a read-only lookup changes the row (its count)."""
    t = make(backend, eviction="lfu")
    t.set(torch.arange(10), torch.zeros(10, 4))
    v = t.version
    t.train()
    with torch.no_grad():
        t(torch.tensor([3, 3, 4]))
        t.lookup_pooled(torch.tensor([7, 7, 8]), torch.tensor([0, 2, 3]))
    assert t.changed_since(v)[0].tolist() == [3, 4, 7, 8] == by_scan(t, v)


def test_changed_since_after_checkpoint_load(backend, tmp_path):
    t = make(backend, initial_capacity=8, eviction="lru")
    opt = SparseOptimizer(t)
    train_step(t, opt, torch.arange(20))
    v0 = t.version
    train_step(t, opt, torch.arange(15, 30))
    t.delete(torch.tensor([16, 17]))
    v1 = save_table(t, tmp_path / "full")
    fresh = make(backend, initial_capacity=8, eviction="lru")
    load_table(fresh, [tmp_path / "full"])
    # before the load's version: the stamps from the file answer (one scan)
    assert fresh.changed_since(v0)[0].tolist() == t.changed_since(v0)[0].tolist() == by_scan(t, v0)
    assert fresh.evicted_since(v0).tolist() == [16, 17]
    # after it: the fresh log
    opt2 = SparseOptimizer(fresh)
    train_step(fresh, opt2, torch.tensor([1, 2, 100]))
    assert fresh.changed_since(v1)[0].tolist() == [1, 2, 100]
    assert fresh.last_changed_scan <= 6
    # an incremental checkpoint applied on top is a change too
    train_step(t, opt, torch.tensor([40, 41]))
    save_table(t, tmp_path / "inc", since_version=v1)
    again = make(backend, initial_capacity=8, eviction="lru")
    load_table(again, [tmp_path / "full", tmp_path / "inc"])
    assert again.changed_since(v1)[0].tolist() == [40, 41] == by_scan(again, v1)


def test_syncer_pull_is_o_changed_and_sends_tombstones(backend):
    from gauss_plugins.stores.syncer import Syncer, TableSource
    from gauss_plugins.stores.weps import WePS

    t = make(backend, initial_capacity=50_000, max_capacity=50_000, eviction="lru", evict_fraction=0.0,
             eviction_options={"exact_below": 0})
    opt = SparseOptimizer(t)
    t.set(torch.arange(50_000), torch.zeros(50_000, 4))
    source = TableSource(t)
    weps = WePS(4)
    syncer = Syncer(source, weps, start=False)
    assert syncer.sync_now()
    with source.lock:
        train_step(t, opt, torch.arange(10**6, 10**6 + 30))  # full table: 30 evictions
    assert syncer.sync_now()
    pull = source.pulls[-1]
    assert pull["rows"] == 30 and pull["visited"] <= 2 * 30
    gone = t.evicted_since(0)
    assert gone.numel() == 30
    assert not weps.lookup(gone).found.any()
    assert weps.lookup(torch.arange(10**6, 10**6 + 30)).found.all()
    syncer.close()


# --------------------------------------------------------------------------- eviction
def fill_in_order(t, n, batch=1000):
    """Insert ids 0..n-1 in batches: id i's LRU rank is i // batch."""
    for s in range(0, n, batch):
        t.set(torch.arange(s, s + batch), torch.zeros(batch, 4))


@pytest.mark.parametrize("policy", ["lru", "lfu", "ttl"])
def test_sampled_eviction_keeps_invariants_and_approximate_order(backend, policy, monkeypatch):
    n, factor = 40_000, 8
    t = make(backend, initial_capacity=n, max_capacity=n, eviction=policy, evict_fraction=0.0,
             eviction_options={"sample_factor": factor, "exact_below": 0,
                               **({"ttl": 10**6} if policy == "ttl" else {})})
    opt = SparseOptimizer(t)
    fill_in_order(t, n)
    rows = t.find(torch.arange(n))
    if policy != "lru":  # score = id: the policy's own array
        t.eviction.rows[t.eviction.row_fields[0]][rows] = torch.arange(n, dtype=torch.int32)
    t.opt_state["sum"][rows] = 7.0  # a training step would give 1.0
    v = t.version
    # no full scan of the table during a training step that evicts
    monkeypatch.setattr(t.index, "keys_and_rows", lambda: pytest.fail("eviction scanned the whole table"))
    if t.index.fused is not None:
        monkeypatch.setattr(t.index.fused, "select_victims", lambda *a: pytest.fail("exact selection ran"))
    new = torch.arange(10**6, 10**6 + 500)
    train_step(t, opt, torch.cat([new, torch.arange(n - 100, n)]))
    monkeypatch.undo()
    assert len(t) == n == t.capacity
    victims = t.evicted_since(v)
    assert victims.numel() == 500
    assert not t.contains(victims).any() and t.contains(new).all()
    assert not bool(torch.isin(victims, torch.arange(n - 100, n)).any())  # the batch's rows are protected
    # approximate order: the 500 lowest of 4,000 sampled rows lie in the lowest ~1/8 of 40,000
    assert int(victims.max()) < 2 * n // factor and float(victims.float().mean()) < n // factor
    # their rows were reused by the new ids with fresh optimizer state
    assert torch.all(t.opt_state["sum"][t.find(new)] == 1.0)  # fresh state + one step
    assert torch.equal(t.changed_since(v)[0], torch.cat([torch.arange(n - 100, n), new]).sort().values)


def test_small_tables_and_sample_factor_zero_stay_exact(backend):
    for kw in ({"exact_below": 1 << 16}, {"sample_factor": 0, "exact_below": 0}):
        t = make(backend, initial_capacity=2000, max_capacity=2000, eviction="lru", eviction_options=kw)
        fill_in_order(t, 2000, batch=1)
        assert t.evict(num=25).tolist() == list(range(25))


def test_bad_eviction_options_are_refused():
    for bad in ({"sample_factor": -1}, {"expire_scan_rows": 0}, {"exact_below": 1.5}):
        with pytest.raises(ValueError, match="eviction option"):
            make("torch", eviction="lru", eviction_options=bad)


def test_automatic_expiry_sweeps_a_bounded_window(backend):
    t = make(backend, initial_capacity=1000, max_capacity=1000, eviction="ttl", auto_evict_every=1,
             eviction_options={"ttl": 1, "unit": "steps", "expire_scan_rows": 100})
    t.train()
    with torch.no_grad():
        t(torch.arange(1000))          # step 1: every row read
        t(torch.tensor([-1]))          # steps 2, 3: now every row but -1 is stale
        t(torch.tensor([-1]))
        sizes = [len(t)]
        for _ in range(10):
            t(torch.tensor([-1]))
            sizes.append(len(t))
    drops = [a - b for a, b in zip(sizes, sizes[1:])]
    assert max(drops) <= 100 and len(t) == 1 and t.contains(torch.tensor([-1])).all()
    assert t.evicted_since(0).numel() == 1000


def test_row_scratch_marks_stay_exact_across_token_wraparound():
    from gauss_plugins.embedding.tracking import RowScratch, distinct_rows

    scratch = RowScratch()
    g = torch.Generator().manual_seed(3)
    for _ in range(600):  # more calls than the 255 one-byte tokens
        marked = torch.randint(0, 1000, (50,), generator=g)
        probe = torch.randint(0, 1000, (200,), generator=g)
        got = scratch.marked(probe, scratch.mark(marked, 1000))
        assert torch.equal(got, torch.isin(probe, marked))
    rows = torch.randint(0, 1000, (500,), generator=g)
    assert torch.equal(distinct_rows(rows, scratch.get(1000, rows.device)).sort().values, torch.unique(rows))


# --------------------------------------------------------------------------- compiled paths
def _cpu_ops():
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():
        pytest.skip(f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}")
    return cpu_ext.load_ops()


def _fmix64(h):
    m = (1 << 64) - 1
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & m
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & m
    return h ^ (h >> 33)


def _sample_reference(stamp, scores, row_ids, protect, pos, limit, k, m):
    """sample_victims in Python: the same stream, runs of 8 rows, the k lowest (score, row)."""
    runs, blocks = (m + 7) // 8, (limit + 7) // 8
    seen = {int(r) for r in protect.tolist() if 0 <= r < limit}
    cand = []
    for i in range(runs):
        x = _fmix64(((pos + i + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
        start = (((x >> 32) * blocks) >> 32) * 8
        for r in range(start, min(start + 8, limit)):
            if stamp[r] < 0 or r in seen:
                continue
            seen.add(r)
            cand.append((int(scores[r]), r))
    chosen = sorted(cand)[:k]
    return sorted((int(row_ids[r]), r) for _, r in chosen), pos + runs


def test_compiled_sampled_victims_match_the_reference_and_refuse_bad_input():
    ops = _cpu_ops()
    g = torch.Generator().manual_seed(5)
    limit = 1003  # not a multiple of the run length: the last run is cut at the limit
    stamp = torch.randint(-1, 50, (limit + 1,), generator=g, dtype=torch.int32)  # -1: no key
    lfu = torch.randint(0, 30, (limit + 1,), generator=g, dtype=torch.int32)
    row_ids = torch.randperm(10 * limit, generator=g)[: limit + 1] - 5 * limit
    protect = torch.cat([torch.randint(0, limit, (200,), generator=g), torch.tensor([-1, -1])])
    for scores in (None, lfu):
        state = torch.tensor([12345], dtype=torch.int64)
        for k, m in ((40, 320), (5, 37), (0, 16), (500, 4000)):
            want, pos = _sample_reference(stamp, stamp if scores is None else scores, row_ids, protect,
                                          int(state), limit, k, m)
            ids, rows = ops.sample_victims(stamp, scores, row_ids, protect, state, limit, k, m)
            assert list(zip(ids.tolist(), rows.tolist())) == want
            assert int(state) == pos  # the stream moved on by the runs drawn
    # bad input: a clear error, and the stream position and the stamps are unchanged
    state = torch.tensor([7], dtype=torch.int64)
    before = stamp.clone()
    for bad in (dict(stamp=stamp.to(torch.int64)), dict(limit=limit + 5), dict(k=-1),
                dict(scores=lfu.to(torch.float32)), dict(row_ids=row_ids[:10])):
        args = dict(stamp=stamp, scores=None, row_ids=row_ids, protect=protect, rng_state=state, limit=limit,
                    k=4, m=32)
        args.update(bad)
        with pytest.raises(RuntimeError):
            ops.sample_victims(*args.values())
        assert int(state) == 7 and torch.equal(stamp, before)


def test_pull_helpers_agree_with_the_torch_paths():
    """gather_changed / rows_not_in (C++) give what the torch resolve gives, and a snapshot's
    deletions resolved without the index equal evicted_since at the snapshot."""
    ops = _cpu_ops()
    g = torch.Generator().manual_seed(1)
    t = make("cpu_ext", initial_capacity=300, max_capacity=300, eviction="lru", evict_fraction=0.0)
    opt = SparseOptimizer(t)
    marks = [t.version]
    for step in range(40):
        ids = torch.randint(0, 600, (60,), generator=g)
        if step % 9 == 4:
            t.delete(ids[:7])
        else:
            train_step(t, opt, ids)  # a full table: evictions, and evicted ids coming back
        marks.append(t.version)
    for v in marks:
        snap = t.change_snapshot(v, deletions=True)
        assert snap.resolved is None and snap.deleted is None  # the log reaches back: no work yet
        ids, rows, values = t.gather_change_snapshot(snap, t._scratch)
        want_ids, want_rows = t.resolve_change_snapshot(snap, t._scratch)
        order = want_ids.argsort()
        assert torch.equal(ids, want_ids[order]) and torch.equal(rows, want_rows[order])
        assert torch.equal(values, t.weight[rows]) and ids.tolist() == by_scan(t, v)
        assert torch.equal(t.resolve_deleted(snap), t.evicted_since(v))
        later = t.rows_written_after(v)
        keep = ops.rows_not_in(rows, later, t.row_stamps.numel()) if later else torch.ones_like(rows, dtype=torch.bool)
        written = torch.cat(later) if later else rows[:0]
        assert torch.equal(keep, ~torch.isin(rows, written))
    with pytest.raises(RuntimeError, match="outside"):
        ops.rows_not_in(torch.tensor([0]), [torch.tensor([10**6])], 10)


def test_deletions_resolved_after_the_lock_are_those_at_the_snapshot(backend):
    """Evictions and re-insertions after a snapshot do not change what it resolves to."""
    t = make(backend, initial_capacity=64, max_capacity=64, eviction="lru", evict_fraction=0.0)
    opt = SparseOptimizer(t)
    train_step(t, opt, torch.arange(64))
    v0 = t.version
    train_step(t, opt, torch.arange(100, 110))       # evicts 10 of 0..63
    t.delete(torch.tensor([100]))
    gone = t.evicted_since(v0)
    snap = t.change_snapshot(v0, deletions=True)
    train_step(t, opt, gone[:3])                     # three come back after the snapshot
    train_step(t, opt, torch.tensor([100]))
    assert torch.equal(t.resolve_deleted(snap), gone)
    assert not torch.equal(t.evicted_since(v0), gone)
    with pytest.raises(ValueError, match="resync fully"):
        t.trim_tombstones(t.version)
        t.change_snapshot(v0, deletions=True)
