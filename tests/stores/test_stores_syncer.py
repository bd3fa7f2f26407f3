"""The syncer with the embedded WePS: pushes, tombstones, dense manifests, outages, spills."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from gauss_plugins.stores.base import ChangeBatch
from gauss_plugins.stores.syncer import Syncer, load_dense, read_manifest
from gauss_plugins.stores.tierps import TierPS
from gauss_plugins.stores.weps import WePS


class FlakyWePS(WePS):
    """A WePS that can be switched off: every call then raises ConnectionError, and
    switching it back on may come with lost data (a restart without persistence)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.down = False
        self.incarnation = 0

    def apply_changes(self, batch: ChangeBatch) -> None:
        if self.down:
            raise ConnectionError("serving store is down")
        super().apply_changes(batch)

    def instance_id(self) -> str:
        if self.down:
            raise ConnectionError("serving store is down")
        return str(self.incarnation)

    def restart_empty(self) -> None:
        WePS.__init__(self, self.dim)
        self.down = False
        self.incarnation += 1


def _same(ps, weps):
    rows = {i: v for b in ps.export() for i, v in zip(b.ids.tolist(), b.values)}
    got = {i: v for b in weps.export() for i, v in zip(b.ids.tolist(), b.values)}
    return rows.keys() == got.keys() and all(torch.equal(rows[i], got[i]) for i in rows)


def test_push_changes_and_tombstones(tmp_path):
    ps = TierPS(4, str(tmp_path / "ps"))
    weps = WePS(4)
    syncer = Syncer(ps, weps, start=False)
    ps.put(torch.arange(10), torch.randn(10, 4))
    assert syncer.sync_now()
    assert _same(ps, weps) and weps.version == ps.version
    ps.delete([1, 2])
    ps.put([3, 50], torch.ones(2, 4))
    assert syncer.sync_now()
    assert _same(ps, weps)
    assert weps.lookup([1, 2]).found.tolist() == [False, False]
    report = syncer.reports[-1]
    assert report["rows"] == 2 and report["deleted"] == 2 and report["bytes"] > 0
    assert 0 <= report["freshness_p50_s"] <= report["freshness_p99_s"] < 5
    assert 0 < report["cycle_cpu_s"] < 5  # the thread's CPU time for the pull and the push
    syncer.close()
    ps.close()


def test_background_thread_pushes_every_interval(tmp_path):
    ps = TierPS(4, str(tmp_path / "ps"))
    weps = WePS(4)
    with Syncer(ps, weps, interval_s=0.05) as syncer:
        ps.put(torch.arange(100), torch.randn(100, 4))
        deadline = time.monotonic() + 10
        while weps.version != ps.version and time.monotonic() < deadline:
            time.sleep(0.01)
        assert weps.version == ps.version
        assert syncer.stats()["freshness_p99_s"] < 5
    ps.close()


def test_outage_coalesces_spills_and_loses_nothing(tmp_path):
    ps = TierPS(4, str(tmp_path / "ps"))
    weps = FlakyWePS(4)
    syncer = Syncer(ps, weps, start=False, max_pending_bytes=2000, spill_dir=str(tmp_path / "spill"))
    ps.put(torch.arange(50), torch.zeros(50, 4))
    assert syncer.sync_now()
    weps.down = True
    g = torch.Generator().manual_seed(0)
    for step in range(30):  # the same ids over and over: coalesced to one entry each
        ps.put(torch.randint(0, 200, (40,), generator=g), torch.randn(40, 4, generator=g))
        if step % 4 == 0:
            ps.delete(torch.randint(0, 200, (5,), generator=g))
        assert not syncer.sync_now()
    s = syncer.stats()
    assert s["consecutive_failures"] == 30 and s["spills"] > 0
    assert s["pending_rows"] <= 200  # one entry per id, however many updates
    weps.down = False
    assert syncer.sync_now()
    assert _same(ps, weps)
    # a restart that lost everything: noticed through instance_id, everything resent
    weps.restart_empty()
    ps.put([7], torch.ones(1, 4))
    assert syncer.sync_now()
    assert syncer.stats()["resyncs"] == 1
    assert _same(ps, weps)
    syncer.close()
    ps.close()


