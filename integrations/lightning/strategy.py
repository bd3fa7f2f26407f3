"""``GaussStrategy``: Lightning data parallelism with dynamic embedding tables behind a
lookahead cache ("logically replicated, physically partitioned").

::

    import gauss_integrations.lightning            # registers "gauss"
    trainer = pl.Trainer(strategy="gauss", accelerator="cpu", devices=2)
    trainer = pl.Trainer(strategy=GaussStrategy(budget_rows=20_000, window=8, store_dir="/data/tierps"))

What the strategy does, through Lightning's own hooks (no patching):

* **Dense parameters** train under DDP (the class *is* a ``DDPStrategy``: gloo on CPU, NCCL on GPU).
* **Every** :class:`~gauss_plugins.embedding.table.DynamicEmbeddingTable` **of the module** is put
  behind one :class:`~gauss_plugins.cache.LookaheadCache` (``setup``): the table is the fast tier,
  holding at most ``budget_rows`` rows; a TierPS per table (one per rank) holds the rest with
  their optimizer state. The training dataloader is wrapped (``process_dataloader``) so the
  cache sees ``window`` batches ahead of the step that trains them; each step starts
  (``on_train_batch_start``) only once every row its ids need is resident.
* **Replicas** (world size W > 1): "logically replicated, physically partitioned". Rank
  ``id % W`` owns a row: it alone caches it, updates it, writes it back and keeps it in its own
  TierPS partition. The cache's ``exchange`` all-gathers each batch's ids (one collective, a
  window ahead) and each replica's cache admits, prefetches, evicts and installs only the ids
  of the global batch it owns, from its own partition (no collective on the worker): the
  cache's work is split across the replicas, not repeated by each. Before a step, one
  all-to-all hands each rank the current rows of its own batch that other ranks own
  (:func:`borrow_rows`; installed for the step, dropped after it); after backward, each rank
  sums its row gradients per id and a second all-to-all sends the sums of borrowed ids to their
  owners (:func:`push_row_gradients`), which divide by W (as DDP averages dense gradients) and
  step the sparse optimizer on the rows they own: W workers on a global batch end with the rows
  and weights one worker gets on it (tests/strategy). ``partitioned=False`` keeps the earlier
  design: every replica caches the global batch's rows, the row gradients are all-reduced
  (:func:`reduce_row_gradients`) and rows another rank owns are read through
  :class:`PartitionedStore` (every replica reads the same ids, each answers for its own, a
  sum-all-reduce on a gloo side group). Evaluation and checkpoints read the stored rows through
  :class:`PartitionedStore` in both modes.
* **The dynamic tables' world-size guard** (``ReplicatedTableError``) is lifted only on the
  tables the strategy manages, only while it trains them (``table.synchronized_replicas``).
* **Evaluation** reads every row: validation and test first flush the cache and install the
  stored rows in the table (removed again afterwards, unchanged); after ``fit`` the table holds
  every trained row (``gather_on_end``), so checkpoints and exports see the whole table; a
  Lightning checkpoint taken during training (``lightning_module_state_dict``) has them too.
* **Logging**: per step ``gauss/hits_at_use``, ``gauss/misses_at_use``, ``gauss/prefetched_rows``,
  ``gauss/prefetched_bytes``, ``gauss/stall_ms`` and ``gauss/window`` go to the trainer's
  loggers (every ``log_every_n_steps``, rank 0); :meth:`GaussStrategy.cache_stats` has the totals.
* **WePS sync** (``sync_target``): each rank runs a :class:`~gauss_plugins.stores.syncer.Syncer`
  from its TierPS partition (the rows it owns) to the serving store; the cache is flushed every
  ``sync_every_n_steps`` steps so the partition stays that fresh.

The module tells the strategy which ids a batch reads: ``gauss_cache_ids(batch) ->
{table name: int64 ids}`` on the LightningModule (or ``ids_fn=``). Every id a training step
looks up must be among them (a model that samples ids inside its step, like negatives, samples
them ahead in ``gauss_prepare_batch(batch) -> batch``, which the strategy calls on each batch
as it leaves the dataloader).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import deque
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.trainer.states import RunningStage, TrainerFn

from gauss_plugins.cache import BudgetError, CacheConfig, LookaheadCache
from gauss_plugins.embedding import DynamicEmbeddingTable, SparseOptimizer
from gauss_plugins.embedding.backing import state_layout
# The table's gradient record: the replicated update rewrites a table's recorded gradients
# in the table's own layout, so SparseOptimizer.step applies them unchanged.
from gauss_plugins.embedding.table import _GradRecord
from gauss_plugins.stores.base import Lookup

__all__ = ["GaussStrategy", "PartitionedStore", "OwnedPartition", "reduce_row_gradients", "borrow_rows",
           "push_row_gradients", "return_borrowed_rows"]

log = logging.getLogger(__name__)

#: Name of the LookaheadCache's store worker thread: the only thread that reads a
#: PartitionedStore while training (reads from elsewhere would pair collectives out of order).
_CACHE_WORKER = "gauss-lookahead-cache"

_LOGGED = ("hits_at_use", "misses_at_use", "prefetched_rows", "prefetched_bytes", "stall_ms", "window")


# ---------------------------------------------------------------------------- stores
class PartitionedStore:
    """One rank's partition of a store sharded by ``id % world`` (its ``local`` store holds
    the ids it owns), read collectively.

    ``lookup(ids)`` must be called by every rank with the same ids in the same order (the
    lookahead caches of the replicas guarantee it: they make the same decisions): each rank
    answers for its own ids and a sum-all-reduce over ``group`` (gloo, CPU tensors) hands
    every rank every row. ``put`` takes only owned ids (the cache's ``owner_fn`` filters its
    write-backs) and ``delete`` removes the owned ones. While ``training_reads_only_on_worker``
    is set, a lookup from another thread than the cache's worker is refused: it would be a
    training lookup of an id the cache did not prefetch, and its collective would pair with
    another rank's prefetch.
    """

    def __init__(self, local: Any, rank: int, world: int, group: Any) -> None:
        if not (0 <= rank < world):
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.local, self.rank, self.world, self.group = local, int(rank), int(world), group
        self.dim = int(local.dim)
        self.state_dim = int(getattr(local, "state_dim", 0))
        self.max_ram_rows = getattr(local, "max_ram_rows", None)
        self.training_reads_only_on_worker = False
        self._here = threading.local()

    def owned(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids, self.world) == self.rank

    def reading_here(self) -> "_ReadingHere":
        """Allow lookups from the calling thread (evaluation's collective reads between steps)."""
        return _ReadingHere(self._here)

    def check_reader(self, consequence: str) -> None:
        """Refuse a lookup from a training step (another thread than the cache's worker, not
        marked by :meth:`reading_here`) while ``training_reads_only_on_worker`` is set."""
        if (self.training_reads_only_on_worker and threading.current_thread().name != _CACHE_WORKER
                and not getattr(self._here, "allowed", False)):
            raise RuntimeError(
                f"a training step looked up ids the lookahead cache had not made resident{consequence}. "
                "gauss_cache_ids(batch) (or GaussStrategy(ids_fn=...)) must return every id the training step "
                "looks up, negatives included (sample them in gauss_prepare_batch)")

    def lookup(self, ids: Any) -> Lookup:
        self.check_reader(", so their rows would be read from the partitioned store outside the cache (a "
                          "collective the other ranks do not make)")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        n, width = ids.numel(), self.dim + self.state_dim
        buf = torch.zeros(n, width + 1, dtype=torch.float32)
        mine = self.owned(ids)
        if bool(mine.any()):
            got = self.local.lookup(ids[mine])
            part = torch.zeros(int(mine.sum()), width + 1)
            part[:, : self.dim] = got.values.to(torch.float32)
            if self.state_dim:
                part[:, self.dim: width] = got.state.to(torch.float32)
            part[:, width] = got.found.to(torch.float32)
            buf[mine] = part
        # One owner per id: the sum is that owner's row, exactly (x + 0 == x).
        dist.all_reduce(buf, group=self.group)
        state = buf[:, self.dim: width].contiguous() if self.state_dim else None
        return Lookup(buf[:, : self.dim].contiguous(), state, buf[:, width] > 0.5)

    def put(self, ids: Any, values: Any, state: Any = None) -> int:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        if not bool(self.owned(ids).all()):
            raise ValueError(f"rank {self.rank} of {self.world} was asked to store ids it does not own "
                             f"(owner = id % {self.world}); filter writes with the owner function")
        return self.local.put(ids, values, state)

    def delete(self, ids: Any) -> int:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        return self.local.delete(ids[self.owned(ids)])

    def stored_ids(self) -> torch.Tensor:
        """Every id of every partition, ascending (a collective)."""
        return _all_gather_ids(_local_ids(self.local), self.group)

    def close(self) -> None:
        self.local.close()


class OwnedPartition:
    """The lookahead cache's store under a partitioned :class:`GaussStrategy`: this rank's
    partition (``local``), read and written only for ids it owns, without any collective
    (each replica caches only its own rows). ``partitioned`` is the rank's
    :class:`PartitionedStore` over the same partition: its guard refuses reads from other
    threads than the cache's worker while training (a step that looked up an id the cache did
    not prefetch would otherwise read a row this partition may not own)."""

    def __init__(self, partitioned: "PartitionedStore") -> None:
        self.partitioned, self.local = partitioned, partitioned.local
        self.dim, self.state_dim = partitioned.dim, partitioned.state_dim
        self.max_ram_rows = partitioned.max_ram_rows

    def lookup(self, ids: Any) -> Lookup:
        p = self.partitioned
        p.check_reader(" (rows this rank may not own)")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        if not bool(p.owned(ids).all()):
            raise ValueError(f"rank {p.rank} of {p.world} was asked to read ids it does not own from its partition "
                             f"(owner = id % {p.world}): a partitioned cache reads only owned rows")
        return self.local.lookup(ids)

    def put(self, ids: Any, values: Any, state: Any = None) -> int:
        return self.partitioned.put(ids, values, state)

    def delete(self, ids: Any) -> int:
        return self.partitioned.delete(ids)


class _ReadingHere:
    def __init__(self, here: threading.local) -> None:
        self._here = here

    def __enter__(self) -> None:
        self._here.allowed = True

    def __exit__(self, *exc: Any) -> None:
        self._here.allowed = False


def _local_ids(store: Any) -> torch.Tensor:
    if hasattr(store, "stored_ids"):
        return torch.as_tensor(store.stored_ids(), dtype=torch.int64).reshape(-1)
    parts = [batch.ids for batch in store.export()]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _all_gather_ids(ids: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The distinct ids of every rank (ascending); a collective. Variable lengths are padded."""
    world = dist.get_world_size(group)
    device = ids.device
    size = torch.tensor([ids.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    width = max(counts)
    if width == 0:
        return ids[:0]
    padded = torch.zeros(width, dtype=torch.int64, device=device)
    padded[: ids.numel()] = ids
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.unique(torch.cat([p[:c] for p, c in zip(parts, counts)]))


def _exchange_batch_ids(ids: torch.Tensor, bound: int) -> torch.Tensor:
    """The cache's ``exchange`` (replicated caches): the ids of every rank's batch, concatenated."""
    return torch.cat(_exchange_batch_id_parts(ids, bound))


def _exchange_batch_id_parts(ids: torch.Tensor, bound: int) -> List[torch.Tensor]:
    """The cache's ``exchange`` (partitioned caches): the distinct ids of every rank's batch,
    one tensor per rank in rank order, in one collective. A rank's distinct ids must fit the
    cache budget, so a ``bound + 1`` buffer (count first, then the ids) of fixed size needs
    no size round. A batch over the bound fails on every rank alike (its count still travels):
    a rank that raised before the collective would leave the others waiting in it."""
    n = ids.numel()
    buf = torch.empty(bound + 1, dtype=torch.int64, device=ids.device)
    buf[0] = n
    buf[1:min(n, bound) + 1] = ids[:bound]
    parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf)
    counts = torch.stack([p[0] for p in parts]).tolist()  # one host sync for all ranks' counts
    if max(counts) > bound:
        raise BudgetError(f"rank {counts.index(max(counts))}'s batch alone needs {max(counts)} rows of a table and "
                          f"budget_rows is {bound}; raise budget_rows or use smaller batches")
    return [p[1:c + 1] for p, c in zip(parts, counts)]


def _check_owned_fit(parts: List[torch.Tensor], world: int, bound: int) -> None:
    """Partitioned caches: every rank checks, from the same exchanged ids, that each owner's
    share of the global batch fits the budget, so all raise together (a rank whose cache alone
    failed would leave the others waiting in the next collective)."""
    owners = torch.remainder(torch.unique(torch.cat(parts)), world)
    counts = torch.bincount(owners, minlength=world)
    worst = int(counts.argmax())
    if int(counts[worst]) > bound:
        raise BudgetError(f"rank {worst} owns {int(counts[worst])} distinct ids of one global batch and budget_rows "
                          f"is {bound} per rank: raise budget_rows or use smaller batches")


# ---------------------------------------------------------------------------- gradients
@torch.no_grad()
def reduce_row_gradients(table: DynamicEmbeddingTable, ids: torch.Tensor, group: Any = None,
                         world: Optional[int] = None) -> int:
    """Replace the row gradients ``table`` recorded since its last optimizer step by their
    average over the replicas of ``group`` (a collective).

    ``ids``: the ascending distinct ids of the *global* batch, the same tensor on every rank
    (the lookahead cache's ``batch_ids()``); every id the step looked up must be among them.
    Each rank sums its recorded gradients per id into a ``[len(ids) + 1, dim]`` buffer (the
    last slot: reads of the default row, which trains under ``default="unknown"``), the buffer
    is all-reduced and divided by the world size (DDP averages the dense gradients the same
    way), and the table is left with one record over ``ids``: the sparse optimizer then
    applies the same update on every replica. Returns the ids reduced.
    """
    world = dist.get_world_size(group) if world is None else int(world)
    ids = ids.to(table.device)
    n = ids.numel()
    buf = _sum_recorded(table, ids)
    dist.all_reduce(buf, group=group)
    buf /= world
    _replace_records(table, ids, buf)
    return n


@torch.no_grad()
def _sum_recorded(table: DynamicEmbeddingTable, ids: torch.Tensor) -> torch.Tensor:
    """``[len(ids) + 1, dim]`` float32: the gradients ``table`` recorded since its last step,
    summed per id of ``ids`` (ascending, distinct), the last slot for reads of the default
    row. A recorded id that is not in ``ids`` drops the step's gradients and raises."""
    n = ids.numel()
    buf = torch.zeros(n + 1, table.dim, dtype=torch.float32, device=table.device)
    default = table.default_row
    for rec in table._pending:
        rows = rec.rows if rec.epoch == table._epoch else table.index.find(rec.ids, default=default)
        src = rec.src
        g = src if rec.src_idx.numel() == 0 and src.shape[0] == rows.numel() else src.index_select(0, rec.src_idx)
        if rec.scale.numel():
            g = g * rec.scale[:, None]
        at_default = rows == default
        slot = torch.searchsorted(ids, rec.ids).clamp(max=max(n - 1, 0))
        known = (ids[slot] == rec.ids) if n else torch.zeros_like(at_default)
        stray = ~at_default & ~known
        if bool(stray.any()):
            table.zero_grad()
            raise RuntimeError(
                f"table {table.name!r}: the step looked up ids the global batch's id list does not have "
                f"(e.g. {torch.unique(rec.ids[stray])[:5].tolist()}); gauss_cache_ids(batch) must return every id "
                f"the training step looks up")
        slot = torch.where(at_default, torch.full_like(slot, n), slot)
        buf.index_add_(0, slot, g)
    return buf


def _replace_records(table: DynamicEmbeddingTable, ids: torch.Tensor, buf: torch.Tensor) -> None:
    """Leave ``table`` with one gradient record: ``buf[:n]`` for ``ids`` (ascending, resident)
    and ``buf[n]`` for the default row."""
    n = ids.numel()
    default = table.default_row
    table.zero_grad()
    # One record over the ids, in the table's own record layout (identity src_idx, no
    # scale): the optimizer step sums and applies it exactly like a lookup's record.
    empty_i = torch.empty(0, dtype=torch.int64, device=table.device)
    empty_f = torch.empty(0, dtype=torch.float32, device=table.device)
    rows = table.index.find(ids, default=default)
    records = [_GradRecord(ids, rows, buf[:n].contiguous(), empty_i, empty_f, table._epoch)]
    if table.config.default != "zeros":
        one = torch.tensor([default], dtype=torch.int64, device=table.device)
        records.append(_GradRecord(one.clone(), one, buf[n:].contiguous(), empty_i, empty_f, table._epoch))
    table._pending = records


# ---------------------------------------------------------------------------- partitioned rows
def _owner_split(parts: List[torch.Tensor], rank: int, world: int):
    """From every rank's distinct ids of a batch: what this rank sends (per destination, the
    ids of that rank's batch it owns) and receives (per source, the ids of its own batch that
    rank owns), both in rank order; nothing to or from itself. Every rank computes the same
    lists from the same exchanged ids, so no request round is needed."""
    mine = parts[rank]
    owner_of_mine = torch.remainder(mine, world)
    send = [parts[s][torch.remainder(parts[s], world) == rank] if s != rank else mine[:0] for s in range(world)]
    recv = [mine[owner_of_mine == s] if s != rank else mine[:0] for s in range(world)]
    return send, recv


def _all_to_all(rows: torch.Tensor, send_counts: List[int], recv_counts: List[int]) -> torch.Tensor:
    out = rows.new_empty((sum(recv_counts),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts)
    return out


@torch.no_grad()
def borrow_rows(table: DynamicEmbeddingTable, parts: List[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """Partitioned caches: before a step, every rank sends the rows it owns that the other
    ranks' batches need (their current values: its own last update included) and installs the
    rows its batch needs from the other owners as *borrowed* rows (one all-to-all on the
    table's device). Returns the borrowed ids; :func:`return_borrowed_rows` removes them after
    the sparse step. ``parts``: every rank's distinct ids of the batch (the cache's
    ``batch_parts()``)."""
    send, recv = _owner_split(parts, rank, world)
    out_ids = torch.cat(send)
    rows = table.index.find(out_ids)
    if bool((rows < 0).any()):
        # The owner caches every owned id of the global batch before the step: a gap is a bug.
        raise RuntimeError(f"table {table.name!r}: rank {rank} owns ids another rank's batch needs but does not hold "
                           f"them ({out_ids[rows < 0][:5].tolist()}): the partitioned cache missed at use")
    values = table.weight.index_select(0, rows).to(torch.float32)
    got = _all_to_all(values, [t.numel() for t in send], [t.numel() for t in recv])
    borrowed = torch.cat(recv)
    if borrowed.numel():
        room = table.config.max_capacity - len(table)
        if borrowed.numel() > room:
            raise RuntimeError(f"table {table.name!r} holds {len(table)} rows and this step borrows {borrowed.numel()} "
                               f"rows other ranks own, over max_capacity {table.config.max_capacity}: raise the "
                               f"table's max_capacity to budget_rows + one rank's distinct ids a batch, or lower "
                               f"budget_rows")
        found = torch.ones(borrowed.numel(), dtype=torch.bool, device=table.device)
        table.backing.install(table, borrowed, Lookup(got, None, found), borrowed=True)
    return borrowed


@torch.no_grad()
def return_borrowed_rows(table: DynamicEmbeddingTable, borrowed: torch.Tensor) -> None:
    """Drop the borrowed rows of a step (another rank owns them and applied the update to its
    copy; the eviction writes nothing back, the cache's owner filter skips them)."""
    if borrowed.numel():
        table.evict(ids=borrowed)


@torch.no_grad()
def push_row_gradients(table: DynamicEmbeddingTable, parts: List[torch.Tensor], owned: torch.Tensor, rank: int,
                       world: int) -> int:
    """Partitioned caches: replace the row gradients ``table`` recorded this step by, for the
    ids this rank owns, their average over the replicas (a collective). Each rank sums its
    recorded gradients per id of its own batch (``parts[rank]``), sends the sums of ids other
    ranks own to their owners (one all-to-all) and adds what it receives for its own ids;
    ``owned``: this rank's ids of the global batch (the cache's ``batch_ids()``). The sparse
    optimizer then updates only owned rows: W workers apply, between them, exactly the update
    one worker on the global batch applies. Returns the ids updated here."""
    mine = parts[rank].to(table.device)
    owned = owned.to(table.device)
    n = mine.numel()
    buf = _sum_recorded(table, mine)
    send, recv = _owner_split(parts, rank, world)
    owner_of_mine = torch.remainder(mine, world)
    # recv[s] (ids of this batch rank s owns) are in ascending order; so are the rows picked here.
    out = torch.cat([buf[:n][owner_of_mine == s] if s != rank else buf[:0] for s in range(world)])
    got = _all_to_all(out, [t.numel() for t in recv], [t.numel() for t in send])
    acc = torch.zeros(owned.numel() + 1, table.dim, dtype=torch.float32, device=table.device)
    here = owner_of_mine == rank
    acc.index_add_(0, torch.searchsorted(owned, mine[here]), buf[:n][here])
    incoming = torch.cat(send)
    if incoming.numel():
        acc.index_add_(0, torch.searchsorted(owned, incoming), got)
    acc[-1] = buf[n]
    if table.config.default != "zeros":  # the shared default row trains on every replica
        default = acc[-1:].clone()
        dist.all_reduce(default)
        acc[-1:] = default
    acc /= world
    _replace_records(table, owned, acc)
    return int(owned.numel())


# ---------------------------------------------------------------------------- the loader
class _End:
    pass


_END = _End()


class CachedTrainLoader:
    """The training dataloader as Lightning sees it under :class:`GaussStrategy`.

    Batches are pulled from the wrapped loader once and kept until both readers are past
    them: Lightning (which fetches one batch ahead of the step) and the lookahead cache
    (which looks ``window`` batches ahead). ``prepare`` (the module's
    ``gauss_prepare_batch``) runs on each batch as it leaves the loader. Attributes other
    than iteration and length (``sampler``, ``batch_sampler``, ``worker_init_fn``...) are
    the wrapped loader's, so Lightning's sampler and seeding logic still reaches it.
    """

    _OWN = ("_loader", "_prepare", "_on_epoch", "_it", "_buf", "_base", "_pulled", "_trained", "_epoch")

    def __init__(self, loader: Any, prepare: Optional[Callable[[Any], Any]], on_epoch: Callable[[], None]) -> None:
        object.__setattr__(self, "_loader", loader)
        object.__setattr__(self, "_prepare", prepare)
        object.__setattr__(self, "_on_epoch", on_epoch)
        object.__setattr__(self, "_it", None)
        object.__setattr__(self, "_buf", deque())
        object.__setattr__(self, "_base", 0)      # index of _buf[0]
        object.__setattr__(self, "_pulled", 0)    # batches pulled from the loader this epoch
        object.__setattr__(self, "_trained", 0)   # index of the next batch a step trains
        object.__setattr__(self, "_epoch", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_loader"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._loader, name, value)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        self._on_epoch()  # the strategy retires the cache's iteration of the last epoch
        self._it = iter(self._loader)
        self._buf = deque()
        self._base = self._pulled = self._trained = 0
        self._epoch += 1
        return self._lightning_iter(self._epoch)

    def _get(self, i: int) -> Any:
        while self._pulled <= i:
            if self._it is None:
                return _END
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                return _END
            if self._prepare is not None:
                batch = self._prepare(batch)
            self._buf.append(batch)
            self._pulled += 1
        return self._buf[i - self._base]

    def _trim(self, keep_from: int) -> None:
        while self._buf and self._base < keep_from:
            self._buf.popleft()
            self._base += 1

    def _lightning_iter(self, epoch: int) -> Iterator[Any]:
        i = 0
        while epoch == self._epoch:
            batch = self._get(i)
            if batch is _END:
                return
            i += 1
            yield batch

    def cache_source(self) -> Iterator[Any]:
        """What the cache iterates: the batches from the next one to train on."""
        i, epoch = self._trained, self._epoch
        while epoch == self._epoch:
            batch = self._get(i)
            if batch is _END:
                return
            i += 1
            yield batch

    def batch_to_train(self) -> Any:
        return self._get(self._trained)

    def trained_one(self) -> None:
        self._trained += 1
        self._trim(self._trained - 1)


# ---------------------------------------------------------------------------- the strategy
class GaussStrategy(DDPStrategy):
    """DDP for dense parameters plus the lookahead cache, the replicated sparse update and
    the partitioned write-back for the module's dynamic tables (module docstring).

    Args:
        budget_rows: most rows each table holds while training (its fast tier). None: the
            table's ``max_capacity`` (in effect the whole table, still store-backed).
        window: batches the cache looks ahead, the one being trained included.
        policy: ``"lookahead"``, or a fetch-on-miss baseline ``"lru"`` / ``"lfu"``, or any
            registered ``cache_policy``. ``prefetch``: read rows on the cache's worker thread.
        min_window: the window never shrinks below this (a budget that cannot hold that many
            batches' rows is an error).
        store_dir: where each rank's TierPS partitions live (``<dir>/rank<r>/<table>``); None:
            a temporary folder removed at teardown.
        store_factory: ``(table, rank, world, path) -> store`` instead of a TierPS (e.g. one with
            another RAM budget); the store must have the table's ``dim`` and state width.
        store_ram_bytes: the RAM tier of each default TierPS.
        ids_fn: ``batch -> {table name: ids}``; default: the module's ``gauss_cache_ids``.
        sync_target: an ``EmbeddingStore`` (WePS, RedisWePS) or ``{table name: store}`` to sync
            to; ``sync_interval_s`` and ``sync_every_n_steps`` (cache flushes feeding it).
        gather_on_end: after fit, install every stored row in the tables (the whole trained table
            in memory for evaluation, checkpoints and exports); False leaves them at the budget.
        partitioned: with W > 1 replicas, each caches only the rows it owns (``id % W``) of the
            global batch and the step borrows the others' rows and returns their gradients by
            all-to-all (the cache's work is split across the replicas); False: every replica
            caches the global batch's rows and all-reduces their gradients (the work is repeated
            on each). Both give the same rows and weights.
        elastic: ``True`` or a ``gauss_integrations.ray.elastic.ElasticConfig``: ``fit`` runs on
            elastic Ray replicas that survive a worker's death (``gauss_integrations.lightning.elastic``).
        **ddp_kwargs: everything :class:`~pytorch_lightning.strategies.DDPStrategy` takes
            (``start_method``, ``process_group_backend``, ``find_unused_parameters``...).
    """

    strategy_name = "gauss"

    def __init__(self, *, budget_rows: Optional[int] = None, window: int = 8, policy: Any = "lookahead",
                 prefetch: bool = True, min_window: int = 1, store_dir: Optional[str] = None,
                 store_factory: Optional[Callable[..., Any]] = None, store_ram_bytes: int = 256 << 20,
                 ids_fn: Optional[Callable[[Any], Mapping[str, torch.Tensor]]] = None,
                 sync_target: Any = None, sync_interval_s: float = 1.0, sync_every_n_steps: int = 100,
                 gather_on_end: bool = True, partitioned: bool = True, elastic: Any = False,
                 **ddp_kwargs: Any) -> None:
        # elastic: fit runs as an elastic Ray job through this strategy's launcher
        # (gauss_integrations.lightning.elastic); checked now, not at fit.
        self._elastic = None
        if elastic:
            from gauss_integrations.lightning.elastic import elastic_config

            self._elastic = elastic_config(elastic)
        if budget_rows is not None and (isinstance(budget_rows, bool) or not isinstance(budget_rows, int)
                                        or budget_rows < 1):
            raise ValueError(f"budget_rows must be a positive int or None, got {budget_rows!r}")
        # Checked now (not at setup, in every worker): the same checks as the cache's config.
        CacheConfig(budget_rows=budget_rows or 1, window=window, policy=policy, prefetch=prefetch,
                    min_window=min_window)
        if not isinstance(sync_every_n_steps, int) or sync_every_n_steps < 1:
            raise ValueError(f"sync_every_n_steps must be a positive int, got {sync_every_n_steps!r}")
        if not sync_interval_s > 0:
            raise ValueError(f"sync_interval_s must be positive, got {sync_interval_s!r}")
        if not gather_on_end and store_dir is None and store_factory is None:
            raise ValueError("gather_on_end=False leaves the trained rows beyond the budget in the store, and without "
                             "store_dir (or store_factory) the store is a temporary folder removed after fit: pass "
                             "store_dir to keep them, or keep gather_on_end=True")
        start = ddp_kwargs.get("start_method", "popen")
        if start not in ("popen", "fork"):
            raise ValueError(f"GaussStrategy(start_method={start!r}): a dynamic table's compiled index cannot be "
                             f"pickled into spawned workers; use start_method='popen' (the default: Lightning "
                             f"starts the script once per device) or launch with torchrun")
        super().__init__(**ddp_kwargs)
        self.budget_rows = budget_rows
        self.window = int(window)
        self.policy = policy
        self.prefetch = bool(prefetch)
        self.min_window = int(min_window)
        self.store_dir = store_dir
        self.store_factory = store_factory
        self.store_ram_bytes = int(store_ram_bytes)
        self.ids_fn = ids_fn
        self.sync_target = sync_target
        self.sync_interval_s = float(sync_interval_s)
        self.sync_every_n_steps = int(sync_every_n_steps)
        self.gather_on_end = bool(gather_on_end)
        self.partitioned = bool(partitioned)
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self.cache: Optional[LookaheadCache] = None
        self.tables: Dict[str, DynamicEmbeddingTable] = {}
        self.stores: Dict[str, Any] = {}
        self.syncers: List[Any] = []
        # each finished step's cache figures: the cache's live records, whose hit/miss counts
        # settle when a step is logged or the cache's stats are read
        self.cache_history: List[Dict[str, float]] = []
        self._sparse_opt: Optional[SparseOptimizer] = None
        self._loader: Optional[CachedTrainLoader] = None
        self._gen: Optional[Iterator[Any]] = None
        self._in_step = False
        self._tmpdir: Optional[str] = None
        self._side_group: Any = None
        self._guards: Dict[str, bool] = {}
        self._eval_added: Dict[str, torch.Tensor] = {}
        self._final_stats: Optional[Dict[str, Any]] = None
        self._max_resident: Dict[str, int] = {}
        self._borrowed: Dict[str, torch.Tensor] = {}  # rows of the step in flight that other ranks own

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if "gauss" not in strategy_registry:
            strategy_registry.register("gauss", cls, description="DDP with the lookahead embedding cache and "
                                       "replicated dynamic tables")

    def _configure_launcher(self) -> None:
        if self._elastic is not None:
            from gauss_integrations.lightning.elastic import ElasticLauncher

            self._launcher = ElasticLauncher(self, self._elastic)
            return
        super()._configure_launcher()

    # ------------------------------------------------------------------ setup / teardown
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict read the tables as they are (eval reads are not guarded)
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("GaussStrategy needs accumulate_grad_batches=1: the cache may evict a batch's rows "
                             "once its step is done, which would drop gradients accumulated for a later step")
        if not self.lightning_module.automatic_optimization:
            raise ValueError("GaussStrategy drives the sparse update from the optimizer step of automatic "
                             "optimization; set automatic_optimization=True on the module")
        self._build_cache()

    def _find_tables(self) -> Dict[str, DynamicEmbeddingTable]:
        tables: Dict[str, DynamicEmbeddingTable] = {}
        for m in self.lightning_module.modules():
            if isinstance(m, DynamicEmbeddingTable) and all(m is not t for t in tables.values()):
                if m.name in tables:
                    raise ValueError(f"two dynamic tables are named {m.name!r}; GaussStrategy addresses tables "
                                     f"by name (gauss_cache_ids returns ids per name): give them distinct names")
                tables[m.name] = m
        return tables

    def _build_cache(self) -> None:
        module = self.lightning_module
        tables = self._find_tables()
        if not tables:
            raise ValueError("GaussStrategy found no DynamicEmbeddingTable in the LightningModule; use "
                             "strategy='ddp' for a model without dynamic tables")
        # A table keeps its tensors outside nn.Module's parameters and buffers, so moving the
        # module to the rank's device leaves it where it was made: the batch's ids would meet
        # it on another device in the first lookup. Say so now, with the fix.
        root = self.root_device
        for name, table in tables.items():
            if table.device.type != root.type or (root.type == "cuda" and table.device.index != root.index):
                raise ValueError(f"table {name!r} is on {table.device} but this rank trains on {root}: create the "
                                 f"table in the LightningModule's configure_model() with "
                                 f"device=self.trainer.strategy.root_device (each rank then has it on its own GPU)")
        ids_fn = self.ids_fn or getattr(module, "gauss_cache_ids", None)
        if ids_fn is None:
            raise ValueError("GaussStrategy needs to know which ids a batch looks up: define "
                             "gauss_cache_ids(self, batch) -> {table name: int64 ids} on the LightningModule "
                             f"(tables: {sorted(tables)}) or pass GaussStrategy(ids_fn=...)")
        rank, world = self.global_rank, self.world_size
        budget = self.budget_rows or min(t.config.max_capacity for t in tables.values())
        config = CacheConfig(budget_rows=budget, window=self.window, policy=self.policy, prefetch=self.prefetch,
                             min_window=self.min_window)
        if world > 1:
            # Partition reads run on the cache's worker thread: their own gloo group keeps them
            # apart from the training thread's collectives (and works beside NCCL).
            self._side_group = dist.new_group(backend="gloo")
        root = self.store_dir
        if root is None:
            self._tmpdir = root = tempfile.mkdtemp(prefix=f"gauss-strategy-rank{rank}-")
        stores = {}
        try:
            for name, table in tables.items():
                path = os.path.join(root, f"rank{rank}", name)
                local = self._make_store(table, rank, world, path)
                stores[name] = PartitionedStore(local, rank, world, self._side_group) if world > 1 else local
            exchange = owner_fn = None
            partitioned = self.partitioned and world > 1
            cache_stores = {n: OwnedPartition(st) for n, st in stores.items()} if partitioned else stores
            if world > 1:
                def exchange(ids: torch.Tensor) -> Any:
                    if partitioned:  # each rank's ids: the step borrows rows by them
                        parts = _exchange_batch_id_parts(ids, budget)
                        _check_owned_fit(parts, world, budget)
                        return parts
                    return _exchange_batch_ids(ids, budget)

                def owner_fn(ids: torch.Tensor) -> torch.Tensor:
                    return torch.remainder(ids, world) == rank
            # A PartitionedStore's owner answers each read from its worker queue, after its own
            # queued write-backs: the cache need not drain them before every exchange.
            cache = LookaheadCache(tables, cache_stores, config, ids_fn=ids_fn, exchange=exchange,
                                   owner_fn=owner_fn, owner_serves_reads=world > 1, owned_only=partitioned)
        except BaseException:
            for store in stores.values():
                store.close()
            self._remove_tmpdir()
            raise
        self.cache, self.tables, self.stores = cache, tables, stores
        for name, table in tables.items():
            self._guards[name] = table.synchronized_replicas
            # The strategy combines the replicas' row gradients and caches the same rows on every
            # replica: training these tables at world size > 1 is correct now, so lift their guard.
            table.synchronized_replicas = True
            if isinstance(stores[name], PartitionedStore):
                stores[name].training_reads_only_on_worker = self.prefetch
        self._sparse_opt = SparseOptimizer(list(tables.values()))
        if self.sync_target is not None:
            try:
                self._start_syncers()
            except BaseException:
                self._close(flush=False)
                raise

    def _make_store(self, table: DynamicEmbeddingTable, rank: int, world: int, path: str) -> Any:
        if self.store_factory is not None:
            return self.store_factory(table, rank, world, path)
        from gauss_plugins.stores.tierps import TierPS

        if os.path.isdir(path) and os.listdir(path):
            # A TierPS reopens with its rows: a fresh table over an old partition would mix two runs.
            raise ValueError(f"{path} already holds a TierPS (an earlier run's rows); GaussStrategy starts each fit "
                             f"from the model's own table: remove the folder or give store_dir an empty one")
        width = sum(w for _, _, w in state_layout(table))
        return TierPS(dim=table.dim, path=path, state_dim=width, ram_bytes=self.store_ram_bytes)

    def _start_syncers(self) -> None:
        from gauss_plugins.stores.syncer import Syncer

        targets = self.sync_target if isinstance(self.sync_target, Mapping) else \
            {name: self.sync_target for name in self.tables}
        for name in self.tables:
            if name not in targets:
                raise ValueError(f"sync_target has no store for table {name!r} (it has {sorted(targets)})")
            store = self.stores[name]
            source = store.local if isinstance(store, PartitionedStore) else store
            # Each rank pushes its own partition: the rows it owns, as the cache writes them back.
            self.syncers.append(Syncer(source, targets[name], interval_s=self.sync_interval_s))

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _close(self, flush: bool) -> None:
        """End the run's cache: retire its iteration, write back, stop the syncers, detach and
        close the stores, restore the tables' guards. ``flush=False`` (an exception): no step
        is finished (that could start collectives other ranks never join); the cache still
        writes back what it holds, and a failure there is logged, not raised over the first."""
        if self.cache is not None:
            self._return_borrowed()
            cache, self.cache = self.cache, None
            if flush:
                if self._in_step:
                    cache.step_done()
                    self._in_step = False
            if self._gen is not None:
                self._gen.close()
                self._gen = None
            self._final_stats = cache.stats()
            try:
                cache.close()
            except Exception:
                if flush:
                    raise
                log.exception("GaussStrategy: writing back the cache's rows after an error failed")
        for syncer in self.syncers:
            syncer.close(final_push=flush)
        self.syncers = []
        for store in self.stores.values():
            store.close()
        self.stores = {}
        for name, table in self.tables.items():
            table.synchronized_replicas = self._guards.get(name, False)
        self._guards = {}
        self._remove_tmpdir()

    def on_train_end(self) -> None:
        if self.cache is not None:
            self._retire_iteration()
            self.cache.flush()
            if self.gather_on_end:
                self._install_stored_rows()
            self._close(flush=True)
        super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        try:
            self._close(flush=False)
        finally:
            super().on_exception(exception)

    def teardown(self) -> None:
        self._close(flush=True)
        super().teardown()

    # ------------------------------------------------------------------ the training data
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.cache is None or trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        prepare = getattr(self.lightning_module, "gauss_prepare_batch", None)
        self._loader = CachedTrainLoader(dataloader, prepare, self._retire_iteration)
        return self._loader

    def _retire_iteration(self) -> None:
        """Finish the step in flight (its rows become evictable) and end the cache's pass over
        the loader: in-flight fetches are installed, batches it looked ahead at are dropped
        from its window (the loader keeps them; the next step restarts the pass there)."""
        if self.cache is None:
            return
        if self._in_step:
            self._finish_step()
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.cache is None or self._loader is None:
            return
        if self._in_step:
            self._finish_step()
        if self._gen is None:
            self._gen = self.cache.wrap(self._loader.cache_source())
        try:
            resident = next(self._gen)
        except StopIteration:
            raise RuntimeError("the lookahead cache ran out of batches before Lightning did; the training "
                               "dataloader must yield the same batches on every pass") from None
        if resident is not self._loader.batch_to_train():
            raise RuntimeError("the lookahead cache and Lightning disagree on the next training batch")
        self._loader.trained_one()
        self._in_step = True
        if self.cache.owned_only:
            parts = self.cache.batch_parts()
            for name, table in self.tables.items():
                self._borrowed[name] = borrow_rows(table, parts[name], self.global_rank, self.world_size)

    def _return_borrowed(self) -> None:
        for name, ids in self._borrowed.items():
            return_borrowed_rows(self.tables[name], ids)
        self._borrowed = {}

    def _finish_step(self) -> None:
        self._return_borrowed()  # a step that skipped its optimizer step still gives them back
        self.cache.step_done()
        self._in_step = False
        for name, table in self.tables.items():  # evidence that the budget held (stats() shows the end)
            self._max_resident[name] = max(self._max_resident.get(name, 0), len(table))
        # The live record: on a GPU its hit/miss counts are read back when logged, not every step.
        step = self.cache.last_step(settle=False)
        self.cache_history.append(step)
        trainer = self.lightning_module.trainer
        n = len(self.cache_history)
        if self.syncers and n % self.sync_every_n_steps == 0:
            self.cache.flush()
        if self.global_rank == 0 and trainer.loggers and (n - 1) % max(1, trainer.log_every_n_steps) == 0:
            self.cache.last_step()  # settles every step so far
            metrics = {f"gauss/{k}": float(step.get(k, 0.0)) for k in _LOGGED}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=n - 1)

    # ------------------------------------------------------------------ the sparse update
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if self.cache is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_reduce() -> Any:
            out = closure()  # forward + backward: DDP has averaged the dense gradients
            if self.world_size > 1:
                ids = self.cache.batch_ids()
                if self.cache.owned_only:  # each owner gets its rows' gradients and updates them
                    parts = self.cache.batch_parts()
                    for name, table in self.tables.items():
                        push_row_gradients(table, parts[name], ids[name], self.global_rank, self.world_size)
                else:
                    for name, table in self.tables.items():
                        reduce_row_gradients(table, ids[name], world=self.world_size)
            return out

        out = super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)
        # The module may step its own sparse optimizer afterwards: it finds nothing recorded.
        self._sparse_opt.step()
        self._return_borrowed()  # updated by their owners; the next step borrows them fresh
        return out

    # ------------------------------------------------------------------ evaluation
    def _install_stored_rows(self) -> Dict[str, torch.Tensor]:
        """Make each table hold exactly the rows training has reached so far: install every
        stored row that is not resident (collective reads under W > 1) and drop resident rows
        the store does not have, i.e. rows fetched ahead for batches not trained yet, still
        the initializer's (unchanged: dropping them writes nothing; they are fetched again
        when their batch comes). After a flush every row a step updated is in the store, so
        the table then reads as the same training without a cache would. Returns the ids
        added per table."""
        added = {}
        for name, table in self.tables.items():
            store = self.stores[name]
            stored = store.stored_ids() if isinstance(store, PartitionedStore) else _local_ids(store)
            stored = stored.to(table.device)
            keys, _ = table.index.keys_and_rows()
            untrained = keys[~torch.isin(keys, stored)]
            if untrained.numel():
                table.evict(ids=untrained)
            absent = table.index.find(stored) < 0 if stored.numel() else stored.bool()
            missing = stored[absent]
            if isinstance(store, PartitionedStore):
                # A collective read takes the same ids on every rank: a partitioned cache holds
                # other rows on each, so all ranks read every stored id and keep the absent ones.
                with store.reading_here():
                    got = store.lookup(stored.cpu())
                mask = absent.cpu()
                got = Lookup(got.values[mask], got.state[mask] if got.state is not None else None, got.found[mask])
            elif missing.numel():
                got = store.lookup(missing.cpu())
            if missing.numel():
                table.backing.install(table, missing, got)
            added[name] = missing
        return added

    def _eval_start(self) -> None:
        if self.cache is None or self._eval_added:
            return
        self._retire_iteration()
        self.cache.flush()
        self._eval_added = self._install_stored_rows()

    def _eval_end(self) -> None:
        if self.cache is None:
            return
        for name, ids in self._eval_added.items():
            if ids.numel():
                self.tables[name].evict(ids=ids)  # unchanged by evaluation: nothing is written back
        self._eval_added = {}

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._eval_start()

    def on_validation_end(self) -> None:
        self._eval_end()
        super().on_validation_end()

    def on_test_start(self) -> None:
        super().on_test_start()
        self._eval_start()

    def on_test_end(self) -> None:
        self._eval_end()
        super().on_test_end()

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> Dict[str, Any]:
        """The module's state with every trained row in its tables (a Lightning checkpoint
        taken while training must not hold only the rows the cache has resident). Called on
        every rank (the reads of stored rows are collective); the rows are installed for the
        copy and dropped again."""
        if self.cache is None or self._eval_added:  # no cache, or evaluation installed them already
            return super().lightning_module_state_dict()
        self._retire_iteration()
        self.cache.flush()
        added = self._install_stored_rows()
        try:
            # Copies: the rows installed for it leave the tables again before the file is written.
            return {k: v.clone() if isinstance(v, torch.Tensor) else v
                    for k, v in super().lightning_module_state_dict().items()}
        finally:
            for name, ids in added.items():
                if ids.numel():
                    self.tables[name].evict(ids=ids)

    # ------------------------------------------------------------------ reports
    def cache_stats(self) -> Dict[str, Any]:
        """The cache's totals (``LookaheadCache.stats()`` without the per-step list) of the run
        in progress or, after fit, of the last run; ``{}`` before any."""
        stats = self.cache.stats() if self.cache is not None else self._final_stats
        if not stats:
            return {}
        out = {k: v for k, v in stats.items() if k not in ("per_step", "last_step")}
        out["max_resident_rows"] = dict(self._max_resident)  # over the steps; resident_rows is now
        return out


GaussStrategy.register_strategies(StrategyRegistry)
