"""Second-level sync from a training store to a serving store, plus dense weights on fsspec.

A :class:`Syncer` runs one background thread. Every ``interval_s`` (default 1 s) it

1. *pulls* from the source (a :class:`~gauss_plugins.stores.tierps.TierPS`, or anything with
   ``version`` and ``changes_since(version) -> ChangeBatch``) the rows changed and the ids
   deleted since its last pull -- a short, in-memory read; training is never blocked for
   longer than that;
2. *coalesces* them into a pending buffer keyed by id (the latest value or tombstone wins),
   bounded by ``max_pending_bytes``: past the budget the buffer spills to an on-disk
   :class:`~gauss_plugins.stores.disk.DiskTier` in ``spill_dir``;
3. *pushes* the whole buffer to the target (``apply_changes``) in batches of
   ``push_batch_rows``; only when every batch was acknowledged is the buffer cleared.

Schedule: a cycle starts ``interval_s`` after the previous one *started*, so the time a
cycle takes does not stretch the period. A cycle that takes longer than the interval (a push
near the target's capacity, a backlog after an outage) is followed by the next one at once,
not after another interval: the thread then runs cycles back to back, each pushing what
changed (coalesced by id) during the one before, until a cycle fits the interval again. So
``interval_s`` is the shortest time between two pulls; a change is acknowledged at most one
interval plus one cycle after it was made while cycles fit the interval (two cycles when they
do not); the thread never sleeps while it is behind, and never runs more often than every
``interval_s`` when it is not.

If the target is down (Redis stopped, restarting, unreachable), step 3 fails, the error is
counted and kept in :meth:`Syncer.stats`, and the next cycle retries with everything that
accumulated meanwhile: nothing is lost, nothing is sent twice needlessly (coalesced by id),
memory stays bounded, and the training thread never waits for the target. A target that
came back *empty* (Redis restarted without persistence) is noticed through its
``instance_id()`` (Redis: the server's ``run_id``), before and after every push: the syncer
then pulls a full image of the source and pushes everything again. A full image (a resync,
or a source whose change log no longer reaches back far enough) also turns pending rows and
rows the target holds (``stored_ids()``) that the source no longer has into tombstones.

Sources: :class:`~gauss_plugins.stores.tierps.TierPS` (and the Ray-sharded one) directly;
a :class:`~gauss_plugins.embedding.table.DynamicEmbeddingTable` through :class:`TableSource`
(its ``changed_since`` / ``evicted_since``).

Dense weights: :meth:`Syncer.publish_dense` (call it between training steps) hands over a
copy of the dense ``state_dict`` together with the source version at that moment. The thread
writes it as ``dense-<D>.safetensors`` (pickle-free, :mod:`gauss_plugins.serialization`)
under ``dense_url`` through fsspec (a local path by default; any fsspec URL works), then,
once the embedding push has reached that version, writes ``manifest.json``
(``{"embedding_version", "dense_version", "dense_file", ...}``) by write-to-temp-and-rename.
A reader (:func:`read_manifest`, :func:`load_dense`) therefore always finds a complete dense
file and a serving store already holding every embedding change up to the version the dense
weights were taken at; with the embedded WePS, ``store.snapshot(manifest["embedding_version"])``
pins exactly the embedding version named next to the dense version.

Per push the syncer reports rows, bytes, latency, ``cycle_cpu_s`` (the CPU time its thread
spent on the cycle's pull and push: unlike the latency, other jobs on the machine do not
inflate it) and freshness -- the time from an update in training to its acknowledgement by
the serving store -- as p50/p99. Freshness is measured
per source mutation: the source's clock (version -> wall time, rows) says when each ``put``
happened; each is counted with its row count (a row overwritten twice counts twice, with its
older, larger freshness -- a conservative estimate).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from gauss_plugins.stores.base import ChangeBatch, EmbeddingStore, in_sorted, isin_ids, merge_sorted_rows
from gauss_plugins.stores.disk import DiskTier

__all__ = ["Syncer", "TableSource", "read_manifest", "load_dense"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _fs(url: str):
    """``(filesystem, root path)`` for an fsspec URL or a local path."""
    from gauss_plugins._optional import require

    fsspec = require("fsspec", "redis", "syncing dense weights")
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root


def _join(fs: Any, root: str, name: str) -> str:
    sep = getattr(fs, "sep", "/")
    return root.rstrip(sep) + sep + name if sep != "/" else posixpath.join(root, name)


def read_manifest(dense_url: str) -> Optional[Dict[str, Any]]:
    """The latest manifest under ``dense_url``, or ``None`` before the first one."""
    fs, root = _fs(dense_url)
    path = _join(fs, root, MANIFEST)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        manifest = json.loads(f.read().decode("utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != 1:
        raise ValueError(f"{path}: not a gauss syncer manifest (format 1)")
    return manifest


def load_dense(dense_url: str, manifest: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(dense state_dict, manifest)`` named by ``manifest`` (default: the latest)."""
    from gauss_plugins.serialization import load_tensors

    manifest = dict(manifest) if manifest is not None else read_manifest(dense_url)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} under {dense_url}: nothing was published yet")
    fs, root = _fs(dense_url)
    with tempfile.TemporaryDirectory(prefix="gauss-dense-") as tmp:
        local = os.path.join(tmp, "dense.safetensors")
        fs.get_file(_join(fs, root, manifest["dense_file"]), local)
        tensors, _ = load_tensors(local)
    return tensors, manifest