def test_dense_manifest_binds_versions(tmp_path):
    ps = TierPS(2, str(tmp_path / "ps"))
    weps = WePS(2, retain=10)
    url = str(tmp_path / "dense")
    syncer = Syncer(ps, weps, dense_url=url, start=False, keep_dense=1)
    assert read_manifest(url) is None
    for step in range(4):
        ps.put([step], torch.full((1, 2), float(step)))
        syncer.publish_dense({"w": torch.full((3,), float(step)), "b": torch.tensor([step])})
        assert syncer.sync_now()
        m = read_manifest(url)
        dense, m2 = load_dense(url)
        assert m == m2 and m["dense_version"] == step + 1
        assert torch.equal(dense["w"], torch.full((3,), float(step)))
        # the embedding version named next to the dense one is pinned in WePS
        snap = weps.snapshot(m["embedding_version"])
        assert m["embedding_version"] >= m["dense_embedding_version"]
        assert torch.equal(snap.get([step]), torch.full((1, 2), float(step)))
    files = sorted(p.name for p in (tmp_path / "dense").iterdir())
    assert files == ["dense-0000000003.safetensors", "dense-0000000004.safetensors", "manifest.json"]
    assert json.loads((tmp_path / "dense" / "manifest.json").read_text())["format"] == 1
    # the manifest waits for the embedding push it names
    weps_down = FlakyWePS(2)
    s2 = Syncer(ps, weps_down, dense_url=str(tmp_path / "d2"), start=False)
    weps_down.down = True
    s2.publish_dense({"w": torch.ones(1)})
    s2.sync_now()
    assert read_manifest(str(tmp_path / "d2")) is None
    weps_down.down = False
    s2.sync_now()
    assert read_manifest(str(tmp_path / "d2"))["dense_version"] == 1
    s2.close()
    syncer.close()
    ps.close()


def test_bad_configuration_is_refused(tmp_path):
    ps = TierPS(4, str(tmp_path / "ps"))
    with pytest.raises(ValueError, match="do not match"):
        Syncer(ps, WePS(8), start=False)
    with pytest.raises(ValueError):
        Syncer(ps, WePS(4), interval_s=0, start=False)
    with pytest.raises(TypeError):
        Syncer(object(), WePS(4), start=False)
    s = Syncer(ps, WePS(4), start=False)
    with pytest.raises(RuntimeError, match="dense_url"):
        s.publish_dense({"w": torch.ones(1)})
    s.close()
    ps.close()


def test_resync_turns_pending_rows_deleted_meanwhile_into_tombstones(tmp_path):
    """A row pending from an outage, deleted between a cycle's pull and its resync, must not
    come back from the pending buffer (the full image of the source lacks it)."""
    ps = TierPS(4, str(tmp_path / "ps"))
    weps = FlakyWePS(4)
    syncer = Syncer(ps, weps, start=False)
    ps.put([1, 2], torch.ones(2, 4))
    assert syncer.sync_now()
    weps.down = True
    ps.put([1], torch.full((1, 4), 2.0))
    assert not syncer.sync_now()  # pending: the new row 1
    weps.restart_empty()
    real_probe = weps.instance_id

    def probe_racing_with_a_delete():
        ps.delete([1])  # lands after this cycle's pull, before its full resync
        weps.instance_id = real_probe
        return real_probe()

    weps.instance_id = probe_racing_with_a_delete
    assert syncer.sync_now()
    assert syncer.stats()["resyncs"] == 1
    assert weps.lookup([1, 2]).found.tolist() == [False, True]
    assert _same(ps, weps)
    syncer.close()
    ps.close()


