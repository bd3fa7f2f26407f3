"""``LookaheadCache``: a Bagpipe-style (SOSP'23) embedding cache in front of a backing store.

::

    cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=20_000, window=8),
                           ids_fn=lambda batch: {"items": batch["item_ids"]})
    for batch in cache.wrap(loader):     # yielded once every row its ids need is resident
        loss = model(batch); loss.backward(); dense_opt.step(); sparse_opt.step()
        cache.step_done()                # the step used its rows: they may be evicted now
    cache.flush()                        # every changed row back to the store
    cache.stats()                        # hits/misses at use, prefetched rows, stall ms, window...

The fast tier is each :class:`~gauss_plugins.embedding.table.DynamicEmbeddingTable`
itself (GPU memory on GPU, RAM on CPU), holding at most ``budget_rows`` rows; the store
(TierPS, local or sharded on Ray) holds the rest, with their optimizer state. The table is
backed by the store (:mod:`gauss_plugins.embedding.backing`), so an evicted row that changed
is written back and a row fetched again comes back with its state.

How it works. The cache pulls batches from the loader ahead of training and keeps a
*window* of up to ``window`` batches (the one being trained included). When a batch enters
the window, the ids it needs that are neither resident nor already being fetched are
*reserved* room and handed to a background worker (a thread; on GPU it copies the rows on
a separate CUDA stream) that reads them from the store. To make room, rows that no batch in
the window needs are evicted (the policy orders them; the lookahead policy takes the one
used longest ago); a changed row is written back by the same worker, in order, so a later
read of the id sees the write. A batch is yielded only after the rows fetched for it are
installed in the table: every row a step touches is resident when it starts (``misses_at_use``
counts violations; it stays 0). When the window's rows do not fit the budget, the window
shrinks instead of failing (batches wait outside it) and grows back as rows free up; only
a single batch that needs more rows than the budget is an error (:class:`BudgetError`).

Policies without lookahead (the ``lru`` / ``lfu`` baselines) use the same machinery with a
window of one batch: its missing rows are fetched synchronously when it arrives.

The bookkeeping stays on the host. The cache keeps its own record of the rows it holds (a
CPU hash index of the resident and in-flight ids with each one's ``last_use`` / ``uses``):
admission, victim choice and the per-step updates never ask the table, so on a GPU they make
no host synchronisation (asking a CUDA table is one per boolean mask, ``unique`` or count
read back, and each waits for all the GPU work queued so far). The GPU only receives the
decisions: installs (rows copied on the side stream, split by positions known on the host)
and evictions (rows, optimizer state and dirty flags copied to pinned host memory without
waiting; the worker waits for the copy's event and writes the changed rows back, in order
before any later read of them). What is left is the GPU hash index's own insert and removal
(a few syncs a step); ``tests/cache/test_lookahead_gpu.py`` bounds the count. Give the
loader's ids on the CPU (ids on the GPU cost one read back a batch), and a GPU table some
``max_capacity`` over ``budget_rows``: an index filled to its capacity rebuilds its slots
every few evictions. The check that every id of a step has its row asks the table itself;
on a GPU its count stays there until :meth:`stats` or :attr:`per_step` is read.

Data parallel ("logically replicated, physically partitioned"): ``exchange(ids)`` turns a
rank's ids of a batch into the ids of the *global* batch (an all_gather under a strategy),
so every replica caches the same rows and makes the same decisions; ``owner_fn(ids) -> bool``
says which changed rows this rank writes back (each row by exactly one replica). The tables
must receive the same updates on every replica (gradients combined across replicas). Each
replica drains its queued write-backs before calling ``exchange`` for the next batch, so
once the collective returns, every row any replica evicted is in the store before anyone
fetches it again: use ``owner_fn`` only together with a collective ``exchange``. A store
whose reads the *owner* answers from its own worker queue (``owner_serves_reads=True``: the
strategy's ``PartitionedStore``, where a read is a collective in which each replica serves
the ids it owns) needs no drain: the owner queued the write of a row before the read of it,
and its worker runs them in that order, so the training thread does not wait for the worker
(the drain cost a data-parallel step several ms of waiting for the previous reads' collectives).

Physically partitioned (``owned_only=True``, with ``exchange`` and ``owner_fn``): each replica
caches only the rows of the global batch's ids that it owns, so the admission, eviction,
prefetch and install work is split across the replicas instead of repeated by each, and its
store is its own partition (reads and write-backs of owned rows only, in order on its
worker: no drain). ``exchange`` then returns each rank's distinct ids of the batch as a list
(rank order); :meth:`batch_parts` hands them to the training step, which borrows the rows of
its own batch that other replicas own and sends their gradients back (the strategy does this
by all-to-all; see ``gauss_integrations.lightning.strategy``).

One thread trains: ``wrap`` / ``step_done`` / ``flush`` must be called from the training
thread; only the store reads and writes run on the worker.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional

import torch

from gauss_plugins.cache.policies import CachePolicy

__all__ = ["CacheConfig", "LookaheadCache", "BudgetError"]

IdsFn = Callable[[Any], Mapping[str, torch.Tensor]]


class BudgetError(RuntimeError):
    """A single batch needs more rows of a table than the cache's budget holds."""


