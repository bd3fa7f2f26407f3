"""WePS embedded: the in-process serving store, read-optimised, with versioned snapshots.

Serving reads far more than it writes, and a reader must never see half a push. So the
content is a chain of immutable *layers*, newest first: each push of the syncer becomes one
small layer (sorted ids, packed rows, live/tombstone flags) and a new immutable
:class:`Snapshot` ``(version, layers)`` is published with one reference assignment. A reader
takes the current snapshot (or a pinned older one) and resolves ids newest layer first with
``searchsorted`` -- no lock on the read path, and a snapshot never changes once published.

Small layers are folded together when there are more than ``max_layers``, and folded into
the base layer (tombstones dropped) once the deltas exceed ``merge_fraction`` of the base:
amortised O(changed rows) per push instead of rewriting the table each second. The last
``retain`` snapshots stay addressable by version, so a reader holding a manifest
``(embedding_version, dense_version)`` can read exactly the rows that version named.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from gauss_plugins.stores.base import (ChangeBatch, EmbeddingStore, IdsLike, Lookup, RowBatch, as_ids,
                                       last_occurrence)

__all__ = ["WePS", "Snapshot"]


@dataclass(frozen=True)
class _Layer:
    ids: torch.Tensor    # [n] int64, sorted, unique
    rows: torch.Tensor   # [n, dim + state_dim] float32
    live: torch.Tensor   # [n] bool; False = tombstone (the id was deleted at this layer)

    def __len__(self) -> int:
        return int(self.ids.numel())


def _merge_layers(layers: Tuple[_Layer, ...], width: int, drop_tombstones: bool) -> _Layer:
    """One layer equivalent to ``layers`` (newest first)."""
    oldest_first = layers[::-1]
    ids = torch.cat([l.ids for l in oldest_first]) if layers else torch.empty(0, dtype=torch.int64)
    if ids.numel() == 0:
        return _Layer(ids, torch.empty(0, width), torch.empty(0, dtype=torch.bool))
    rows = torch.cat([l.rows for l in oldest_first])
    live = torch.cat([l.live for l in oldest_first])
    # Stable sort keeps the older-to-newer order among equal ids: the last of a run wins.
    sorted_ids, order = torch.sort(ids, stable=True)
    keep = torch.ones_like(sorted_ids, dtype=torch.bool)
    keep[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    order = order[keep]
    if drop_tombstones:
        order = order[live.index_select(0, order)]
    return _Layer(ids.index_select(0, order), rows.index_select(0, order), live.index_select(0, order))


class Snapshot:
    """An immutable view of a :class:`WePS` at one ``version``; safe to read from any thread."""

    def __init__(self, version: int, layers: Tuple[_Layer, ...], num_rows: int, store: "WePS"):
        self.version = version
        self._layers = layers
        self._num_rows = num_rows
        self._dim = store.dim
        self._state_dim = store.state_dim
        self._default = store.default

    def __len__(self) -> int:
        return self._num_rows

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def lookup(self, ids: IdsLike) -> Lookup:
        """Values, state and found mask of ``ids`` as of this snapshot."""
        q = as_ids(ids)
        n = q.numel()
        width = self._dim + self._state_dim
        rows = torch.empty(n, width)
        rows[:, : self._dim] = self._default
        rows[:, self._dim:] = 0.0
        found = torch.zeros(n, dtype=torch.bool)
        pending = torch.arange(n)  # positions not yet resolved by a newer layer
        for layer in self._layers:
            if pending.numel() == 0:
                break
            if len(layer) == 0:
                continue
            sub = q.index_select(0, pending)
            pos = torch.searchsorted(layer.ids, sub).clamp_(max=len(layer) - 1)
            hit = layer.ids.index_select(0, pos) == sub
            if not bool(hit.any()):
                continue
            hit_at = pending[hit]
            hit_pos = pos[hit]
            alive = layer.live.index_select(0, hit_pos)
            # A tombstone resolves the id too: an older layer's row must not shine through.
            rows[hit_at[alive]] = layer.rows.index_select(0, hit_pos[alive])
            found[hit_at[alive]] = True
            pending = pending[~hit]
        values = rows[:, : self._dim]
        state = rows[:, self._dim:] if self._state_dim else None
        return Lookup(values, state, found)

    def get(self, ids: IdsLike) -> torch.Tensor:
        return self.lookup(ids).values

    def rows(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        merged = _merge_layers(self._layers, self._dim + self._state_dim, drop_tombstones=True)
        for start in range(0, len(merged), batch_size):
            r = merged.rows[start:start + batch_size]
            yield RowBatch(merged.ids[start:start + batch_size], r[:, : self._dim],
                           r[:, self._dim:] if self._state_dim else None)


class WePS(EmbeddingStore):
    """The embedded serving store (registered as embedding_store ``"weps"``).

    Args:
        dim: row width. state_dim: optimizer-state width kept with rows (serving usually 0).
        default: value (scalar or ``[dim]``) returned for unknown or deleted ids.
        retain: how many recent snapshots stay addressable by version (>= 1).
        max_layers: delta layers before they are folded into one.
        merge_fraction: fold the deltas into the base once they hold this fraction of it.
    """

    #: a syncer hands a whole push to :meth:`apply_changes` at once (it becomes one snapshot)
    atomic_apply = True

    def __init__(self, dim: int, state_dim: int = 0, default: Any = 0.0, retain: int = 4,
                 max_layers: int = 6, merge_fraction: float = 0.25):
        super().__init__(dim, state_dim, default)
        if retain < 1 or max_layers < 1 or not (0.0 < merge_fraction):
            raise ValueError("retain and max_layers must be >= 1 and merge_fraction > 0")
        self.retain = retain
        self.max_layers = max_layers
        self.merge_fraction = float(merge_fraction)
        self._write_lock = threading.Lock()
        self._current = Snapshot(0, (), 0, self)
        self._retained: "OrderedDict[int, Snapshot]" = OrderedDict([(0, self._current)])
        self._merges = 0
        self._pushes = 0

    # -- reads (lock-free: one attribute read)
    def snapshot(self, version: Optional[int] = None) -> Snapshot:
        """The current snapshot, or the retained one of exactly ``version``."""
        if version is None:
            return self._current
        snap = self._retained.get(int(version))
        if snap is None:
            raise KeyError(f"WePS version {version} is not retained (retained: {list(self._retained)}); "
                           f"raise retain= or read the current snapshot")
        return snap

    def lookup(self, ids: IdsLike) -> Lookup:
        return self._current.lookup(ids)

    @property
    def version(self) -> int:
        return self._current.version

    def __len__(self) -> int:
        return len(self._current)

    def export(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        return self._current.rows(batch_size)

    def stored_ids(self) -> torch.Tensor:
        """Every id held by the current snapshot."""
        snap = self._current
        return _merge_layers(snap._layers, self.dim + self.state_dim, drop_tombstones=True).ids

    # -- writes
    def put(self, ids: IdsLike, values: Any, state: Any = None) -> int:
        uniq, vals, st = self._check_put(ids, values, state)
        with self._write_lock:
            return self._publish(uniq, vals, st, torch.empty(0, dtype=torch.int64), self.version + 1)

    def delete(self, ids: IdsLike) -> int:
        d = as_ids(ids)
        with self._write_lock:
            return self._publish(torch.empty(0, dtype=torch.int64), torch.empty(0, self.dim), None, d,
                                 self.version + 1)

    def apply_changes(self, batch: ChangeBatch) -> None:
        """Make a whole syncer push visible at once, as snapshot ``batch.version``."""
        uniq, vals, st = self._check_put(batch.ids, batch.values, batch.state)
        deleted = as_ids(batch.deleted, "deleted")
        with self._write_lock:
            if batch.version < self.version:
                raise ValueError(f"push of version {batch.version} is older than WePS version {self.version}")
            self._publish(uniq, vals, st, deleted, int(batch.version))

    def _publish(self, ids: torch.Tensor, values: torch.Tensor, state: Optional[torch.Tensor],
                 deleted: torch.Tensor, version: int) -> int:
        width = self.dim + self.state_dim
        prev = self._current
        # An id both upserted and deleted in one push: the upsert is what the source holds now
        # (a syncer reads deletions before changes), so the tombstone is dropped.
        if deleted.numel() and ids.numel():
            deleted = deleted[~torch.isin(deleted, ids)]
        deleted, _ = last_occurrence(deleted)
        rows = torch.zeros(ids.numel() + deleted.numel(), width)
        rows[: ids.numel(), : self.dim] = values
        if state is not None:
            rows[: ids.numel(), self.dim:] = state
        all_ids = torch.cat([ids, deleted])
        live = torch.cat([torch.ones(ids.numel(), dtype=torch.bool), torch.zeros(deleted.numel(), dtype=torch.bool)])
        order = torch.argsort(all_ids)
        layer = _Layer(all_ids[order], rows[order], live[order])
        # Row count: new ids add one, deleted ids that were live remove one.
        existed = prev.lookup(layer.ids).found if len(layer) else torch.zeros(0, dtype=torch.bool)
        num_rows = len(prev) + int((layer.live & ~existed).sum()) - int((~layer.live & existed).sum())
        layers = (layer,) + prev._layers if len(layer) else prev._layers
        layers = self._compact(layers, width)
        snap = Snapshot(version, layers, num_rows, self)
        self._current = snap  # the publication: readers switch here, atomically
        self._retained[version] = snap
        self._retained.move_to_end(version)
        while len(self._retained) > self.retain:
            self._retained.popitem(last=False)
        self._pushes += 1
        return version

    def _compact(self, layers: Tuple[_Layer, ...], width: int) -> Tuple[_Layer, ...]:
        if len(layers) <= 1:
            return layers
        base, deltas = layers[-1], layers[:-1]
        delta_rows = sum(len(l) for l in deltas)
        if delta_rows > self.merge_fraction * len(base):
            self._merges += 1
            return (_merge_layers(layers, width, drop_tombstones=True),)
        if len(deltas) > self.max_layers:
            return (_merge_layers(deltas, width, drop_tombstones=False), base)
        return layers

    def stats(self) -> Dict[str, Any]:
        s = super().stats()
        snap = self._current
        s.update(layers=snap.num_layers, retained_versions=list(self._retained), base_merges=self._merges,
                 pushes=self._pushes, kind="weps")
        return s