def test_dynamic_table_as_source():
    """Training on A's DynamicEmbeddingTable, serving from WePS through TableSource."""
    from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
    from gauss_plugins.stores.syncer import TableSource

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4, tombstone_limit=4))
    source = TableSource(table)
    weps = WePS(4)
    syncer = Syncer(source, weps, start=False)
    table.set(torch.tensor([1, 2, 3, -7]), torch.randn(4, 4))
    assert syncer.sync_now()
    assert weps.lookup(torch.tensor([1, 2, 3, -7])).found.all()
    first = syncer.reports[-1]["freshness_p99_s"]
    assert first == first and 0 <= first < 60, "the first push must report a finite freshness"
    with source.lock:  # the training step
        table.set(torch.tensor([2]), torch.full((1, 4), 9.0))
        table.delete(torch.tensor([3]))
    assert syncer.sync_now()
    assert weps.lookup(torch.tensor([3])).found.tolist() == [False]
    assert torch.equal(weps.get(torch.tensor([2])), torch.full((1, 4), 9.0))
    assert syncer.reports[-1]["deleted"] == 1
    assert syncer.reports[-1]["freshness_p99_s"] >= 0
    # more deletions than the table remembers between two pulls: a full image, still exact
    table.set(torch.arange(100, 120), torch.ones(20, 4))
    assert syncer.sync_now()
    for i in range(100, 110):
        table.delete(torch.tensor([i]))
    assert syncer.sync_now()
    values, present = table.get(torch.arange(-10, 130))
    got = weps.lookup(torch.arange(-10, 130))
    assert torch.equal(got.found, present) and torch.equal(got.values[present], values[present])
    syncer.close()


def test_dense_weights_through_another_fsspec_filesystem(tmp_path):
    """Any fsspec URL works: here the in-memory filesystem."""
    ps = TierPS(2, str(tmp_path / "ps"))
    url = f"memory://gauss-{id(ps):x}/dense"
    syncer = Syncer(ps, WePS(2), dense_url=url, start=False, keep_dense=0)
    for step in range(3):
        ps.put([step], torch.ones(1, 2))
        syncer.publish_dense({"w": torch.full((2,), float(step))})
        assert syncer.sync_now()
    dense, manifest = load_dense(url)
    assert manifest["dense_version"] == 3 and torch.equal(dense["w"], torch.full((2,), 2.0))
    import fsspec

    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"/gauss-{id(ps):x}/dense", detail=False))
    assert names == ["dense-0000000003.safetensors", "manifest.json"]
    syncer.close()
    ps.close()


class _InterleavingLock:
    """A lock that runs ``between()`` (a training step) just before its ``at``-th acquisition."""

    def __init__(self, between, at: int):
        import threading

        self._lock, self.between, self.at, self.count = threading.Lock(), between, at, 0

    def __enter__(self):
        self.count += 1
        if self.count == self.at:
            self.between()
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()


def test_table_pull_copies_outside_the_lock_and_drops_rows_written_meanwhile():
    """A pull lists the changed rows under the lock, copies them without it, and drops the
    rows training wrote in between: the next pull brings their new values, so serving never
    holds a value newer than the version it names. A row deleted in between held the value
    copied at that version: it is sent, and its tombstone comes with the next pull."""
    from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
    from gauss_plugins.stores.syncer import TableSource

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4))
    table.set(torch.arange(10), torch.zeros(10, 4))
    v0 = table.version

    def training_step():
        table.set(torch.tensor([5, 6]), torch.full((2, 4), 9.0))
        table.delete(torch.tensor([7]))

    source = TableSource(table, lock=_InterleavingLock(training_step, at=2))
    table.set(torch.tensor([5, 6, 7, 8]), torch.ones(4, 4))
    first = source.changes_since(v0)
    assert first.ids.tolist() == [7, 8] and torch.equal(first.values, torch.ones(2, 4))
    assert first.deleted.tolist() == []
    assert source.pulls[-1]["rows"] == 2 and source.pulls[-1]["lock_s"] >= 0
    second = source.changes_since(first.version)
    assert second.ids.tolist() == [5, 6] and torch.equal(second.values, torch.full((2, 4), 9.0))
    assert second.deleted.tolist() == [7]
    assert source.changes_since(second.version).num_rows == 0


class _EveryCopyLock(_InterleavingLock):
    """Runs ``between()`` before every second acquisition: a training step lands in every
    pull's copy window (training that never pauses)."""

    def __enter__(self):
        self.count += 1
        if self.count % 2 == 0:
            self.between()
        self._lock.acquire()


