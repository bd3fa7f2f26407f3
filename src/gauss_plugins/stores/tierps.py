"""TierPS: the training store -- a RAM tier over an on-disk tier for cold rows.

RAM tier
    The rows training touches live in dense arrays (values, optimizer state, last-access
    tick, dirty flag) addressed through the dynamic-table hash index of
    :mod:`gauss_plugins.embedding.index` (the ``table_backend`` chosen by the registry, e.g.
    the compiled CPU index; the torch reference otherwise). ``ram_bytes`` bounds the tier:
    when new rows would exceed it, the least recently accessed rows (never those of the
    current batch) are *demoted*: written to the disk tier if dirty, then dropped from RAM.
    A lookup of a row held only on disk *promotes* it back into RAM.

Disk tier
    :class:`~gauss_plugins.stores.disk.DiskTier`: an append-only segment log of packed rows
    with per-record CRC32, fsync before acknowledgement, torn-tail truncation on recovery and
    compaction by write-temp/fsync/rename (its module docstring has the details).

Durability contract
    ``put`` / ``delete`` change RAM (fast, not durable). :meth:`TierPS.flush` writes every
    dirty RAM row to the log and fsyncs it: when ``flush`` returns, every row written before
    the call is *acknowledged as persisted*. A process killed at any moment (kill -9) leaves
    a directory that :class:`TierPS` reopens holding every acknowledged row, with its last
    acknowledged value or a newer value that reached the log (by demotion or a later flush).
    Invariant that makes this cheap: a clean RAM row has the same value as its disk copy.
    Deletes are logged at once (a tombstone record), so a deleted row does not come back.

Changes for syncers
    Each ``put`` / ``delete`` gets the next :attr:`TierPS.version` and is logged as
    ``(version, time, ids, is_delete)``. :meth:`TierPS.changes_since` turns the entries after
    a version into a :class:`~gauss_plugins.stores.base.ChangeBatch` (current values of the
    upserted ids, from whichever tier holds them; ids whose last operation was a delete as
    tombstones). Demotion and promotion are not changes. Each consumer (a
    :class:`~gauss_plugins.stores.syncer.Syncer`) names itself; entries every consumer has
    read are dropped, so the log stays as small as the slowest consumer's lag. A consumer
    asking for a version older than the log (a syncer attached later, or after a restart)
    gets a full export instead.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from gauss_plugins.stores.base import (ChangeBatch, EmbeddingStore, IdsLike, Lookup, RowBatch, as_ids,
                                       last_occurrence)
from gauss_plugins.stores.disk import DiskTier, make_index

__all__ = ["TierPS"]

# Per RAM row besides values/state: tick (8), dirty (1), hash-index slots (~16 at 0.75 load).
_RAM_OVERHEAD_BYTES = 25


class TierPS(EmbeddingStore):
    """Training store with a RAM tier and a crash-consistent disk tier (module docstring).

    Args:
        dim, state_dim, default: row layout and the value of unknown ids.
        path: directory of the disk tier (created; reopened with its rows after a crash).
        ram_bytes: budget of the RAM tier (values + state + bookkeeping).
        sync_writes: fsync every disk record (else only at :meth:`flush`, the ack point).
        segment_bytes, compact_ratio, min_compact_bytes: disk-tier tuning.
        index_backend: ``table_backend`` of the RAM index (``"auto"``, ``"torch"``, ...).
    """

    def __init__(self, dim: int, path: str, state_dim: int = 0, default: Any = 0.0, *,
                 ram_bytes: int = 256 << 20, sync_writes: bool = False, segment_bytes: int = 64 << 20,
                 compact_ratio: float = 0.5, min_compact_bytes: int = 16 << 20, index_backend: str = "auto",
                 initial_capacity: int = 4096):
        super().__init__(dim, state_dim, default)
        self.row_bytes = 4 * (dim + state_dim) + _RAM_OVERHEAD_BYTES
        self.max_ram_rows = int(ram_bytes) // self.row_bytes
        if self.max_ram_rows < 1:
            raise ValueError(f"ram_bytes={ram_bytes} holds no row of {self.row_bytes} bytes")
        self.ram_bytes = int(ram_bytes)
        self._lock = threading.RLock()
        self.disk = DiskTier(path, dim + state_dim, sync=sync_writes, segment_bytes=segment_bytes,
                             compact_ratio=compact_ratio, min_compact_bytes=min_compact_bytes,
                             index_backend=index_backend)
        cap = max(16, min(initial_capacity, self.max_ram_rows))
        self._index_backend = index_backend
        self._index = make_index(index_backend, cap)
        self._values = torch.zeros(cap, dim)
        self._state = torch.zeros(cap, state_dim)
        self._tick = torch.zeros(cap, dtype=torch.int64)
        self._dirty = torch.zeros(cap, dtype=torch.bool)
        self._clock = 0  # access counter for recency (cheaper and steadier than wall time)
        self._version = self.disk.max_version
        # change log: (version, wall time, ids, is_delete); see the module docstring
        self._log: List[Tuple[int, float, torch.Tensor, bool]] = []
        self._log_start = self._version  # versions <= this are not in the log
        self._consumers: Dict[str, int] = {}
        self._counters = {"demoted": 0, "promoted": 0, "flushes": 0, "demotion_rounds": 0}

    # ------------------------------------------------------------------ RAM tier plumbing
    @property
    def ram_rows(self) -> int:
        return len(self._index)

    def _grow(self, needed: int) -> None:
        cap = self._index.capacity
        if needed <= cap:
            return
        new_cap = min(max(needed, cap * 2), self.max_ram_rows)
        self._index.rehash(new_cap)
        for name in ("_values", "_state", "_tick", "_dirty"):
            old = getattr(self, name)
            new = torch.zeros((new_cap,) + tuple(old.shape[1:]), dtype=old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def _make_room(self, n_new: int, protect: torch.Tensor) -> None:
        """Demote the coldest RAM rows (not in ``protect``) so ``n_new`` more rows fit."""
        if n_new > self.max_ram_rows:
            raise ValueError(f"a batch of {n_new} new rows exceeds the RAM tier ({self.max_ram_rows} rows at "
                             f"ram_bytes={self.ram_bytes}); raise ram_bytes or split the batch")
        excess = len(self._index) + n_new - self.max_ram_rows
        if excess > 0:
            # Demote a little more than needed so demotion runs in batches, not every call.
            self._demote(min(len(self._index), excess + max(1, self.max_ram_rows // 16)), protect)
        if len(self._index) + n_new > self.max_ram_rows:  # the batch's own rows do not fit
            raise ValueError(f"a batch touching {len(self._index) + n_new} rows exceeds the RAM tier "
                             f"({self.max_ram_rows} rows at ram_bytes={self.ram_bytes}); raise ram_bytes or split it")
        self._grow(len(self._index) + n_new)

    def _demote(self, count: int, protect: torch.Tensor) -> None:
        keys, rows = self._index.keys_and_rows()
        if protect.numel():
            keep = ~torch.isin(keys, protect)
            keys, rows = keys[keep], rows[keep]
        count = min(count, keys.numel())
        if count <= 0:
            return
        cold = torch.topk(self._tick.index_select(0, rows), count, largest=False).indices
        keys, rows = keys[cold], rows[cold]
        dirty = self._dirty.index_select(0, rows)
        if bool(dirty.any()):
            self.disk.put(keys[dirty], self._ram_rows(rows[dirty]), self._version)
        self._index.remove(keys)
        self._dirty[rows] = False
        self._counters["demoted"] += count
        self._counters["demotion_rounds"] += 1

    def _ram_rows(self, rows: torch.Tensor) -> torch.Tensor:
        v = self._values.index_select(0, rows)
        return torch.cat([v, self._state.index_select(0, rows)], dim=1) if self.state_dim else v

    def _insert_ram(self, ids: torch.Tensor, values: torch.Tensor, state: Optional[torch.Tensor], dirty: bool) -> None:
        """Write distinct ``ids`` into RAM (room must have been made)."""
        rows, _ = self._index.insert(ids)
        self._values[rows] = values
        if self.state_dim:
            self._state[rows] = state if state is not None else 0.0
        self._clock += 1
        self._tick[rows] = self._clock
        self._dirty[rows] = dirty

    # ------------------------------------------------------------------ the store API
    @property
    def version(self) -> int:
        return self._version

    def put(self, ids: IdsLike, values: Any, state: Any = None) -> int:
        uniq, vals, st = self._check_put(ids, values, state)
        if uniq.numel() == 0:
            return self._version
        with self._lock:
            present = self._index.find(uniq) >= 0
            n_new = int((~present).sum())
            if n_new:
                self._make_room(n_new, uniq)
            if st is None and self.state_dim:
                # Keep the optimizer state a row already has (RAM or disk); zeros for new rows.
                st = self._peek(uniq)[1]
            self._insert_ram(uniq, vals, st, dirty=True)
            self._version += 1
            self._log_change(uniq, False)
            return self._version

    def delete(self, ids: IdsLike) -> int:
        d = as_ids(ids)
        with self._lock:
            if d.numel():
                rows = self._index.remove(d)
                self._dirty[rows[rows >= 0]] = False
                self.disk.delete(d, self._version + 1)
            self._version += 1
            self._log_change(torch.unique(d), True)
            return self._version

    def lookup(self, ids: IdsLike, promote: bool = True) -> Lookup:
        """Rows of ``ids``; rows found only on disk are promoted into RAM unless ``promote=False``."""
        q = as_ids(ids)
        with self._lock:
            uniq, inverse = torch.unique(q, return_inverse=True)
            values, state, found = self._peek(uniq, touch=True)
            if promote:
                self._promote(uniq, values, state, found)
        out_state = state.index_select(0, inverse) if self.state_dim else None
        return Lookup(values.index_select(0, inverse), out_state, found.index_select(0, inverse))

    def _peek(self, uniq: torch.Tensor, touch: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, state, found)`` of distinct ids from RAM, else disk; no promotion."""
        n = uniq.numel()
        rows = self._index.find(uniq)
        in_ram = rows >= 0
        if n and bool(in_ram.all()):  # the common case of hot rows: one gather, no masks
            if touch:
                self._clock += 1
                self._tick[rows] = self._clock
            return self._values.index_select(0, rows), self._state.index_select(0, rows), in_ram
        values = self.default.expand(n, self.dim).clone()
        state = torch.zeros(n, self.state_dim)
        if bool(in_ram.any()):
            r = rows[in_ram]
            values[in_ram] = self._values.index_select(0, r)
            if self.state_dim:
                state[in_ram] = self._state.index_select(0, r)
            if touch:
                self._clock += 1
                self._tick[r] = self._clock
        found = in_ram.clone()
        miss = ~in_ram
        if bool(miss.any()) and len(self.disk):
            disk_rows, on_disk = self.disk.get(uniq[miss])
            if bool(on_disk.any()):
                at = torch.nonzero(miss).squeeze(1)[on_disk]
                values[at] = disk_rows[on_disk, : self.dim]
                if self.state_dim:
                    state[at] = disk_rows[on_disk, self.dim:]
                found[at] = True
        return values, state, found

    def _promote(self, uniq: torch.Tensor, values: torch.Tensor, state: torch.Tensor, found: torch.Tensor) -> None:
        cold = found & (self._index.find(uniq) < 0)
        n = int(cold.sum())
        if n == 0:
            return
        try:
            self._make_room(n, uniq)
        except ValueError:  # a scan larger than RAM: served from disk, RAM keeps what it has
            return
        self._insert_ram(uniq[cold], values[cold], state[cold] if self.state_dim else None, dirty=False)
        self._counters["promoted"] += n

    def flush(self) -> int:
        """Write every dirty RAM row to disk and fsync: the persistence acknowledgement.
        Returns the version acknowledged."""
        with self._lock:
            keys, rows = self._index.keys_and_rows()
            dirty = self._dirty.index_select(0, rows)
            keys, rows = keys[dirty], rows[dirty]
            for s in range(0, keys.numel(), 262_144):
                self.disk.put(keys[s:s + 262_144], self._ram_rows(rows[s:s + 262_144]), self._version)
            self.disk.sync()
            self._dirty[rows] = False
            self._counters["flushes"] += 1
            return self._version

    def __len__(self) -> int:
        with self._lock:
            keys, _ = self._index.keys_and_rows()
            both = int(self.disk.contains(keys).sum()) if len(self.disk) else 0
            return len(self._index) + len(self.disk) - both

    def export(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        """Every row (RAM rows, then disk-only rows), without promoting anything."""
        with self._lock:
            ram_keys, _ = self._index.keys_and_rows()
            disk_keys = self.disk.ids()
            if ram_keys.numel() and disk_keys.numel():
                disk_keys = disk_keys[~torch.isin(disk_keys, ram_keys)]
            all_keys = torch.cat([ram_keys, disk_keys])
        for s in range(0, all_keys.numel(), batch_size):
            k = all_keys[s:s + batch_size]
            with self._lock:
                v, st, found = self._peek(k)
            yield RowBatch(k[found], v[found], st[found] if self.state_dim else None)

    # ------------------------------------------------------------------ changes for syncers
    def _log_change(self, ids: torch.Tensor, is_delete: bool) -> None:
        if self._consumers:
            self._log.append((self._version, time.time(), ids, is_delete))
        else:
            self._log_start = self._version  # nobody reads the log: keep none

    def register_consumer(self, name: str, version: Optional[int] = None) -> None:
        """Start keeping changes for ``name`` from ``version`` (default: now)."""
        with self._lock:
            # A version before the log's start gets a full export on its first read.
            self._consumers[name] = self._version if version is None else int(version)

    def unregister_consumer(self, name: str) -> None:
        with self._lock:
            self._consumers.pop(name, None)
            self._trim()

    def _trim(self) -> None:
        if not self._consumers:
            self._log.clear()
            self._log_start = self._version
            return
        low = min(self._consumers.values())
        i = 0
        while i < len(self._log) and self._log[i][0] <= low:
            i += 1
        if i:
            self._log_start = self._log[i - 1][0]
            del self._log[:i]

    def changes_since(self, version: int, consumer: Optional[str] = None, full: bool = False) -> ChangeBatch:
        """Rows changed and ids deleted after ``version``, as of now (module docstring).

        With ``consumer`` the call also acknowledges ``version`` for it: entries up to there
        may be dropped once every consumer has read them. ``full=True`` (or a ``version``
        older than the log) returns a complete image of the store instead (``batch.full``).
        """
        with self._lock:
            if consumer is not None:
                if consumer not in self._consumers:
                    self._consumers[consumer] = version
                self._consumers[consumer] = max(int(version), self._consumers[consumer])
                self._trim()
            if full or version < self._log_start:
                return self._full_batch()
            entries = [e for e in self._log if e[0] > version]
            if not entries:
                return ChangeBatch(torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim),
                                   torch.empty(0, self.state_dim) if self.state_dim else None,
                                   torch.empty(0, dtype=torch.int64), self._version)
            ids = torch.cat([e[2] for e in entries])
            is_del = torch.cat([torch.full((e[2].numel(),), e[3], dtype=torch.bool) for e in entries])
            uniq, last = last_occurrence(ids)
            deleted_last = is_del.index_select(0, last)
            up = uniq[~deleted_last]
            values, state, found = self._peek(up)
            # An id whose last operation was a put is held by a tier: found is all True.
            if not bool(found.all()):
                raise RuntimeError("TierPS change log names a row that no tier holds (a bug)")
            return ChangeBatch(up, values, state if self.state_dim else None, uniq[deleted_last], self._version)

    def _full_batch(self) -> ChangeBatch:
        batches = list(self.export(1 << 30))
        if batches:
            b = batches[0]
            return ChangeBatch(b.ids, b.values, b.state, torch.empty(0, dtype=torch.int64), self._version, full=True)
        return ChangeBatch(torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim),
                           torch.empty(0, self.state_dim) if self.state_dim else None,
                           torch.empty(0, dtype=torch.int64), self._version, full=True)

    def update_clock(self, after: int, upto: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(wall times, row counts)`` of the puts with ``after < version <= upto`` (freshness)."""
        with self._lock:
            sel = [(e[1], e[2].numel()) for e in self._log if after < e[0] <= upto and not e[3]]
        if not sel:
            return np.empty(0), np.empty(0, dtype=np.int64)
        t, n = zip(*sel)
        return np.asarray(t, dtype=np.float64), np.asarray(n, dtype=np.int64)

    # ------------------------------------------------------------------ housekeeping
    def stats(self) -> Dict[str, Any]:
        with self._lock:
            s = super().stats()
            s.update(kind="tierps", ram_rows=self.ram_rows, max_ram_rows=self.max_ram_rows, ram_bytes=self.ram_bytes,
                     disk_rows=len(self.disk), disk_log_bytes=self.disk.log_bytes,
                     disk_compactions=self.disk.compactions, change_log_entries=len(self._log),
                     consumers=dict(self._consumers), **self._counters)
            return s

    def close(self, flush: bool = True) -> None:
        """Flush (acknowledging every row; ``flush=False``: drop the RAM tier's unflushed
        changes, as a crash would) and close the disk tier."""
        with self._lock:
            if self.disk._fd is None:
                return
            if flush:
                self.flush()
            self.disk.close()
