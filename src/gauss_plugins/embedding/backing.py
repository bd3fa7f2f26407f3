"""A backing store behind a :class:`~gauss_plugins.embedding.table.DynamicEmbeddingTable`.

Without one, an evicted row is gone: re-admitting its id starts it from the initializer.
With one (``table.attach_store(store)``), the table is the fast tier of a two-tier table:

* an evicted row (its values and its optimizer state, flattened into the store's state
  columns) is written to the store if it changed since it came from there;
* an id that a training lookup (re)admits gets its row and optimizer state back from the
  store instead of a fresh init;
* an eval-mode lookup of an id without a row reads its stored row (without inserting it;
  ``eval_reads_store = False`` reads the default row instead);
* ``table.delete(ids)`` deletes the ids from the store too (a deleted row must not come back);
* :meth:`StoreBacking.flush` writes every changed resident row (before a checkpoint of the
  store, or at the end of training).

So training through a table that evicts most of its rows gives the same rows as training
on an unbounded table (tests/cache/test_store_backing.py checks it to 1e-6).

"Changed" is read from the table's per-row version stamps: the backing remembers, per row,
the version at which the row last equalled its store copy (``clean``; -1: unknown, so the
row is written). A row whose stamp is newer was written since (an optimizer step, ``set``);
an eviction policy that stamps reads (LFU, TTL) makes read rows look changed too, which
costs a redundant write, never a lost one. A fresh row from a built-in initializer counts as
clean: its values are a function of its id and the seed, so re-admission recreates them
exactly (a callable initializer may not be deterministic: its rows are always written).

The store is anything with ``dim``, ``state_dim``, ``lookup(ids) -> Lookup``, ``put(ids,
values, state)`` and ``delete(ids)``: :class:`~gauss_plugins.stores.tierps.TierPS`, the Ray
``ShardedTierPS``. Rows cross to it as float32 on the CPU; ``write`` (default ``store.put``)
may be replaced to queue the writes elsewhere (the lookahead cache writes back on its worker
thread) as long as writes and later reads of an id stay in order.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

if TYPE_CHECKING:  # the table imports this module; only type names go the other way
    from gauss_plugins.embedding.table import DynamicEmbeddingTable

__all__ = ["StoreBacking", "state_layout", "pack_state", "unpack_state"]


def state_layout(table: "DynamicEmbeddingTable") -> List[Tuple[str, Tuple[int, ...], int]]:
    """``(name, row shape, width)`` of each optimizer-state field, in the rule's order: the
    store's state columns are these fields flattened side by side."""
    if table.rule is None:
        return []
    return [(name, tuple(shape), int(math.prod(shape)) if shape else 1)
            for name, (shape, _, _) in table.rule.state_fields(table.dim).items()]


def pack_state(table: "DynamicEmbeddingTable", rows: torch.Tensor, to_cpu: bool = True) -> Optional[torch.Tensor]:
    """float32 ``[n, state width]`` tensor of the optimizer state of ``rows`` (None: none), on
    the CPU, or on the table's device with ``to_cpu=False``."""
    layout = state_layout(table)
    if not layout:
        return None
    parts = [table.opt_state[name].index_select(0, rows).reshape(rows.numel(), width).to(torch.float32)
             for name, _, width in layout]
    packed = torch.cat(parts, dim=1)
    return packed.cpu() if to_cpu else packed