@pytest.mark.parametrize("backend", ["torch", "cpu_ext"])
def test_a_row_written_during_every_copy_still_reaches_serving(backend):
    """A hot row written during every pull's copy is dropped by that pull (its value moved
    past the pull's version). Dropped by two pulls in a row, the next pull copies it under
    its first lock hold, exact at that pull's version: it reaches serving two pulls late,
    not never. Before, every pull dropped it again."""
    from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
    from gauss_plugins.stores.syncer import TableSource

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4, backend=backend))
    table.set(torch.arange(10), torch.zeros(10, 4))
    step = [0]

    def training_step():
        step[0] += 1
        table.set(torch.tensor([3]), torch.full((1, 4), float(step[0])))

    source = TableSource(table, lock=_EveryCopyLock(training_step, at=0))
    version, seen = 0, []
    for _ in range(5):
        batch = source.changes_since(version)
        # every batch is exact at the version it names: row 3 held step[0] - 1 then
        if 3 in batch.ids.tolist():
            value = batch.values[batch.ids.tolist().index(3)]
            seen.append(float(value[0]))
        assert batch.version <= table.version
        version = batch.version
    # pulls 1 and 2 dropped row 3 (written during their copies); pulls 3-5 carry it
    assert len(seen) == 3
    assert seen == sorted(seen) and seen[-1] >= 2.0
    # and with training paused the last value arrives
    plain = TableSource(table)
    final = plain.changes_since(version)
    assert final.ids.tolist() == [3] and float(final.values[0, 0]) == float(step[0])


def test_syncer_start_version_skips_what_the_target_holds():
    from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
    from gauss_plugins.stores.syncer import TableSource

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4))
    table.set(torch.arange(100), torch.zeros(100, 4))
    source = TableSource(table)
    weps = WePS(4)
    with pytest.raises(ValueError, match="start_version"):
        Syncer(source, weps, start=False, start_version=table.version + 1)
    syncer = Syncer(source, weps, start=False, start_version=table.version)
    table.set(torch.tensor([3]), torch.ones(1, 4))
    assert syncer.sync_now()
    assert syncer.reports[-1]["rows"] == 1 and len(weps) == 1
    syncer.close()


def test_table_pull_redone_when_a_checkpoint_loads_during_the_copy(tmp_path):
    """Rows written by a checkpoint load carry the file's stamps, which the stamp check
    cannot tell from old ones: a pull that straddles a load redoes its work under the lock."""
    from gauss_plugins.embedding import load_table, save_table
    from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
    from gauss_plugins.stores.syncer import TableSource

    cfg = DynamicTableConfig(name="items", dim=4)
    other = DynamicEmbeddingTable(cfg)
    other.set(torch.arange(10), torch.zeros(10, 4))
    base = save_table(other, tmp_path / "full")
    table = DynamicEmbeddingTable(cfg)
    load_table(table, [tmp_path / "full"])
    other.set(torch.tensor([3]), torch.full((1, 4), 5.0))
    save_table(other, tmp_path / "inc", since_version=base)
    table.set(torch.tensor([3, 4]), torch.ones(2, 4))  # table and file now disagree on id 3
    source = TableSource(table, lock=_InterleavingLock(lambda: load_table(table, [tmp_path / "full", tmp_path / "inc"]),
                                                       at=2))
    batch = source.changes_since(base)
    assert batch.ids.tolist() == [3] and torch.equal(batch.values, torch.full((1, 4), 5.0))


