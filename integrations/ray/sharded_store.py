"""ShardedTierPS: TierPS sharded by id hash across Ray actors (embedding_store ``"tierps_ray"``).

When one machine's RAM and disk are not enough, each shard is a :class:`TierPS` living in
its own Ray actor (placed by Ray on any node of the cluster; its disk tier is a directory on
that node's local disk). The driver routes every id to shard ``fmix64(id) mod num_shards``
(the dynamic table's hash, :func:`gauss_plugins.embedding.index.hash_keys`, so consecutive
ids spread evenly), sends the per-shard slices to all shards at once, and reassembles the
answers in the caller's order. Ids and rows travel as numpy arrays through Ray's object
store; nothing of ours is pickled to disk.

Versions: every ``put`` / ``delete`` through this object advances :attr:`version` by one
and records the shards' own versions after it, so :meth:`changes_since` can ask each shard
for exactly its changes since the corresponding moment -- a
:class:`~gauss_plugins.stores.syncer.Syncer` works on a ShardedTierPS as on a TierPS. Write
through one ShardedTierPS object (one driver); several writers would need several syncers.

Ray must be initialised by the caller (``ray.init(...)``); the shards' lifetime is this
object's (:meth:`close` flushes and ends them).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from gauss_plugins._optional import require
from gauss_plugins.embedding.index import hash_keys
from gauss_plugins.stores.base import ChangeBatch, EmbeddingStore, IdsLike, Lookup, RowBatch, as_ids

ray = require("ray", "ray", "the Ray-sharded TierPS")

__all__ = ["ShardedTierPS", "TierPSShard"]


def _t(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """A writable tensor from an array Ray may have handed out read-only (zero-copy)."""
    return None if a is None else torch.from_numpy(np.array(a, copy=True))


class TierPSShard:
    """One shard: a TierPS in a Ray actor; numpy in, numpy out."""

    def __init__(self, dim: int, path: str, state_dim: int, default: Any, options: Dict[str, Any]):
        import torch as _torch

        from gauss_plugins.stores.tierps import TierPS

        _torch.set_num_threads(1)  # one actor per core; intra-op threads would oversubscribe
        self.ps = TierPS(dim, path, state_dim=state_dim, default=default, **options)

    def put(self, ids: np.ndarray, values: np.ndarray, state: Optional[np.ndarray]) -> int:
        return self.ps.put(_t(ids), _t(values), _t(state))

    def delete(self, ids: np.ndarray) -> int:
        return self.ps.delete(_t(ids))

    def lookup(self, ids: np.ndarray, promote: bool) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        got = self.ps.lookup(_t(ids), promote=promote)
        return got.values.numpy(), (got.state.numpy() if got.state is not None else None), got.found.numpy()

    def changes_since(self, version: int, consumer: Optional[str], full: bool) -> Dict[str, Any]:
        b = self.ps.changes_since(version, consumer=consumer, full=full)
        return {"ids": b.ids.numpy(), "values": b.values.numpy(),
                "state": b.state.numpy() if b.state is not None else None,
                "deleted": b.deleted.numpy(), "version": b.version, "full": b.full}

    def register_consumer(self, name: str, version: Optional[int]) -> None:
        self.ps.register_consumer(name, version)

    def unregister_consumer(self, name: str) -> None:
        self.ps.unregister_consumer(name)

    def export_all(self) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        batches = list(self.ps.export(1 << 62))
        if not batches:
            return np.empty(0, np.int64), np.empty((0, self.ps.dim), np.float32), None
        b = batches[0]
        return b.ids.numpy(), b.values.numpy(), b.state.numpy() if b.state is not None else None

    def version(self) -> int:
        return self.ps.version

    def size(self) -> int:
        return len(self.ps)

    def flush(self) -> int:
        return self.ps.flush()

    def stats(self) -> Dict[str, Any]:
        return self.ps.stats()

    def close(self) -> None:
        self.ps.close()


class ShardedTierPS(EmbeddingStore):
    """TierPS across ``num_shards`` Ray actors (see the module docstring).

    Args:
        dim, state_dim, default: row layout and the value of unknown ids.
        path: base directory; shard i uses ``{path}/shard-{i:03d}-of-{n:03d}`` on its node.
        num_shards: number of actors.
        actor_options: passed to ``.options()`` of each actor (``num_cpus``, resources,
            ``scheduling_strategy``...).
        **tierps_options: passed to each shard's :class:`TierPS` (``ram_bytes`` is per shard).
    """

    def __init__(self, dim: int, path: str, num_shards: int = 2, state_dim: int = 0, default: Any = 0.0, *,
                 actor_options: Optional[Dict[str, Any]] = None, **tierps_options: Any):
        super().__init__(dim, state_dim, default)
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
        if not ray.is_initialized():
            raise RuntimeError("ShardedTierPS needs a running Ray: call ray.init(...) (or ray.init(address=...)) first")
        self.num_shards = num_shards
        self.path = os.path.abspath(path)
        remote = ray.remote(TierPSShard).options(**(actor_options or {}))
        self._shards = [remote.remote(dim, os.path.join(self.path, f"shard-{i:03d}-of-{num_shards:03d}"),
                                      state_dim, self.default.tolist(), dict(tierps_options))
                        for i in range(num_shards)]
        base = ray.get([s.version.remote() for s in self._shards])
        self._lock = threading.Lock()
        self._version = 0
        # driver version -> shard versions right after it (for changes_since)
        self._clock: Dict[int, List[int]] = {0: base}
        self._consumers: Dict[str, int] = {}
        self._closed = False

    # A copy sent to another Ray process (an elastic worker) writes to the same shard actors;
    # it keeps its own version clock, so run a Syncer only on the copy that does the writing.
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ routing
    def shard_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Shard index of each id."""
        return torch.remainder(hash_keys(ids), self.num_shards)

    def _split(self, ids: torch.Tensor) -> List[torch.Tensor]:
        """Positions of ``ids`` per shard."""
        shard = self.shard_of(ids)
        return [torch.nonzero(shard == i).squeeze(1) for i in range(self.num_shards)]

    def _record(self, touched: Dict[int, int]) -> int:
        """Advance the driver version; ``touched``: shard -> its version after this call."""
        shard_versions = list(self._clock[self._version])
        for i, v in touched.items():
            shard_versions[i] = v
        if not self._consumers:  # nobody will ask for an older version: keep only the newest
            self._clock.clear()
        self._version += 1
        self._clock[self._version] = shard_versions
        return self._version

    # ------------------------------------------------------------------ the store API
    @property
    def version(self) -> int:
        return self._version

    def put(self, ids: IdsLike, values: Any, state: Any = None) -> int:
        uniq, vals, st = self._check_put(ids, values, state)
        with self._lock:
            calls = {}
            for i, pos in enumerate(self._split(uniq)):
                if pos.numel():
                    calls[i] = self._shards[i].put.remote(
                        uniq[pos].numpy(), vals[pos].numpy(), st[pos].numpy() if st is not None else None)
            return self._record(dict(zip(calls, ray.get(list(calls.values())))))

    def delete(self, ids: IdsLike) -> int:
        d = as_ids(ids)
        with self._lock:
            calls = {i: self._shards[i].delete.remote(d[pos].numpy())
                     for i, pos in enumerate(self._split(d)) if pos.numel()}
            return self._record(dict(zip(calls, ray.get(list(calls.values())))))

    def lookup(self, ids: IdsLike, promote: bool = True) -> Lookup:
        q = as_ids(ids)
        out = self._missing(q.numel())
        parts = [(pos, self._shards[i].lookup.remote(q[pos].numpy(), promote))
                 for i, pos in enumerate(self._split(q)) if pos.numel()]
        for pos, (values, state, found) in zip([p for p, _ in parts], ray.get([r for _, r in parts])):
            out.values[pos] = _t(values)
            if state is not None:
                out.state[pos] = _t(state)
            out.found[pos] = _t(found)
        return out

    def __len__(self) -> int:
        return int(sum(ray.get([s.size.remote() for s in self._shards])))

    def export(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        for ref in [s.export_all.remote() for s in self._shards]:
            ids, values, state = ray.get(ref)
            for start in range(0, len(ids), batch_size):
                sl = slice(start, start + batch_size)
                yield RowBatch(_t(ids[sl]), _t(values[sl]), _t(state[sl]) if state is not None else None)

    def flush(self) -> int:
        """Flush every shard (the persistence acknowledgement of all of them)."""
        with self._lock:
            ray.get([s.flush.remote() for s in self._shards])
            return self._version

    # ------------------------------------------------------------------ changes for syncers
    def register_consumer(self, name: str, version: Optional[int] = None) -> None:
        with self._lock:
            v = self._version if version is None else int(version)
            shard_versions = self._clock.get(v)
            ray.get([s.register_consumer.remote(name, shard_versions[i] if shard_versions else 0)
                     for i, s in enumerate(self._shards)])
            self._consumers[name] = v

    def unregister_consumer(self, name: str) -> None:
        with self._lock:
            ray.get([s.unregister_consumer.remote(name) for s in self._shards])
            self._consumers.pop(name, None)
            self._trim_clock()

    def _trim_clock(self) -> None:
        low = min(self._consumers.values()) if self._consumers else self._version
        for v in [v for v in self._clock if v < low]:
            del self._clock[v]

    def changes_since(self, version: int, consumer: Optional[str] = None, full: bool = False) -> ChangeBatch:
        """Changes after driver ``version``, gathered from every shard (see TierPS)."""
        with self._lock:
            since = self._clock.get(int(version))
            force_full = full or since is None
            results = ray.get([s.changes_since.remote(since[i] if since else 0, consumer, force_full)
                               for i, s in enumerate(self._shards)])
            if not force_full and any(r["full"] for r in results):
                # One shard could only give its full image: take all of them as full images,
                # so that the batch as a whole is one (ChangeBatch.full is all or nothing).
                results = ray.get([s.changes_since.remote(0, consumer, True) for s in self._shards])
            if consumer is not None:
                self._consumers[consumer] = max(int(version), self._consumers.get(consumer, 0))
                self._trim_clock()
            cur = self._version
        ids = torch.cat([_t(r["ids"]) for r in results])
        values = torch.cat([_t(r["values"]).reshape(-1, self.dim) for r in results])
        state = torch.cat([_t(r["state"]) for r in results]) if self.state_dim else None
        deleted = torch.cat([_t(r["deleted"]) for r in results])
        return ChangeBatch(ids, values, state, deleted, cur, full=all(r["full"] for r in results))

    def stats(self) -> Dict[str, Any]:
        shard_stats = ray.get([s.stats.remote() for s in self._shards])
        return {"kind": "tierps_ray", "dim": self.dim, "state_dim": self.state_dim, "version": self._version,
                "num_shards": self.num_shards, "rows": sum(s["rows"] for s in shard_stats), "shards": shard_stats}

    def close(self) -> None:
        """Flush and close every shard, then end the actors."""
        if self._closed:
            return
        self._closed = True
        try:
            ray.get([s.close.remote() for s in self._shards])
        finally:
            for s in self._shards:
                ray.kill(s)