@dataclass(kw_only=True)
class CacheConfig:
    """``budget_rows``: the most rows each table holds (its fast tier). ``window``: batches
    looked at ahead, the one being trained included (1: no lookahead). ``policy``: a
    registered ``cache_policy`` name (``"lookahead"``, ``"lru"``, ``"lfu"``) or a
    :class:`~gauss_plugins.cache.policies.CachePolicy`. ``prefetch``: read rows on a
    background worker (False: on the training thread, when the batch is due).
    ``min_window``: the window may not shrink below this; a budget that cannot hold that
    many batches' rows raises :class:`BudgetError`."""

    budget_rows: int
    window: int = 8
    policy: Any = "lookahead"
    prefetch: bool = True
    min_window: int = 1

    def __post_init__(self) -> None:
        for name in ("budget_rows", "window", "min_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CacheConfig.{name} must be a positive int, got {value!r}")
        if self.min_window > self.window:
            raise ValueError(f"CacheConfig.min_window ({self.min_window}) must not exceed window ({self.window})")
        if not isinstance(self.policy, (str, CachePolicy)):
            raise TypeError(f"CacheConfig.policy must be a registered cache_policy name or a CachePolicy, "
                            f"got {type(self.policy).__name__}")


class _Job:
    """One store operation for the worker: a read of ids (its result is a ``Lookup``,
    moved to ``device``) or a write. Run inline when there is no worker."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the training thread, which raises it
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError(f"the cache's store worker failed: {type(self.error).__name__}: {self.error}") \
                from self.error
        return self.result


class _Worker:
    """A thread that runs store reads and writes in submission order (so a read of an id
    always sees an earlier write of it)."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._last: Optional[_Job] = None
        self._thread = threading.Thread(target=self._run, name="gauss-lookahead-cache", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.run()

    def submit(self, fn: Callable[[], Any]) -> _Job:
        job = _Job(fn)
        self._last = job
        self._queue.put(job)
        return job

    def drain(self) -> None:
        """Wait until everything submitted so far has run."""
        last = self._last
        if last is not None:
            last.wait()

    def stop(self) -> None:
        """Let the thread end after the jobs queued so far."""
        self._queue.put(None)

    def close(self) -> None:
        self.stop()
        self._thread.join()


@dataclass
class _Entry:
    """A batch pulled from the loader, with the distinct (global) ids it needs per table:
    ``host`` on the CPU (the cache's bookkeeping), ``ids`` on the table's device (the step's)."""

    batch: Any
    ids: Dict[str, torch.Tensor]
    host: Dict[str, torch.Tensor]
    jobs: List[Any] = field(default_factory=list)   # (table name, host ids, job) fetched for it
    parts: Dict[str, List[torch.Tensor]] = field(default_factory=dict)  # each rank's ids (list exchange)


def _host_index(capacity: int) -> Any:
    """A hash index on the CPU (the compiled one where it builds, as tables on the CPU use)."""
    from gauss_plugins.plugins import get_registry

    cpu = torch.device("cpu")
    return get_registry().select("table_backend", "auto", device=cpu).create(capacity, cpu)


class _Residency:
    """The rows the cache holds in one table, kept on the host: every id that is resident or
    being fetched (``fetching``), with the policy's per-row state (``last_use``, ``uses``).

    The cache decides every admission and eviction itself, so it does not need to ask the
    table (on a GPU each question would be a host synchronisation: a boolean-mask index, a
    ``.sum()`` read back, ``torch.unique``): the table only receives the resulting installs and
    evictions. :meth:`LookaheadCache.wrap` rebuilds this record from the table when an
    iteration starts, so rows changed outside an iteration (evaluation installs) are seen."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.index = _host_index(capacity)
        self.last_use = torch.zeros(capacity, dtype=torch.int64)
        self.uses = torch.zeros(capacity, dtype=torch.int64)
        self.fetching = torch.zeros(capacity, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.index)

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        return self.index.find(ids)

    def reserve(self, ids: torch.Tensor, step: int) -> None:
        """``ids`` (distinct, absent) get a place; their rows are being fetched."""
        slots, _ = self.index.insert(ids)
        self.last_use[slots] = step
        self.uses[slots] = 0
        self.fetching[slots] = True

    def installed(self, ids: torch.Tensor, step: int) -> None:
        slots = self.index.find(ids)
        self.fetching[slots] = False
        self.last_use[slots] = step
        self.uses[slots] = 0

    def used(self, ids: torch.Tensor, step: int) -> None:
        slots = self.index.find(ids)
        slots = slots[slots >= 0]
        self.last_use[slots] = step
        self.uses[slots] += 1

    def drop(self, ids: torch.Tensor) -> None:
        self.index.remove(ids)

    def rebuilt(self, keys: torch.Tensor, budget: int) -> "_Residency":
        """A record of exactly ``keys`` (the table's ids), keeping the policy state of those
        this one holds (rows it does not know start at step 0, as rows found in the table)."""
        out = _Residency(max(budget, keys.numel(), 1))
        if keys.numel():
            out.index.insert(keys)
            old = self.index.find(keys)
            known = old >= 0
            new = out.index.find(keys)
            out.last_use[new[known]] = self.last_use[old[known]]
            out.uses[new[known]] = self.uses[old[known]]
        return out


class _TableState:
    """Per table: the table, its backing, the host record of its rows (:class:`_Residency`)."""

    def __init__(self, name: str, table: Any, backing: Any, budget: int) -> None:
        self.name, self.table, self.backing = name, table, backing
        self.rows = _Residency(budget)
        self.row_bytes = 4 * (table.dim + int(getattr(backing.store, "state_dim", 0)))
        self.stream: Any = None  # the side CUDA stream of the copies (GPU tables)
        self.cuda = table.device.type == "cuda"


# Presence checks held on the GPU before they are read back even if nobody reads the stats.
_SETTLE_EVERY = 256

_STAT_KEYS = ("hits_at_use", "misses_at_use", "prefetched_rows", "prefetched_bytes", "stall_ms", "window",
              "evicted_rows", "written_back_rows")


class LookaheadCache:
    """See the module docstring. ``tables``: name -> DynamicEmbeddingTable; ``store``: one
    backing store for all tables or a mapping name -> store (a table already backed by a
    store keeps it); ``ids_fn(batch) -> {table name: ids}``."""

    def __init__(self, tables: Mapping[str, Any], store: Any, config: CacheConfig, ids_fn: IdsFn, *,
                 exchange: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 owner_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 owner_serves_reads: bool = False, owned_only: bool = False) -> None:
        from gauss_plugins.embedding.policies import AlwaysAdmit
        from gauss_plugins.embedding.table import DynamicEmbeddingTable

        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        if not isinstance(tables, Mapping) or not tables:
            raise ValueError("tables must be a non-empty mapping of name -> DynamicEmbeddingTable")
        if not callable(ids_fn):
            raise TypeError("ids_fn must be a callable batch -> {table name: ids tensor}")
        if owned_only and (exchange is None or owner_fn is None):
            raise ValueError("owned_only=True caches only the rows this replica owns of the global batch: it needs "
                             "both exchange (the ids of every replica's batch) and owner_fn")
        stores = dict(store) if isinstance(store, Mapping) else {name: store for name in tables}
        # Check everything before attaching anything: a bad argument leaves the tables as they were.
        for name, table in tables.items():
            if not isinstance(table, DynamicEmbeddingTable):
                raise TypeError(f"tables[{name!r}] must be a DynamicEmbeddingTable, got {type(table).__name__}")
            if table.config.max_capacity < config.budget_rows:
                raise ValueError(f"table {name!r} may hold at most {table.config.max_capacity} rows (max_capacity) "
                                 f"but the cache budget is {config.budget_rows}: raise max_capacity or lower "
                                 f"budget_rows")
            if not isinstance(table.admission, AlwaysAdmit):
                raise ValueError(f"table {name!r} has admission policy {table.admission.name!r}; under a "
                                 f"LookaheadCache every id a batch uses gets its row, so configure the table "
                                 f"with admission='always'")
            if table.backing is None and name not in stores:
                raise ValueError(f"no store for table {name!r}: pass store= as one store or a mapping "
                                 f"with every table name")
            if table.backing is not None and name in stores and table.backing.store is not stores[name]:
                raise ValueError(f"table {name!r} is already backed by another store; detach_store() first")
        self.policy = self._make_policy(config.policy)
        self.config = config
        self.ids_fn = ids_fn
        self.exchange = exchange
        self.owner_fn = owner_fn
        # Drain before each exchange only where another replica could read a row from the
        # store before its owner's queued write of it lands (a shared store with owner_fn).
        # owned_only: a replica reads and writes only its own rows, in order on its own worker.
        self._drain_before_exchange = owner_fn is not None and not owner_serves_reads and not owned_only
        self.owned_only = bool(owned_only)
        self.target_window = config.window if self.policy.lookahead else 1
        self._tables: Dict[str, _TableState] = {}
        attached = []
        try:
            for name, table in tables.items():
                if table.backing is None:
                    table.attach_store(stores[name])  # checks that the store's rows fit the table
                    attached.append(table)
        except Exception:
            for table in attached:  # leave every table as it was
                table.detach_store(flush=False)
            raise
        self._worker: Optional[_Worker] = _Worker() if config.prefetch else None
        # A cache dropped without close() still stops its thread (what was queued runs first).
        self._stop_worker = weakref.finalize(self, self._worker.stop) if self._worker is not None else None
        for name, table in tables.items():
            backing = table.backing
            backing.write = self._writer(backing)
            backing.write_later = self._later_writer(backing)  # evictions the cache chose
            backing.owner = owner_fn  # evictions copy only the rows this replica writes back
            backing.drain = self._drain  # a syncer reading the store waits for queued writes
            # Data parallel: the store may be partitioned across ranks (reads are collectives), so
            # eval reads only the resident rows; the strategy makes the rows eval needs resident.
            backing.eval_reads_store = exchange is None
            self._tables[name] = _TableState(name, table, backing, config.budget_rows)
        self._window: Deque[_Entry] = deque()    # admitted batches, the next one to train first
        self._waiting: Deque[_Entry] = deque()   # pulled from the loader, not yet admitted
        self._source: Optional[Iterator[Any]] = None
        self._exhausted = False
        # The next batch did not fit and nothing has been freed since: admitting it again
        # would fail the same way (and choosing victims costs a pass over the resident rows).
        self._blocked = False
        self._current: Optional[_Entry] = None   # the batch being trained (yielded, step not done)
        self._step = 0
        self._counts = {k: 0.0 for k in _STAT_KEYS}
        self._step_stats: Dict[str, float] = {}
        self._per_step: List[Dict[str, float]] = []
        # (the step's stats, the table's count of the batch's ids without a row, ids): settled
        # into the hit/miss counts when stats are read
        self._checks: List[Any] = []

    @staticmethod
    def _make_policy(spec: Any) -> CachePolicy:
        if isinstance(spec, CachePolicy):
            return spec
        from gauss_plugins.plugins import get_registry

        return get_registry().create("cache_policy", spec)

    # ------------------------------------------------------------------ store traffic
    def _writer(self, backing: Any) -> Callable[..., None]:
        """The backing's write: only rows this replica owns, queued on the worker."""
        put = backing._put

        def write(ids: torch.Tensor, values: torch.Tensor, state: Optional[torch.Tensor]) -> None:
            if self.owner_fn is not None:
                mine = self.owner_fn(ids).to("cpu", torch.bool)
                ids, values = ids[mine], values[mine]
                state = state[mine] if state is not None else None
            if ids.numel() == 0:
                return
            self._count("written_back_rows", ids.numel())
            if self._worker is None:
                put(ids, values, state)
            else:  # values and state are copies already: training may overwrite the rows
                self._worker.submit(lambda: put(ids, values, state))
        return write

    def _later_writer(self, backing: Any) -> Callable[..., None]:
        """The backing's deferred write of evicted rows: on the worker, after the copy's
        event, the changed rows (``dirty``, owner filter included) go to the store, queued in
        order before any later read of them."""
        put = backing._put

        def write_later(event: Any, ids: torch.Tensor, values: torch.Tensor, state: Optional[torch.Tensor],
                        dirty: torch.Tensor) -> None:
            def job() -> None:
                if event is not None:
                    event.synchronize()  # the device-to-host copies (off the training thread)
                keep = dirty.nonzero().squeeze(1)
                if keep.numel() == 0:
                    return
                # Counted here (the worker) only in the totals: the step that evicted is long done.
                self._counts["written_back_rows"] += keep.numel()
                backing.counters["written_back_rows"] += keep.numel()
                put(ids.index_select(0, keep), values.index_select(0, keep),
                    state.index_select(0, keep) if state is not None else None)

            if self._worker is None:
                job()
            else:
                self._worker.submit(job)
        return write_later

    def _drain(self) -> None:
        if self._worker is not None:
            self._worker.drain()

    def _read(self, ts: _TableState, ids: torch.Tensor) -> Any:
        """Submit a read of ``ids`` (CPU) from the store. The job's result: the ``Lookup``
        and the ids on the table's device, ``found`` on the host, and the copy's CUDA event."""
        store, device = ts.backing.store, ts.table.device
        cuda = device.type == "cuda"
        if cuda and self._worker is not None and ts.stream is None:
            ts.stream = torch.cuda.Stream(device=device)
        stream = ts.stream

        def fetch():
            got = store.lookup(ids)
            if not cuda:
                return got, ids, got.found, None
            # Host -> device on a side stream, so the copy overlaps the training step; from
            # pinned memory, so the copy waits for nothing queued on the GPU before it.
            ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.device(device)
            with ctx:
                values = got.values.pin_memory().to(device, non_blocking=True)
                state = got.state.pin_memory().to(device, non_blocking=True) if got.state is not None else None
                found = got.found.pin_memory().to(device, non_blocking=True)
                on_device = ids.pin_memory().to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            return type(got)(values, state, found), on_device, got.found, event

        if self._worker is None:
            job = _Job(fetch)
            job.run()
            return job
        return self._worker.submit(fetch)

    @staticmethod
    def _arrived(ts: _TableState, job: Any) -> Any:
        """The rows a read job fetched, usable on the training thread's current stream:
        ``(Lookup, ids on the table's device, found on the host)``."""
        got, ids, found, event = job.wait()
        if event is not None:  # the side stream's copy must finish before the rows are used
            main = torch.cuda.current_stream(ts.table.device)
            main.wait_event(event)
            for t in (got.values, got.state, got.found, ids):
                if t is not None:
                    # Allocated on the side stream: without this the allocator could hand the
                    # memory to a later copy there while the main stream still reads it.
                    t.record_stream(main)
        return got, ids, found

    def _install(self, ts: _TableState, host_ids: torch.Tensor, job: Any) -> None:
        """Install the rows a read job fetched (the table's only synchronisation here is its
        index's insert) and record them as resident."""
        got, ids, found = self._arrived(ts, job)
        ts.backing.install(ts.table, ids, got, found_host=found)
        ts.rows.installed(host_ids, self._step)

    # ------------------------------------------------------------------ the iterator
    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches of ``batches`` in order, each once every row it needs is
        resident. Call :meth:`step_done` after each step (done for you on the next batch if
        you do not)."""
        if self._source is not None and not self._exhausted:
            raise RuntimeError("this LookaheadCache is already wrapping an iterator; finish it first")
        self._source, self._exhausted, self._blocked = iter(batches), False, False
        for ts in self._tables.values():
            # Rows may have changed outside an iteration (evaluation installs stored rows and
            # drops unused ones): start from what the table holds (one read of its ids).
            ts.rows = ts.rows.rebuilt(ts.table.index.keys_and_rows()[0].cpu(), self.config.budget_rows)
        try:
            while True:
                if self._current is not None:
                    self.step_done()
                self._fill_window()
                if not self._window:
                    break
                entry = self._window[0]
                self._make_resident(entry)
                self._current = entry
                yield entry.batch
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """End of an iteration (finished, or left early): rows still being fetched are
        installed, so the budget's bookkeeping matches the table; batches not trained are
        dropped."""
        self._current = None
        pending = [e for e in self._window if e.jobs]
        self._window.clear()
        self._waiting.clear()
        self._source = None
        for entry in pending:
            for name, ids, job in entry.jobs:
                self._install(self._tables[name], ids, job)
            entry.jobs = []

    def _pull(self) -> Optional[_Entry]:
        if self._waiting:
            return self._waiting.popleft()
        return self._pull_new()

    def _pull_new(self) -> Optional[_Entry]:
        """The next batch from the loader with its ids (exchanged: a collective under a strategy)."""
        if self._exhausted or self._source is None:
            return None
        try:
            batch = next(self._source)
        except StopIteration:
            self._exhausted = True
            return None
        raw = self.ids_fn(batch)
        if self.exchange is not None and self._drain_before_exchange:
            # Every replica's queued write-backs land before the exchange (a collective)
            # returns anywhere, so a fetch issued after it sees rows another replica owns
            # and evicted: the only evictions before this batch's fetches are before this point.
            self._drain()
        ids, host, parts = {}, {}, {}
        for name, ts in self._tables.items():
            if name not in raw:
                raise KeyError(f"ids_fn returned no ids for table {name!r} (it returned {sorted(raw)})")
            t = raw[name]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"ids_fn()[{name!r}] must be an int64 tensor, got {getattr(t, 'dtype', type(t))}")
            device = ts.table.device
            if self.exchange is None:
                # The bookkeeping runs on the host: ids from the loader (CPU) cost no GPU
                # synchronisation here (ids already on the GPU cost one read back).
                u = torch.unique(t.reshape(-1).cpu())
                host[name] = u
                ids[name] = u.pin_memory().to(device, non_blocking=True) if ts.cuda else u
                continue
            u = torch.unique(t.reshape(-1).to(device))
            got = self.exchange(u)  # the global batch's ids
            if isinstance(got, (list, tuple)):  # each rank's ids: the step needs them to borrow rows
                parts[name] = [p.to(device) for p in got]
                got = torch.cat(parts[name])
            u = torch.unique(got.to(device))
            if self.owned_only:  # this replica caches only its own rows of the global batch
                u = u[self.owner_fn(u).to(device, torch.bool)]
            ids[name], host[name] = u, u.cpu()
        if self.owned_only and len(parts) != len(self._tables):
            raise TypeError("owned_only=True needs exchange(ids) to return every rank's ids as a list (rank order)")
        return _Entry(batch, ids, host, parts=parts)

    def _fill_window(self) -> None:
        if self.owned_only:
            # Each replica admits its own rows, so one replica's window may shrink while
            # another's does not; the exchange of ids is a collective every replica must make
            # the same number of times. So batches are pulled (and their ids exchanged) on a
            # schedule that does not depend on admission: always ``target_window`` ahead.
            while len(self._window) + len(self._waiting) < self.target_window:
                entry = self._pull_new()
                if entry is None:
                    break
                self._waiting.append(entry)
        if self._blocked:
            return
        while len(self._window) < self.target_window:
            entry = self._pull()
            if entry is None:
                return
            if not self._admit(entry):
                self._waiting.appendleft(entry)  # waits outside the window: the window shrank
                if len(self._window) < self.config.min_window:
                    raise BudgetError(self._budget_message(entry))
                self._blocked = True  # until a finished step frees its rows
                return

    def _budget_message(self, entry: _Entry) -> str:
        sizes = {name: int(ids.numel()) for name, ids in entry.host.items()}
        return (f"the cache cannot hold {self.config.min_window} batch(es): the next batch alone needs "
                f"{sizes} rows and budget_rows is {self.config.budget_rows} per table; raise budget_rows, "
                f"lower min_window, or use smaller batches")

    def _admit(self, entry: _Entry) -> bool:
        """Reserve room for the rows ``entry`` needs and start fetching the missing ones;
        False (nothing changed) when they do not fit even after evicting every row the
        window does not need."""
        plans = {}
        for name, ts in self._tables.items():
            ids = entry.host[name]
            new = ids[ts.rows.find(ids) < 0]  # neither resident nor being fetched
            excess = len(ts.rows) + new.numel() - self.config.budget_rows
            victims = ids[:0]
            if excess > 0:
                victims = self._victims(ts, entry, excess)
                if victims is None:
                    return False
            plans[name] = (new, victims)
        for name, (new, victims) in plans.items():
            ts = self._tables[name]
            if victims.numel():
                ts.rows.drop(victims)
                on_device = victims.pin_memory().to(ts.table.device, non_blocking=True) if ts.cuda else victims
                # Changed rows are written back (copied off the GPU without waiting, then
                # queued on the worker, in order before any later read of them).
                ts.table.evict(ids=on_device, live_distinct=True)
                self._count("evicted_rows", victims.numel())
            if new.numel():
                ts.rows.reserve(new, self._step)
                entry.jobs.append((name, new, self._read(ts, new)))
        self._window.append(entry)
        return True

    def _victims(self, ts: _TableState, entry: _Entry, k: int) -> Optional[torch.Tensor]:
        """The ``k`` resident ids of ``ts`` to evict (the policy's lowest scores among rows
        no batch of the window, ``entry`` included, needs); None if fewer are evictable."""
        record = ts.rows
        # Rows the window needs, marked through the host index (no sort of the ids); rows
        # still being fetched belong to a batch of the window, so they are never offered.
        pinned = record.fetching.clone()
        holders = list(self._window) + [entry]
        if self._current is not None and self._current not in self._window:
            holders.append(self._current)
        for e in holders:
            r = record.find(e.host[ts.name])
            pinned[r[r >= 0]] = True
        keys, rows = record.index.keys_and_rows()
        free = ~pinned.index_select(0, rows)
        keys, rows = keys[free], rows[free]
        if keys.numel() < k:
            return None
        scores = self.policy.scores(record.last_use, record.uses, rows)
        pick = torch.topk(scores, k, largest=False).indices if k < keys.numel() else slice(None)
        return keys[pick]

    def _make_resident(self, entry: _Entry) -> None:
        """Wait for the fetches started for ``entry`` (and, in order, every earlier one) and
        install them; count hits, misses and stall time for the step."""
        self._step_stats = {k: 0.0 for k in _STAT_KEYS}
        self._step_stats["window"] = len(self._window)
        t0 = time.perf_counter()
        fetched = 0
        for name, ids, job in entry.jobs:
            ts = self._tables[name]
            self._install(ts, ids, job)
            fetched += ids.numel()
            self._count("prefetched_rows" if self.policy.lookahead else "misses_fetched", ids.numel())
            self._count("prefetched_bytes", ids.numel() * ts.row_bytes if self.policy.lookahead else 0)
        entry.jobs = []
        stall_ms = (time.perf_counter() - t0) * 1e3
        # Fetch on miss: the rows fetched when the batch arrived were not resident at use.
        late = 0 if self.policy.lookahead else fetched
        for name, ts in self._tables.items():
            # The check asks the table itself (not the cache's own record); on a GPU its
            # count stays there until stats are read, so the step does not wait for it.
            absent = (ts.table.index.find(entry.ids[name]) < 0).sum()
            self._checks.append((self._step_stats, absent, entry.ids[name].numel()))
        self._count("hits_at_use", -late)
        self._count("misses_at_use", late)
        if len(self._checks) >= _SETTLE_EVERY or not any(ts.cuda for ts in self._tables.values()):
            self._settle_checks()  # on a GPU: one read back every _SETTLE_EVERY checks at most
        self._count("stall_ms", stall_ms)
        self._counts["window"] = len(self._window)

    def _settle_checks(self) -> None:
        """Add the table's presence checks of the steps so far to the hit/miss counts (one
        read back of the GPU counts, at most once per call)."""
        if not self._checks:
            return
        checks, self._checks = self._checks, []
        absent = torch.stack([c[1] for c in checks]).tolist()
        for (step_stats, _, n), miss in zip(checks, absent):
            self._count("hits_at_use", n - miss, step_stats)
            self._count("misses_at_use", miss, step_stats)

    def _count(self, key: str, value: float, step_stats: Optional[Dict[str, float]] = None) -> None:
        """Add to the run's total and to a step's figures (the current step's by default)."""
        if key not in _STAT_KEYS:
            return
        self._counts[key] += value
        step_stats = self._step_stats if step_stats is None else step_stats
        step_stats[key] = step_stats.get(key, 0) + value

    # ------------------------------------------------------------------ per step
    def step_done(self) -> None:
        """The step of the last yielded batch is over: its rows are free to be evicted once
        no batch in the window needs them; the window refills (prefetching the newcomers)."""
        entry = self._current
        if entry is None:
            raise RuntimeError("step_done() without a batch: call it once after each batch wrap() yields")
        self._current = None
        if self._window and self._window[0] is entry:
            self._window.popleft()
        for name, ts in self._tables.items():
            ts.rows.used(entry.host[name], self._step)
        self._step += 1
        self._per_step.append(self._step_stats)  # its hit/miss counts may still be settling
        self._blocked = False  # the finished batch's rows may be evicted now
        self._fill_window()  # start the next fetches while the loader prepares the batch

    def batch_ids(self) -> Dict[str, torch.Tensor]:
        """The distinct ids per table (the global batch's, under ``exchange``: the same on
        every replica, ascending; under ``owned_only`` only those this replica owns) of the
        batch being trained: a data-parallel step looks these up once and combines their
        gradient across the replicas."""
        if self._current is None:
            raise RuntimeError("batch_ids() is for the batch wrap() just yielded, before step_done()")
        return dict(self._current.ids)

    def batch_parts(self) -> Dict[str, List[torch.Tensor]]:
        """Per table, every rank's distinct ids (ascending) of the batch being trained, in rank
        order: what ``exchange`` returned when it returns a list (``owned_only``)."""
        if self._current is None:
            raise RuntimeError("batch_parts() is for the batch wrap() just yielded, before step_done()")
        if not self._current.parts:
            raise RuntimeError("batch_parts() needs an exchange that returns every rank's ids as a list")
        return {name: list(p) for name, p in self._current.parts.items()}

    # ------------------------------------------------------------------ end of training
    def flush(self) -> int:
        """Write every changed resident row back to the store (rows ``owner_fn`` assigns to
        this replica) and wait until the writes are done. Returns rows written."""
        written = 0
        for ts in self._tables.values():
            written += ts.backing.flush(ts.table, owner=self.owner_fn)
        self._drain()
        return written

    def close(self) -> None:
        """Flush, stop the worker and detach the stores from the tables (idempotent)."""
        if self._worker is None and not self._tables:
            return
        self.flush()
        if self._worker is not None:
            self._stop_worker.detach()
            self._worker.close()
            self._worker = None
        for ts in self._tables.values():
            ts.table.detach_store(flush=False)
        self._tables = {}

    def __enter__(self) -> "LookaheadCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def last_step(self, settle: bool = True) -> Dict[str, float]:
        """The latest finished step's figures ({} before the first). ``settle=False`` returns
        the live record without reading the GPU's hit/miss counts back: they appear in it
        once stats are read (a training loop that logs every N steps settles then, not every step)."""
        if settle:
            self._settle_checks()
        return self._per_step[-1] if self._per_step else {}

    @property
    def per_step(self) -> List[Dict[str, float]]:
        """Every finished step's figures (reading them settles the hit/miss checks)."""
        self._settle_checks()
        return self._per_step

    def stats(self) -> Dict[str, Any]:
        """Totals of the run so far (``window``: the current window), ``last_step`` (the
        latest step's figures) and ``per_step`` (every step's)."""
        self._settle_checks()
        out: Dict[str, Any] = {k: (int(v) if k != "stall_ms" else float(v)) for k, v in self._counts.items()}
        out["window"] = len(self._window)
        out["steps"] = self._step
        out["policy"] = self.policy.name
        out["budget_rows"] = self.config.budget_rows
        out["resident_rows"] = {name: len(ts.table) for name, ts in self._tables.items()}
        out["last_step"] = dict(self.per_step[-1]) if self.per_step else {}
        out["per_step"] = [dict(s) for s in self.per_step]
        return out