_EMPTY_IDS = torch.empty(0, dtype=torch.int64)


class TableSource:
    """A :class:`~gauss_plugins.embedding.table.DynamicEmbeddingTable` as a syncer source.

    Training updates the table (lookups, optimizer steps, ``set``, ``delete``, evictions);
    this adapter turns ``table.changed_since(v)`` / ``table.evicted_since(v)`` into
    :class:`~gauss_plugins.stores.base.ChangeBatch` es, with a full image (``full=True``)
    when the table no longer remembers evictions that old. Evictions read by every consumer
    are trimmed from the table (``trim_tombstones``).

    The table is not thread-safe: hold :attr:`lock` around the training step
    (``with source.lock: loss.backward(); opt.step()``) so that a pull never sees a step
    half-applied. The version is read before the rows, so a row updated during a pull is
    pushed again by the next one.

    A pull holds the lock twice, for O(change-log chunks) each, never per row: to take
    references to the change-log and tombstone chunks since the last pull, and, after
    resolving them into ids, deletions and copied values without the lock, to take the
    chunks written meanwhile, whose rows it then drops (the next pull has them). The one
    per-row cost under the lock: rows dropped by two pulls in a row (written during every
    copy: hot rows) are copied by the next pull in its first hold, exact at its version,
    since they would otherwise never reach serving; O(such rows). Only a full image (first pull,
    resync) and the rare redo after a stamp rebase or a checkpoint load copy all rows under
    the lock.
    :attr:`pulls` keeps the recent pulls' ``lock_s`` (time training was blocked; wall
    clock) and ``lock_cpu_s`` (the CPU time of that, which other jobs on the machine do not
    inflate), ``wait_s`` (waiting for the lock), ``total_s``, ``rows`` and ``visited``
    (change-log entries or rows the table looked at).
    """

    def __init__(self, table: Any, lock: Optional[threading.Lock] = None):
        for attr in ("version", "changed_since", "evicted_since", "dim"):
            if not hasattr(table, attr):
                raise TypeError(f"expected a DynamicEmbeddingTable (missing {attr!r}), got {type(table).__name__}")
        self.table = table
        self.dim = int(table.dim)
        self.state_dim = 0  # optimizer state stays in training; serving needs values only
        self.lock = lock or threading.Lock()
        self._consumers: Dict[str, int] = {}
        self.pulls: Deque[Dict[str, float]] = deque(maxlen=10_000)
        from gauss_plugins.embedding.tracking import RowScratch

        self._scratch = RowScratch()  # the pull's own: eviction in training uses the table's
        # consumer -> (the version its last pull named, the ids that pull dropped as written
        # during its copy, those of them the pull before it dropped too). The next pull from
        # that version copies the latter under its first lock hold: a row that training writes
        # during every copy window (a hot row while training never pauses) would otherwise be
        # dropped by every pull and never reach serving. Only rows dropped twice in a row: they
        # are few (the hot ones), so the lock hold stays short.
        self._dropped: Dict[Optional[str], Tuple[int, torch.Tensor, torch.Tensor]] = {}
        # Changes after the attach happened after it: that time bounds the first push's
        # freshness from above (a run with a single push still reports a number).
        self._pulled_at: Dict[int, float] = {self.version: time.time()}

    @property
    def version(self) -> int:
        return int(self.table.version)

    def update_clock(self, after: int, upto: int) -> Tuple[np.ndarray, np.ndarray]:
        """The table stamps versions, not times: a change after ``after`` happened after the
        pull that read ``after``, so that pull's time bounds freshness from above."""
        t = self._pulled_at.get(int(after))
        if t is None:
            return np.empty(0), np.empty(0, dtype=np.int64)
        return np.asarray([t]), np.asarray([1], dtype=np.int64)

    def register_consumer(self, name: str, version: Optional[int] = None) -> None:
        self._consumers[name] = self.version if version is None else int(version)

    def unregister_consumer(self, name: str) -> None:
        self._consumers.pop(name, None)

    def changes_since(self, version: int, consumer: Optional[str] = None, full: bool = False) -> ChangeBatch:
        t0 = time.perf_counter()
        snap = None
        with self.lock:
            t_locked, cpu_locked = time.perf_counter(), time.thread_time()
            now = self.version
            last = carried = None
            if not full:
                try:
                    # O(log chunks): references to what changed, resolved after the release
                    snap = self.table.change_snapshot(version, deletions=True)
                except ValueError:  # tombstones that old were dropped: only a full image is exact
                    full = True
                else:
                    last = self._dropped.pop(consumer, None)
                    if last is not None and last[0] != int(version):
                        last = None  # another pull came between: its drops are not ours
                    carried = self._carried_locked(last)
            if full:
                # A full image is copied under the lock: a row missing from it would read as
                # deleted (rare: a first pull or a resync).
                ids, values, deleted, visited, full = self._read_locked(version, True)
            self._note_pull(consumer, version, now)
            lock_s = time.perf_counter() - t_locked
            lock_cpu_s = time.thread_time() - cpu_locked
        in_order = False
        if snap is not None:
            # Finding the rows, the deletions and copying the values (the bulk of a pull) runs
            # while training goes on. Then, briefly under the lock again, the pull takes the
            # change-log chunks written since `now` (references, O(chunks)) and afterwards drops
            # the rows they name: those were written meanwhile, perhaps during the copy, and the
            # next pull brings them. Every write of a row's values or of the id it holds is
            # logged, so the rows kept hold their values and ids at `now`. Growth swaps the
            # tensors but keeps row numbers.
            ids, rows, values = self.table.gather_change_snapshot(snap, self._scratch)  # in id order
            deleted = self.table.resolve_deleted(snap)
            visited = snap.visited
            same = later = None
            in_order = True
            with self.lock:
                t_check, cpu_check = time.perf_counter(), time.thread_time()
                if self.table.snapshot_is_current(snap):
                    later = self.table.rows_written_after(now)
                    if later is None:  # the log no longer reaches back to `now`: check each row
                        same = self.table.rows_unchanged_since(rows, now)
                else:
                    # Stamps rebased (every ~2**30 versions) or a checkpoint loaded meanwhile:
                    # read everything again, under the lock, at the version now.
                    now = self.version
                    ids, values, deleted, visited, full = self._read_locked(version, False)
                    self._note_pull(consumer, version, now)
                    in_order = False
                lock_s += time.perf_counter() - t_check
                lock_cpu_s += time.thread_time() - cpu_check
            if later:  # row numbers only grow: the rows read are covered by the stamps now
                same = self.table.rows_not_in(rows, later, self._scratch)
            keep = dropped = None
            if same is not None and not bool(same.all()):
                keep, dropped = same, ids[~same]
            if in_order:
                # The pull names `now`. Ids it dropped that the previous pull dropped too are
                # written during every copy (hot rows): the next pull from `now` copies them at
                # its start. Ids dropped once come with the next pull's own copy.
                dropped = dropped if dropped is not None else _EMPTY_IDS
                starving = _EMPTY_IDS
                if last is not None and dropped.numel() and last[1].numel():
                    starving = dropped[in_sorted(dropped, last[1])]  # both ascending
                self._dropped[consumer] = (now, dropped, starving)
            # (`keep` is only set while the snapshot held, so the ids are still ascending then.)
            if keep is not None or (in_order and carried is not None and carried[0].numel()):
                # Drop the rows written meanwhile and add the carried ones (each id once; both
                # copies are at `now`) in one pass that keeps the ids ascending: under a fast
                # training loop nearly every pull has both, and re-sorting a whole pull for
                # them cost more CPU than the copy itself.
                add_ids, add_values = carried if carried is not None else (_EMPTY_IDS, values[:0])
                # The values are this pull's own copy (gather_change_snapshot copies the rows):
                # compacted where they lie, never if they were the table's own storage.
                weight = getattr(self.table, "weight", None)
                own = weight is None or values.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
                ids, values = merge_sorted_rows(ids, values, keep, add_ids, add_values, in_place=own)
        backing = getattr(self.table, "backing", None)
        if backing is not None:
            ids, values, deleted = self._with_store_rows(backing, ids, values, deleted, full)
            in_order = False
        if not in_order:
            ids, order = ids.sort()
            values = values.index_select(0, order)
        self.pulls.append({"lock_s": lock_s, "lock_cpu_s": lock_cpu_s, "wait_s": t_locked - t0,
                           "total_s": time.perf_counter() - t0, "rows": int(ids.numel()), "visited": visited})
        empty = torch.empty(0, dtype=torch.int64)
        return ChangeBatch(ids.to("cpu"), values.to("cpu", torch.float32), None,
                           empty if deleted is None else deleted.to("cpu"), now, full=full)

    def _carried_locked(self, last: Optional[Tuple[int, torch.Tensor, torch.Tensor]]
                        ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Under the lock, at the pull's version: (ids, values) of the rows the consumer's
        previous two pulls both dropped (``last``: the previous pull's entry of
        :attr:`_dropped`, when this pull continues from it). They were written after that
        pull's version, so this pull's change list holds them too; copied here they are
        exact at this version whatever training writes during this pull's copy. Ids evicted
        meanwhile are skipped (their tombstones come with the deletions)."""
        if last is None or last[2].numel() == 0:
            return None
        values, present = self.table.get(last[2])
        return last[2][present], values[present]

    def _read_locked(self, version: int, full: bool):
        """(ids, values, deleted, visited, full) read entirely under the lock (the caller
        holds it): a full image, or the changes after ``version`` (a full image when the
        table no longer remembers evictions that old)."""
        deleted = None
        if not full:
            try:
                deleted = self.table.evicted_since(version)
            except ValueError:
                full = True
        # changed_since of a version before every stamp returns every live row
        ids, values, _ = self.table.changed_since(-(1 << 62) if full else version, optimizer_state=False,
                                                  sort=False)
        return ids, values, deleted, int(self.table.last_changed_scan), full

    def _note_pull(self, consumer: Optional[str], version: int, now: int) -> None:
        """Under the lock: the consumer's position (tombstones every consumer read are
        trimmed) and the pull's time, for freshness."""
        if consumer is not None:
            self._consumers[consumer] = max(int(version), self._consumers.get(consumer, 0))
            self.table.trim_tombstones(min(self._consumers.values()))
        self._pulled_at[now] = time.time()
        for v in [v for v in self._pulled_at if v < version]:
            del self._pulled_at[v]

    @staticmethod
    def _with_store_rows(backing: Any, ids: torch.Tensor, values: torch.Tensor, deleted: Optional[torch.Tensor],
                         full: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """A table backed by a store (``table.attach_store``): an evicted row moved to the
        store, it was not deleted, so it is pushed with the store's values; a full image
        holds the store's rows too. Ids the store lacks stay deletions."""
        drain = getattr(backing, "drain", None)
        if drain is not None:  # writes queued by an asynchronous writer land before the read
            drain()
        store = backing.store
        if full:
            held = [b for b in store.export()]
            extra_ids = torch.cat([b.ids for b in held]) if held else torch.empty(0, dtype=torch.int64)
            extra = torch.cat([b.values for b in held]) if held else torch.empty(0, store.dim)
            keep = ~torch.isin(extra_ids, ids.cpu())
            return (torch.cat([ids.cpu(), extra_ids[keep]]),
                    torch.cat([values.to("cpu", torch.float32), extra[keep]]), deleted)
        if deleted is None or deleted.numel() == 0:
            return ids, values, deleted
        got = store.lookup(deleted.cpu())
        found = got.found
        return (torch.cat([ids.cpu(), deleted.cpu()[found]]),
                torch.cat([values.to("cpu", torch.float32), got.values[found]]), deleted.cpu()[~found])


class _Pending:
    """Changes not yet acknowledged by the target, one entry per id (latest wins): ``ids``
    (each once; sorted except that a cycle's tombstones may follow its rows), ``rows``
    ``[n, width]`` and ``tomb`` (True: the id was deleted). Past the
    memory budget everything moves to a DiskTier, where a row carries one extra column
    (1.0 marks a tombstone).
    """

    def __init__(self, width: int, budget_bytes: int, spill_dir: Optional[str]):
        self.width = width
        self.budget_bytes = budget_bytes
        self._spill_base = spill_dir
        self._spill_path: Optional[str] = None
        self.spill: Optional[DiskTier] = None
        self.spills = 0
        self._reset_memory()

    def _reset_memory(self) -> None:
        self.ids = torch.empty(0, dtype=torch.int64)
        self.rows = torch.empty(0, self.width)
        self.tomb = torch.empty(0, dtype=torch.bool)

    @property
    def memory_bytes(self) -> int:
        return int(self.ids.numel() * 9 + self.rows.numel() * 4)

    def __len__(self) -> int:
        return int(self.ids.numel()) + (len(self.spill) if self.spill is not None else 0)

    def ids_pending(self) -> torch.Tensor:
        spilled = self.spill.ids() if self.spill is not None else torch.empty(0, dtype=torch.int64)
        return torch.cat([self.ids, spilled])

    def add(self, batch: ChangeBatch, include_state: bool) -> None:
        n, d = batch.num_rows, batch.deleted
        if batch.full:
            # A complete image of the source: a pending upsert of an id it lacks was deleted
            # since (and the deletion is folded into the image), so it becomes a tombstone.
            pend = self.ids_pending()
            d = torch.cat([d, pend[~isin_ids(pend, batch.ids)]])
        # A deletion read together with an upsert of the same id: the source holds the row now.
        if d.numel() and n:
            d = d[~isin_ids(d, batch.ids)]
        vals = batch.values
        if include_state and batch.state is not None:
            vals = torch.cat([vals, batch.state], dim=1)
        ids = batch.ids

        def distinct_sorted(t: torch.Tensor) -> bool:
            return t.numel() <= 1 or bool((t[1:] > t[:-1]).all())

        if self.ids.numel() == 0 and distinct_sorted(ids) and distinct_sorted(d):
            # The usual cycle: nothing pending, the source gave sorted distinct ids and
            # deletions (disjoint from them since the isin above): no sort, no row copy.
            if d.numel() == 0:
                self.ids, self.rows, self.tomb = ids, vals.contiguous(), torch.zeros(n, dtype=torch.bool)
            else:
                self.ids = torch.cat([ids, d])
                self.rows = torch.cat([vals, torch.zeros(d.numel(), self.width, dtype=vals.dtype)])
                self.tomb = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(d.numel(), dtype=torch.bool)])
        else:
            ids = torch.cat([self.ids, ids, d])
            rows = torch.cat([self.rows, vals, torch.zeros(d.numel(), self.width)])
            tomb = torch.cat([self.tomb, torch.zeros(n, dtype=torch.bool), torch.ones(d.numel(), dtype=torch.bool)])
            # Keep the last occurrence of each id: stable sort, then the end of each run.
            sorted_ids, order = torch.sort(ids, stable=True)
            keep = torch.ones_like(sorted_ids, dtype=torch.bool)
            keep[:-1] = sorted_ids[1:] != sorted_ids[:-1]
            order = order[keep]
            self.ids, self.rows, self.tomb = sorted_ids[keep], rows.index_select(0, order), tomb.index_select(0, order)
        if self.memory_bytes > self.budget_bytes:
            self._spill()

    def _spill(self) -> None:
        if self.spill is None:
            base = self._spill_base or tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            self._spill_path = tempfile.mkdtemp(prefix="gauss-syncer-spill-", dir=base)
            # No fsync: the spill only has to outlive an outage of the target, not a crash
            # of this process (whose training store is the source of truth then).
            self.spill = DiskTier(self._spill_path, self.width + 1, sync=False, min_compact_bytes=64 << 20)
        rows = torch.cat([self.rows, self.tomb.to(torch.float32).unsqueeze(1)], dim=1)
        self.spill.put(self.ids, rows)  # overwrites older spilled entries of the same ids
        self.spills += 1
        self._reset_memory()

    def batches(self, size: int):
        """``(ids, rows, tombstone)`` batches of everything pending (spilled entries that
        memory has overridden are skipped)."""
        if self.spill is not None and len(self.spill):
            spilled = self.spill.ids()
            if self.ids.numel():
                spilled = spilled[~torch.isin(spilled, self.ids)]
            for s in range(0, spilled.numel(), size):
                ids = spilled[s:s + size]
                rows, _ = self.spill.get(ids)
                yield ids, rows[:, : self.width], rows[:, self.width] > 0.5
        for s in range(0, self.ids.numel(), size):
            yield self.ids[s:s + size], self.rows[s:s + size], self.tomb[s:s + size]

    def clear(self) -> None:
        self._reset_memory()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
            shutil.rmtree(self._spill_path, ignore_errors=True)
            self._spill_path = None

    def close(self) -> None:
        self.clear()


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Tuple[float, ...]) -> List[float]:
    if values.size == 0 or weights.sum() <= 0:
        return [float("nan")] * len(qs)
    order = np.argsort(values)
    v, w = values[order], weights[order].astype(np.float64)
    cum = np.cumsum(w) / w.sum()
    return [float(v[min(np.searchsorted(cum, q), v.size - 1)]) for q in qs]