@pytest.mark.parametrize("backend", ["torch", "cpu_ext"])
def test_table_pull_touches_no_row_under_the_lock_and_serving_converges(backend, monkeypatch):
    """With training between a pull's two lock holds (evictions, re-admissions, deletes), the
    pulls never look rows up under the lock (no index probe, no stamp check per row, no copy)
    and serving ends equal to the table."""
    from gauss_plugins.embedding import SparseOptimizer
    from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
    from gauss_plugins.stores.syncer import TableSource

    if backend == "cpu_ext":
        from gauss_kernels.hash_table import cpu_ext

        if not cpu_ext.available():
            pytest.skip(cpu_ext.unavailable_reason())
    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4, initial_capacity=200, max_capacity=200,
                                                     eviction="lru", evict_fraction=0.0, backend=backend,
                                                     optimizer="sgd"))
    opt = SparseOptimizer(table)
    g = torch.Generator().manual_seed(2)
    table.train()

    def training_step():
        ids = torch.randint(0, 400, (50,), generator=g)
        (table(ids).sum() * 0.1).backward()
        opt.step()
        opt.zero_grad()
        if int(ids[0]) % 3 == 0:
            table.delete(ids[1:4])

    training_step()
    source = TableSource(table)
    weps = WePS(4)
    syncer = Syncer(source, weps, start=False)
    assert syncer.sync_now()  # the first pull: a full image, under the lock
    for name in ("evicted_since", "rows_unchanged_since", "changed_since"):
        monkeypatch.setattr(table, name, lambda *a, **k: pytest.fail("a pull did per-row work under the lock"))
    for _ in range(15):
        source.lock = _InterleavingLock(training_step, at=2)  # a step between the two holds
        training_step()
        assert syncer.sync_now()
        source.lock.count = 0
    monkeypatch.undo()
    source.lock = _InterleavingLock(lambda: None, at=0)
    assert syncer.sync_now()  # nothing ran meanwhile: serving catches up with the table
    ids, rows = table.index.keys_and_rows()
    got = weps.lookup(ids)
    assert got.found.all() and torch.equal(got.values, table.weight[rows])
    assert len(weps) == len(table)
    syncer.close()


def test_a_cycle_longer_than_the_interval_is_followed_at_once(tmp_path):
    """The schedule (Syncer docstring): cycles start ``interval_s`` apart, measured start to
    start; a push that takes longer than the interval is followed by the next cycle at once,
    carrying what changed meanwhile, and once pushes are fast again the thread goes back to
    one cycle per interval instead of spinning."""

    class SlowWePS(WePS):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.delay = 0.0
            self.pushes = []  # (start, end) of each push that carried rows

        def apply_changes(self, batch):
            if batch.num_rows:
                t0 = time.monotonic()
                time.sleep(self.delay)
                super().apply_changes(batch)
                self.pushes.append((t0, time.monotonic()))
            else:
                super().apply_changes(batch)

    ps = TierPS(4, str(tmp_path / "ps"))
    weps = SlowWePS(4)
    weps.delay = 0.6
    pulls = []
    real_pull = ps.changes_since

    def pull(*a, **k):
        pulls.append(time.monotonic())
        return real_pull(*a, **k)

    ps.changes_since = pull
    stop = threading.Event()

    def writer():  # changes keep coming, so every cycle has rows to push
        i = 0
        while not stop.is_set():
            ps.put(torch.tensor([i % 50]), torch.full((1, 4), float(i)))
            i += 1
            time.sleep(0.01)

    w = threading.Thread(target=writer)
    w.start()
    try:
        with Syncer(ps, weps, interval_s=0.4) as syncer:
            deadline = time.monotonic() + 20
            while len(weps.pushes) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(weps.pushes) >= 4
            # each pull after a slow push came right after it, not one more interval later
            ends = [end for _, end in weps.pushes[:3]]
            gaps = [min(p for p in pulls if p >= end) - end for end in ends if any(p >= end for p in pulls)]
            assert gaps and max(gaps) < 0.2, gaps
            weps.delay = 0.0
            stop.set()
            w.join()
            time.sleep(1.5)  # the push in flight ends, the one after it is fast
            n0 = len(pulls)
            time.sleep(2.0)  # fast again: one cycle per 0.4 s interval, not a busy loop
            assert 3 <= len(pulls) - n0 <= 7, len(pulls) - n0
            deadline = time.monotonic() + 10
            while weps.version != ps.version and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _same(ps, weps)  # nothing lost through the back-to-back pushes
    finally:
        stop.set()
        w.join()
    ps.close()