def unpack_state(table: "DynamicEmbeddingTable", state: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`pack_state`: field name -> ``[n, *shape]`` in the table's dtypes
    (an integer field such as Adam's step count is exact in float32 below 2**24)."""
    out, col, n = {}, 0, state.shape[0]
    for name, shape, width in state_layout(table):
        dtype = table.opt_state[name].dtype
        part = state[:, col:col + width].reshape(n, *shape)
        out[name] = part.round().to(dtype) if not dtype.is_floating_point else part.to(dtype)
        col += width
    return out


class StoreBacking:
    """Binds one table to one store (see the module docstring). Made by
    :meth:`DynamicEmbeddingTable.attach_store`; the table calls :meth:`restore` and
    :meth:`on_remove`, users call :meth:`flush`."""

    def __init__(self, table: "DynamicEmbeddingTable", store: Any,
                 write: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], Any]] = None):
        for attr in ("dim", "state_dim", "lookup", "put", "delete"):
            if not hasattr(store, attr):
                raise TypeError(f"a table's backing store needs dim, state_dim, lookup, put and delete (TierPS, "
                                f"ShardedTierPS); {type(store).__name__} has no {attr!r}")
        width = sum(w for _, _, w in state_layout(table))
        if int(store.dim) != table.dim or int(store.state_dim) != width:
            rule = table.rule.name if table.rule is not None else None
            raise ValueError(f"store rows (dim={store.dim}, state_dim={store.state_dim}) do not fit table "
                             f"{table.name!r} (dim={table.dim}, optimizer {rule!r} keeps {width} state values a "
                             f"row): create the store as TierPS(dim={table.dim}, state_dim={width}, ...)")
        self.store = store
        self.write = write if write is not None else self._put
        #: whether rows straight from the initializer can be recreated from their ids
        self.deterministic_init = isinstance(table.config.initializer, str)
        #: whether an eval-mode lookup reads ids without a row from the store (the lookahead
        #: cache turns it off in data-parallel runs, where a read outside its worker may be a
        #: collective the other ranks do not make)
        self.eval_reads_store = True
        #: ``ids -> bool`` of the rows this replica writes back (data parallel: each row's owner
        #: writes it); an evicted row another replica owns is not even copied. None: all rows.
        self.owner: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        #: ``(event, ids, values, state, dirty)`` -> None: set by an owner that writes evicted
        #: rows later, in order (the lookahead cache's worker): an eviction of rows known to be
        #: live then hands it host copies of every row and the CUDA event of their copy
        #: (None on the CPU) instead of reading the dirty mask back first. None: write now.
        self.write_later: Optional[Callable[..., None]] = None
        self._clean = torch.full((table.weight.shape[0],), -1, dtype=torch.int64, device=table.device)
        self.counters = {"restored_rows": 0, "initialized_rows": 0, "evicted_rows": 0, "written_back_rows": 0,
                         "deleted_rows": 0}

    def _put(self, ids: torch.Tensor, values: torch.Tensor, state: Optional[torch.Tensor]) -> None:
        # TierPS takes at most its RAM tier's rows in one put (it demotes older rows to disk
        # between puts): an eviction round larger than that goes in pieces.
        step = max(1, int(getattr(self.store, "max_ram_rows", ids.numel() or 1)) // 2)
        for s in range(0, ids.numel(), step):
            self.store.put(ids[s:s + step], values[s:s + step], None if state is None else state[s:s + step])

    def _clean_rows(self, table: "DynamicEmbeddingTable") -> torch.Tensor:
        # Growth keeps row numbers; the rows it adds start unknown (-1).
        n = table.weight.shape[0]
        if self._clean.numel() < n:
            grown = torch.full((n,), -1, dtype=torch.int64, device=table.device)
            grown[: self._clean.numel()] = self._clean
            self._clean = grown
        return self._clean

    def reset(self, table: "DynamicEmbeddingTable") -> None:
        """Forget which rows are clean (the table's rows were replaced, e.g. by a checkpoint)."""
        self._clean = torch.full((table.weight.shape[0],), -1, dtype=torch.int64, device=table.device)

    # ------------------------------------------------------------------ called by the table
    @torch.no_grad()
    def restore(self, table: "DynamicEmbeddingTable", ids: torch.Tensor, rows: torch.Tensor, version: int) -> None:
        """Rows ``rows`` were just inserted for ``ids`` and initialized at ``version``: give
        those the store holds their stored values and optimizer state back."""
        found = self.fill(table, ids, rows)
        clean = self._clean_rows(table)
        if self.deterministic_init:
            clean[rows] = version
        else:
            clean[rows[found]] = version
        n_found = int(found.sum())
        self.counters["restored_rows"] += n_found
        self.counters["initialized_rows"] += ids.numel() - n_found

    def fill(self, table: "DynamicEmbeddingTable", ids: torch.Tensor, rows: torch.Tensor,
             got: Optional[Any] = None) -> torch.Tensor:
        """Write the store's rows of ``ids`` (or the already read ``got``, a ``Lookup``) into
        ``rows``; returns the bool mask (on the table's device) of ids the store held."""
        if got is None:
            got = self.store.lookup(ids.cpu())
        found = got.found.to(table.device)
        if not bool(found.any()):
            return found
        at = rows[found]
        table.weight[at] = got.values.to(table.device)[found].to(table.dtype)
        if got.state is not None and table.rule is not None:
            for name, value in unpack_state(table, got.state.to(table.device)[found]).items():
                table.opt_state[name][at] = value
        return found

    @torch.no_grad()
    def install(self, table: "DynamicEmbeddingTable", ids: torch.Tensor, got: Any,
                borrowed: bool = False, found_host: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Insert the distinct absent ``ids`` (on the table's device) with ``got``, the store
        ``Lookup`` of them read earlier (a prefetch): stored rows where found, the
        initializer's elsewhere; they count as clean. No admission check. Returns their rows.
        ``borrowed``: rows another replica owns, lent for one step (not counted as restored).
        ``found_host``: ``got.found`` on the CPU, when the caller has it: the install then
        splits the rows by position indices instead of masks on the device (no GPU
        synchronisation but the index's insert)."""
        if ids.numel() == 0:
            return ids
        table._ensure_room(ids.numel(), protect=lambda: ids[:0])
        version = table._bump()
        rows, _ = table.index.insert(ids)
        if found_host is not None:
            return self._install_known(table, ids, got, rows, version, found_host, borrowed)
        # Rows the store holds take its values directly: computing the initializer's values
        # for them (to overwrite them) was most of an install's time.
        held = got.found.to(table.device)
        if bool(held.all()):
            table._init_rows(rows, ids, version, values=got.values.to(table.device))
        else:
            table._init_rows(rows[~held], ids[~held], version)
            if bool(held.any()):
                table._init_rows(rows[held], ids[held], version, values=got.values.to(table.device)[held])
        found = self.fill(table, ids, rows, got)
        self._clean_rows(table)[rows if self.deterministic_init else rows[found]] = version
        if not borrowed:
            n_found = int(found.sum())
            self.counters["restored_rows"] += n_found
            self.counters["initialized_rows"] += ids.numel() - n_found
        return rows

    def _install_known(self, table: "DynamicEmbeddingTable", ids: torch.Tensor, got: Any, rows: torch.Tensor,
                       version: int, found_host: torch.Tensor, borrowed: bool) -> torch.Tensor:
        n_found = int(found_host.sum())  # on the host
        if n_found == ids.numel():  # the usual prefetch: the store holds every row
            at, held = rows, None
        else:
            # Initializer rows first, then the stored ones overwrite theirs (same as install).
            table._init_rows(rows, ids, version)
            if n_found == 0:
                at = None
            else:
                held = found_host.nonzero().squeeze(1)
                held = held.pin_memory().to(rows.device, non_blocking=True) if rows.is_cuda else held
                at = rows.index_select(0, held)
        if at is not None:
            values = got.values if held is None else got.values.index_select(0, held)
            if held is None:
                table._init_rows(rows, ids, version, values=values.to(table.device))
            else:
                table.weight[at] = values.to(table.device, table.dtype)
            if got.state is not None and table.rule is not None:
                state = got.state if held is None else got.state.index_select(0, held)
                for name, value in unpack_state(table, state.to(table.device)).items():
                    table.opt_state[name][at] = value
        clean = self._clean_rows(table)  # index_fill_: the value stays a scalar (no copy to the GPU)
        if self.deterministic_init:
            clean.index_fill_(0, rows, version)
        elif at is not None:
            clean.index_fill_(0, at, version)
        if not borrowed:
            self.counters["restored_rows"] += n_found
            self.counters["initialized_rows"] += ids.numel() - n_found
        return rows

    def dirty(self, table: "DynamicEmbeddingTable", rows: torch.Tensor) -> torch.Tensor:
        """bool per row: written since it last equalled its store copy."""
        clean = self._clean_rows(table).index_select(0, rows)
        stamp = table.row_stamps.index_select(0, rows).to(torch.int64)
        return (clean < 0) | (stamp > clean - table._stamp_base)

    @torch.no_grad()
    def on_remove(self, table: "DynamicEmbeddingTable", ids: torch.Tensor, write_back: bool,
                  live: bool = False) -> None:
        """The table is about to remove ``ids`` (distinct): write back the changed rows
        (``write_back``, an eviction) or delete them from the store (a delete). ``live``:
        every id has a row (the caller knows), so nothing is filtered on the device."""
        if not write_back:
            self.store.delete(ids.cpu())
            self.counters["deleted_rows"] += ids.numel()
            return
        if live and self.write_later is not None:
            self._evict_later(table, ids)
            return
        rows = table.index.find(ids)
        live = rows >= 0
        ids, rows = ids[live], rows[live]
        if ids.numel() == 0:
            return
        self.counters["evicted_rows"] += ids.numel()
        dirty = self.dirty(table, rows)
        if self.owner is not None:
            dirty &= self.owner(ids).to(dirty.device, torch.bool)
        if bool(dirty.any()):
            self.write_rows(table, ids[dirty], rows[dirty])
        self._clean_rows(table)[rows] = -1  # the row number is free: whoever gets it next is unknown

    def _evict_later(self, table: "DynamicEmbeddingTable", ids: torch.Tensor) -> None:
        """An eviction without waiting for the GPU: every evicted row (its values, optimizer
        state, and whether it is to be written) is copied to pinned host memory on the
        current stream, and :attr:`write_later` gets the copies with the copy's event; it
        waits for the event, keeps the changed rows and writes them (in order with its
        later reads). Costs copying clean rows too, instead of a read back of the mask."""
        rows = table.index.find(ids)
        self.counters["evicted_rows"] += ids.numel()
        dirty = self.dirty(table, rows)
        if self.owner is not None:
            dirty &= self.owner(ids).to(dirty.device, torch.bool)
        values = table.weight.index_select(0, rows).to(torch.float32)
        state = pack_state(table, rows, to_cpu=False)  # copied to the host below, without waiting
        event = None
        if ids.is_cuda:
            def host(t):
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                return out.copy_(t, non_blocking=True)
            ids, values, dirty = host(ids), host(values), host(dirty)
            state = host(state) if state is not None else None
            event = torch.cuda.Event()
            event.record()
        self._clean_rows(table).index_fill_(0, rows, -1)  # the row number is free: its next owner is unknown
        self.write_later(event, ids, values, state, dirty)

    def write_rows(self, table: "DynamicEmbeddingTable", ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Hand the rows (copies, on the CPU) to :attr:`write`."""
        values = table.weight.index_select(0, rows).to(torch.float32).cpu()
        self.write(ids.cpu(), values, pack_state(table, rows))
        self.counters["written_back_rows"] += ids.numel()

    # ------------------------------------------------------------------ called by users
    @torch.no_grad()
    def flush(self, table: "DynamicEmbeddingTable", owner: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> int:
        """Write every changed resident row to the store (only those ``owner(ids)`` marks,
        when given); they count as clean afterwards. Returns the number of rows written."""
        ids, rows = table.index.keys_and_rows()
        if ids.numel() == 0:
            return 0
        dirty = self.dirty(table, rows)
        ids, rows = ids[dirty], rows[dirty]
        if owner is not None and ids.numel():
            mine = owner(ids)
            # Rows another replica owns are that replica's to write; they are clean here too.
            self._clean_rows(table)[rows[~mine]] = table.version
            ids, rows = ids[mine], rows[mine]
        if ids.numel():
            self.write_rows(table, ids, rows)
            self._clean_rows(table)[rows] = table.version
        return int(ids.numel())