class Syncer:
    """Pushes changed rows from ``source`` to ``target`` every ``interval_s`` (module doc).

    Args:
        source: the training store (``version``, ``changes_since``; optionally
            ``update_clock(after, upto) -> (times, rows)`` for freshness).
        target: the serving store (:class:`~gauss_plugins.stores.base.EmbeddingStore`).
        interval_s: seconds from the start of one cycle (pull + push) to the start of the
            next; a cycle that takes longer is followed by the next at once (module doc).
        dense_url: where dense weights and the manifest go (local path or fsspec URL).
        include_state: also push optimizer state (the target needs ``state_dim`` then).
        max_pending_bytes: memory budget of the pending buffer before it spills to disk.
        spill_dir: directory under which the spill gets a private subdirectory (default: the
            system's temporary directory); the subdirectory is removed once the target has
            acknowledged everything.
        push_batch_rows: rows per ``apply_changes`` call.
        keep_dense: dense files kept besides the one the manifest names.
        start: start the thread now (else call :meth:`start`, or drive it with :meth:`sync_now`).
        start_version: the source version the target already holds (both restored from the
            same checkpoint, say): the first pull reads only what changed after it instead
            of the whole source. Default 0: push everything.
    """

    def __init__(self, source: Any, target: EmbeddingStore, *, interval_s: float = 1.0,
                 dense_url: Optional[str] = None, include_state: bool = False,
                 max_pending_bytes: int = 256 << 20, spill_dir: Optional[str] = None,
                 push_batch_rows: int = 200_000, keep_dense: int = 2, history: int = 1000, start: bool = True,
                 start_version: int = 0):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        if not hasattr(source, "changes_since") or not hasattr(source, "version"):
            raise TypeError(f"source must have version and changes_since(version); got {type(source).__name__}")
        width = source.dim + (source.state_dim if include_state else 0)
        if target.dim != source.dim or (include_state and target.state_dim != source.state_dim):
            raise ValueError(f"target rows (dim={target.dim}, state_dim={target.state_dim}) do not match the "
                             f"source (dim={source.dim}, state_dim={source.state_dim}, include_state={include_state})")
        if isinstance(start_version, bool) or not isinstance(start_version, int) or start_version < 0 \
                or start_version > int(source.version):
            raise ValueError(f"start_version must be an int in [0, source.version={int(source.version)}], "
                             f"got {start_version!r}")
        if dense_url is not None:
            _fs(dense_url)  # fail now, in the caller's thread, on a bad URL or a missing fsspec
        self.source = source
        self.target = target
        self.interval_s = float(interval_s)
        self.dense_url = dense_url
        self.include_state = include_state
        self.push_batch_rows = int(push_batch_rows)
        self.keep_dense = int(keep_dense)
        self._pending = _Pending(width, int(max_pending_bytes), spill_dir)
        self._pending_clock: List[Tuple[np.ndarray, np.ndarray]] = []
        self._pulled_version = start_version
        self.pushed_version = start_version
        # A source that keeps a change log per consumer (TierPS) may drop what we have read.
        self._consumer: Optional[str] = None
        if hasattr(source, "register_consumer"):
            self._consumer = f"syncer-{id(self):x}"
            source.register_consumer(self._consumer, start_version)
        self._lock = threading.Lock()  # one cycle at a time (thread, sync_now, close)
        self._cycle_cpu0 = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reports: Deque[Dict[str, Any]] = deque(maxlen=history)
        self._fresh: Deque[Tuple[np.ndarray, np.ndarray]] = deque(maxlen=history)
        self.failures = 0
        self.resyncs = 0
        self._instance: Optional[str] = None
        self.consecutive_failures = 0
        self.last_error: Optional[str] = None
        self.rows_pushed = 0
        self.bytes_pushed = 0
        # dense weights
        self._dense_lock = threading.Lock()
        self._dense_pending: Optional[Tuple[Dict[str, torch.Tensor], int]] = None
        self._dense_written: Optional[Tuple[int, int, str]] = None  # (dense version, embedding version, file)
        self._dense_version = self._existing_dense_version()
        self.manifest: Optional[Dict[str, Any]] = None
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gauss-syncer", daemon=True)
        self._thread.start()

    def close(self, final_push: bool = True, timeout: float = 30.0) -> None:
        """Stop the thread; with ``final_push`` try one last cycle (errors are kept, not raised)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if final_push:
            self._cycle()
        self._pending.close()
        if self._consumer is not None:
            self.source.unregister_consumer(self._consumer)
            self._consumer = None

    def __enter__(self) -> "Syncer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> None:
        # The next start is set before the cycle runs: a cycle longer than the interval is
        # followed at once (a zero wait), a shorter one by the rest of the interval.
        next_at = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            next_at = time.monotonic() + self.interval_s
            self._cycle()

    # ------------------------------------------------------------------ one cycle
    def sync_now(self) -> bool:
        """Run one pull + push in the caller's thread; True when the target is up to date."""
        return self._cycle()

    def _cycle(self) -> bool:
        with self._lock:
            self._cycle_cpu0 = time.thread_time()
            try:
                self._pull()
            except Exception as exc:  # a broken source is a bug, but must not kill the thread
                self._fail(exc, "pull")
                return False
            try:
                instance = self._check_instance()
            except Exception as exc:
                self._fail(exc, "push")
                return False
            ok = self._push()
            if ok and instance is not None:
                try:
                    after = self.target.instance_id()
                except Exception as exc:
                    self._fail(exc, "push")
                    return False
                if after != instance:
                    # Restarted while we pushed: what reached the old instance may be gone.
                    # Keep the old id so the next cycle sees the change and resyncs.
                    self._fail(RuntimeError("target restarted during the push"), "push")
                    return False
                self._instance = after
            if ok:
                self._dense_step()
            return ok

    def _check_instance(self) -> Optional[str]:
        """The target's instance id; on a change since the last good push, queue a full resync.

        A serving store restarted without persistence (or flushed) has lost rows pushed
        before; a new instance id (Redis: the server's ``run_id``) is how we notice. The
        whole source is then pulled again and pushed with the pending changes.
        """
        probe = getattr(self.target, "instance_id", None)
        if probe is None:
            return None
        instance = probe()
        if self._instance is not None and instance != self._instance:
            log.warning("syncer: serving store instance changed (%s -> %s); resyncing every row",
                        self._instance, instance)
            self.resyncs += 1
            self._pulled_version = 0
            self._pull()
            self._instance = None
        return instance

    def _pull(self) -> None:
        if self._consumer is not None:
            batch = self.source.changes_since(self._pulled_version, consumer=self._consumer)
        else:
            batch = self.source.changes_since(self._pulled_version)
        if batch.version <= self._pulled_version and not batch.num_rows and not batch.deleted.numel():
            return
        clock = getattr(self.source, "update_clock", None)
        if clock is not None:
            times, rows = clock(self._pulled_version, batch.version)
            if len(times):
                self._pending_clock.append((np.asarray(times, dtype=np.float64), np.asarray(rows, dtype=np.int64)))
        if batch.full:
            # A complete image: rows the target holds that the source lacks were deleted
            # before we could see it (a syncer attached late, a trimmed log): tombstones.
            stored = getattr(self.target, "stored_ids", None)
            if stored is not None:
                held = stored()
                extra = held[~torch.isin(held, batch.ids)]
                if extra.numel():
                    batch = ChangeBatch(batch.ids, batch.values, batch.state, torch.cat([batch.deleted, extra]),
                                        batch.version, full=True)
        self._pending.add(batch, self.include_state)
        self._pulled_version = batch.version

    def _push(self) -> bool:
        if not len(self._pending) and self.pushed_version == self._pulled_version:
            return True
        t0 = time.monotonic()
        rows = deleted = nbytes = 0
        target_version = self._pulled_version
        dim = self.source.dim
        atomic = bool(getattr(self.target, "atomic_apply", False))
        try:
            batches = []
            for ids, vals, tomb in self._pending.batches(self.push_batch_rows):
                if bool(tomb.any()):
                    up = ~tomb
                    values, up_ids, gone = vals[up], ids[up], ids[tomb]
                else:  # no tombstones: no copies
                    values, up_ids, gone = vals, ids, ids[:0]
                batch = ChangeBatch(ids=up_ids, values=values[:, :dim].contiguous(),
                                    state=values[:, dim:].contiguous() if self.include_state else None,
                                    deleted=gone, version=self.pushed_version)
                rows += batch.num_rows
                deleted += int(batch.deleted.numel())
                nbytes += int(values.numel() * 4 + ids.numel() * 8)
                if atomic:
                    batches.append(batch)
                else:
                    self.target.apply_changes(batch)
            if atomic:
                # An in-process store publishes the whole push as one snapshot.
                self.target.apply_changes(ChangeBatch(
                    torch.cat([b.ids for b in batches]) if batches else torch.empty(0, dtype=torch.int64),
                    torch.cat([b.values for b in batches]) if batches else torch.empty(0, dim),
                    torch.cat([b.state for b in batches]) if batches and self.include_state else None,
                    torch.cat([b.deleted for b in batches]) if batches else torch.empty(0, dtype=torch.int64),
                    target_version))
            else:
                # The version goes last, alone: a reader seeing it sees every row it covers.
                self.target.apply_changes(ChangeBatch(torch.empty(0, dtype=torch.int64), torch.empty(0, dim),
                                                      None, torch.empty(0, dtype=torch.int64), target_version))
        except Exception as exc:
            self._fail(exc, "push")
            return False
        ack = time.time()
        latency = time.monotonic() - t0
        self._pending.clear()
        times = np.concatenate([t for t, _ in self._pending_clock]) if self._pending_clock else np.empty(0)
        weights = np.concatenate([w for _, w in self._pending_clock]) if self._pending_clock else np.empty(0)
        self._pending_clock = []
        fresh = ack - times
        p50, p99 = _weighted_quantiles(fresh, weights, (0.5, 0.99))
        self._fresh.append((fresh, weights))
        self.pushed_version = target_version
        self.consecutive_failures = 0
        self.rows_pushed += rows
        self.bytes_pushed += nbytes
        report = {"time": ack, "version": target_version, "rows": rows, "deleted": deleted, "bytes": nbytes,
                  "latency_s": latency, "freshness_p50_s": p50, "freshness_p99_s": p99,
                  "cycle_cpu_s": time.thread_time() - self._cycle_cpu0}
        self.reports.append(report)
        return True

    def _fail(self, exc: BaseException, where: str) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = f"{where}: {type(exc).__name__}: {exc}"
        # One line per outage, not one per second of it.
        if self.consecutive_failures == 1:
            log.warning("syncer %s failed (will retry every %.3gs, changes are kept): %s", where,
                        self.interval_s, self.last_error)

    # ------------------------------------------------------------------ dense weights
    def publish_dense(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Queue dense weights for the next cycle (a CPU copy is taken now, so the caller
        may keep training). Binds them to the source's current embedding version."""
        if self.dense_url is None:
            raise RuntimeError("publish_dense needs Syncer(dense_url=...)")
        copy = {}
        for k, v in state_dict.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"dense weight {k!r} is a {type(v).__name__}, expected a tensor")
            copy[k] = v.detach().to("cpu", copy=True)
        version = int(self.source.version)
        with self._dense_lock:
            self._dense_pending = (copy, version)
        self._wake.set()

    def _existing_dense_version(self) -> int:
        if self.dense_url is None:
            return 0
        m = read_manifest(self.dense_url)
        return int(m["dense_version"]) if m else 0

    def _dense_step(self) -> None:
        if self.dense_url is None:
            return
        with self._dense_lock:
            pending, self._dense_pending = self._dense_pending, None
        try:
            if pending is not None:
                self._write_dense(*pending)
            if self._dense_written is not None and self.pushed_version >= self._dense_written[1]:
                if self.manifest is None or self.manifest["dense_version"] != self._dense_written[0]:
                    self._write_manifest()
        except Exception as exc:
            self._fail(exc, "dense")

    def _write_dense(self, tensors: Dict[str, torch.Tensor], embedding_version: int) -> None:
        from gauss_plugins.serialization import save_tensors

        fs, root = _fs(self.dense_url)
        fs.makedirs(root, exist_ok=True)
        version = self._dense_version + 1
        name = f"dense-{version:010d}.safetensors"
        with tempfile.TemporaryDirectory(prefix="gauss-dense-") as tmp:
            local = os.path.join(tmp, name)
            save_tensors(local, tensors, {"dense_version": str(version), "embedding_version": str(embedding_version)})
            remote_tmp = _join(fs, root, f".{name}.tmp")
            fs.put_file(local, remote_tmp)
            fs.mv(remote_tmp, _join(fs, root, name))
        self._dense_version = version
        self._dense_written = (version, embedding_version, name)

    def _write_manifest(self) -> None:
        dense_version, dense_embedding_version, name = self._dense_written
        manifest = {"format": 1, "embedding_version": self.pushed_version, "dense_version": dense_version,
                    "dense_file": name, "dense_embedding_version": dense_embedding_version, "time": time.time()}
        fs, root = _fs(self.dense_url)
        tmp = _join(fs, root, f".{MANIFEST}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode("utf-8"))
        fs.mv(tmp, _join(fs, root, MANIFEST))
        self.manifest = manifest
        # Old dense files: keep the newest keep_dense besides the one named now.
        files = sorted(p for p in fs.ls(root, detail=False) if posixpath.basename(p).startswith("dense-"))
        for p in files[: max(0, len(files) - 1 - self.keep_dense)]:
            fs.rm(p)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> Dict[str, Any]:
        """Totals, the last push report, and freshness p50/p99 over the recent pushes."""
        if self._fresh:
            f = np.concatenate([a for a, _ in self._fresh])
            w = np.concatenate([b for _, b in self._fresh])
            p50, p99 = _weighted_quantiles(f, w, (0.5, 0.99))
        else:
            p50 = p99 = float("nan")
        return {"pushes": len(self.reports), "rows_pushed": self.rows_pushed, "bytes_pushed": self.bytes_pushed,
                "pushed_version": self.pushed_version, "pulled_version": self._pulled_version,
                "pending_rows": len(self._pending), "pending_memory_bytes": self._pending.memory_bytes,
                "spills": self._pending.spills, "failures": self.failures, "resyncs": self.resyncs,
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error,
                "freshness_p50_s": p50, "freshness_p99_s": p99,
                "last_push": self.reports[-1] if self.reports else None,
                "dense_version": self._dense_version, "manifest": self.manifest}
