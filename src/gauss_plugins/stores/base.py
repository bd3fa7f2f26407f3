"""The embedding-store interface shared by training stores (TierPS) and serving stores (WePS).

A store maps raw int64 ids (any value, negative included) to rows of ``dim`` float32 values,
optionally followed by ``state_dim`` float32 optimizer-state values (Adagrad accumulators,
Adam moments) that travel with the row. Every call is batched over a 1-D id tensor:

* ``get(ids)`` -> ``[n, dim]`` values; ids the store does not hold read as the configured
  ``default`` (never as stale data).
* ``lookup(ids)`` -> :class:`Lookup` with values, optimizer state and a found mask.
* ``put(ids, values, state=None)`` and ``delete(ids)``; duplicate ids in one ``put`` resolve
  to the last occurrence (the latest value wins, as when changes are coalesced).
* ``version``: an int that grows with every mutation; serving stores fed by a
  :class:`~gauss_plugins.stores.syncer.Syncer` carry the training store's version instead.
* ``export()`` iterates the content as :class:`RowBatch` es; ``stats()`` is a JSON-able dict.

Bad input raises before any state changes. Rows cross process and machine boundaries only
as packed little-endian float32 bytes (:func:`pack_rows`), never pickled.
"""
from __future__ import annotations

import abc
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "EmbeddingStore",
    "Lookup",
    "RowBatch",
    "ChangeBatch",
    "as_ids",
    "as_rows",
    "last_occurrence",
    "in_sorted",
    "isin_ids",
    "merge_sorted_rows",
    "pack_rows",
    "unpack_rows",
]

if sys.byteorder != "little":  # pragma: no cover - packed rows are little-endian float32
    raise ImportError("gauss_plugins.stores supports little-endian hosts only")

IdsLike = Union[torch.Tensor, np.ndarray, Sequence[int]]


@dataclass
class Lookup:
    """The answer of :meth:`EmbeddingStore.lookup`: ``values`` ``[n, dim]``, ``state``
    ``[n, state_dim]`` (``None`` when the store keeps no optimizer state) and ``found``
    ``[n]`` bool; rows not found hold the store's default values and zero state."""

    values: torch.Tensor
    state: Optional[torch.Tensor]
    found: torch.Tensor


@dataclass
class RowBatch:
    """A batch of rows: ``ids`` ``[n]`` int64, ``values`` ``[n, dim]``, ``state``
    ``[n, state_dim]`` or ``None``."""

    ids: torch.Tensor
    values: torch.Tensor
    state: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class ChangeBatch:
    """What a syncer pushes: upserted rows, deleted ids (tombstones) and the training
    store's ``version`` the batch brings the target up to. ``full=True`` marks a complete
    image of the source (every row it holds): an id absent from it does not exist now."""

    ids: torch.Tensor
    values: torch.Tensor
    state: Optional[torch.Tensor]
    deleted: torch.Tensor
    version: int
    full: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.ids.numel())


# ---------------------------------------------------------------- validation helpers
def as_ids(ids: IdsLike, name: str = "ids") -> torch.Tensor:
    """``ids`` as a contiguous 1-D int64 CPU tensor; floats, bools and 2-D input are errors."""
    if isinstance(ids, torch.Tensor):
        t = ids
    elif isinstance(ids, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(ids))
    else:
        try:
            t = torch.as_tensor(list(ids), dtype=torch.int64) if not isinstance(ids, (int, float)) else None
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(f"{name}: expected a 1-D integer tensor or sequence of ints ({exc})") from None
        if t is None:
            raise TypeError(f"{name}: expected a 1-D integer tensor or sequence of ints, got a scalar {ids!r}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name}: ids must be integers, got dtype {t.dtype}")
    if t.dtype == torch.uint64:
        # Converting would wrap 2**64 - 1 to -1 silently: another id's row.
        raise TypeError(f"{name}: ids must be int64; uint64 ids above 2**63 - 1 would wrap to negative ids. "
                        f"Map them to int64 yourself (e.g. ids.view(torch.int64) if wrapping is what you want)")
    if t.dim() != 1:
        raise ValueError(f"{name}: ids must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64).contiguous()


def as_rows(values: Any, n: int, width: int, name: str) -> torch.Tensor:
    """``values`` as a contiguous ``[n, width]`` float32 CPU tensor, or a clear error."""
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(np.asarray(values))
    if not values.is_floating_point():
        raise TypeError(f"{name}: expected floating-point rows, got dtype {values.dtype}")
    if values.dim() != 2 or values.shape[0] != n or values.shape[1] != width:
        raise ValueError(f"{name}: expected shape [{n}, {width}], got {tuple(values.shape)}")
    return values.detach().to(device="cpu", dtype=torch.float32).contiguous()


def last_occurrence(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(unique_ids, positions)``: each distinct id once (sorted), with the position of its
    last occurrence in ``ids`` -- so that a batch with repeated ids means "latest wins"."""
    if ids.numel() == 0:
        return ids, torch.empty(0, dtype=torch.int64)
    if ids.numel() == 1 or bool((ids[1:] > ids[:-1]).all()):  # already sorted and distinct (syncer batches)
        return ids, torch.arange(ids.numel())
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    pos = torch.full((uniq.numel(),), -1, dtype=torch.int64)
    pos.scatter_reduce_(0, inverse, torch.arange(ids.numel(), dtype=torch.int64), reduce="amax")
    return uniq, pos


def in_sorted(ids: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
    """bool per entry of ``ids``: it occurs in ``sorted_ids`` (ascending). A binary search per
    entry, O(len(ids) log len(sorted_ids)): ``torch.isin`` sorts both inputs together, which
    costs ~100 ms when a handful of ids is tested against a 250k-row push."""
    if sorted_ids.numel() == 0 or ids.numel() == 0:
        return torch.zeros(ids.shape, dtype=torch.bool)
    pos = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
    return sorted_ids.index_select(0, pos) == ids


def isin_ids(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``torch.isin(ids, other)``, by :func:`in_sorted` when ``other`` is ascending (a pull's
    or a push's ids usually are; checking costs one pass over ``other``)."""
    if other.numel() <= 1 or bool((other[1:] >= other[:-1]).all()):
        return in_sorted(ids, other)
    return torch.isin(ids, other)


def _compact_rows(values: torch.Tensor, src: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """``values[src]`` (``src`` ascending, distinct) written over the first rows of
    ``values`` itself, a block at a time through a small buffer; returns that view. Safe
    because ``src[j] >= j``: a block's destination rows lie below every row a later block
    reads."""
    m = src.numel()
    for s in range(0, m, block):
        idx = src[s:s + block]
        values[s:s + idx.numel()] = values.index_select(0, idx)
    return values[:m]


def merge_sorted_rows(ids: torch.Tensor, values: torch.Tensor, keep: Optional[torch.Tensor],
                      add_ids: torch.Tensor, add_values: torch.Tensor,
                      in_place: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, values)``: the entries of ``ids`` (ascending, distinct; ``values`` a row each)
    where ``keep`` is True (``None``: all), plus the rows of ``add_ids`` (distinct, any order)
    whose id is not kept already -- ascending again.

    The rows are copied once at most: concatenating and sorting again would sort every id
    and copy every row twice (~50 MB each for a 200k-row pull of dim 64) to place a few.
    ``in_place``: ``values`` is the caller's own scratch; when nothing is added, the kept
    rows are moved to its front and a view of them is returned. A fresh 50 MB tensor costs
    more in page faults (the allocator maps it anew each time) than the copy itself."""
    src = None if keep is None else keep.nonzero().squeeze(1)
    kept = ids if src is None else ids.index_select(0, src)
    if add_ids.numel():
        add_ids, order = add_ids.sort()
        add_values = add_values.index_select(0, order)
        new = ~in_sorted(add_ids, kept)
        if not bool(new.all()):
            add_ids, add_values = add_ids[new], add_values[new]
    if add_ids.numel() == 0:
        if src is None:
            return kept, values
        return kept, _compact_rows(values, src) if in_place else values.index_select(0, src)
    if kept.numel() == 0:
        return add_ids, add_values.to(values.dtype)
    n, k = kept.numel(), add_ids.numel()
    # Each kept entry moves right by the number of added ids below it, each added id sits
    # after the kept ids below it and the added ids before it.
    at_kept = torch.arange(n) + torch.searchsorted(add_ids, kept)
    at_add = torch.searchsorted(kept, add_ids) + torch.arange(k)
    out_ids = torch.empty(n + k, dtype=ids.dtype)
    out_ids[at_kept] = kept
    out_ids[at_add] = add_ids
    source_row = torch.zeros(n + k, dtype=torch.int64)  # an added id's slot reads row 0, then is overwritten
    source_row[at_kept] = torch.arange(n) if src is None else src
    out = values.index_select(0, source_row)
    out[at_add] = add_values.to(values.dtype)
    return out_ids, out


def pack_rows(values: torch.Tensor, state: Optional[torch.Tensor] = None) -> np.ndarray:
    """Rows as a ``[n, 4 * (dim + state_dim)]`` uint8 array of little-endian float32 bytes."""
    rows = values if state is None or state.shape[1] == 0 else torch.cat([values, state], dim=1)
    rows = rows.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return rows.numpy().view(np.uint8).reshape(rows.shape[0], rows.shape[1] * 4)


def unpack_rows(buf: Union[bytes, bytearray, memoryview, np.ndarray], n: int, dim: int,
                state_dim: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inverse of :func:`pack_rows`; returns writable ``(values, state_or_None)``."""
    width = dim + state_dim
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1)
    if arr.size != n * width * 4:
        raise ValueError(f"packed rows: expected {n} rows of {width * 4} bytes, got {arr.size} bytes")
    rows = torch.from_numpy(arr.view(np.float32).reshape(n, width).copy())
    if state_dim:
        return rows[:, :dim].contiguous(), rows[:, dim:].contiguous()
    return rows, None


# ---------------------------------------------------------------- the interface
class EmbeddingStore(abc.ABC):
    """Batched key-value store of embedding rows (see the module docstring).

    Subclasses implement :meth:`lookup`, :meth:`put`, :meth:`delete`, :meth:`export`,
    :attr:`version` and :meth:`__len__`; the rest is shared.
    """

    #: row width in float32 values
    dim: int
    #: optimizer-state width in float32 values (0: the store keeps no state)
    state_dim: int = 0

    def __init__(self, dim: int, state_dim: int = 0, default: Union[float, Sequence[float], torch.Tensor] = 0.0):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(state_dim, int) or isinstance(state_dim, bool) or state_dim < 0:
            raise ValueError(f"state_dim must be a non-negative int, got {state_dim!r}")
        self.dim = dim
        self.state_dim = state_dim
        d = torch.as_tensor(default, dtype=torch.float32)
        if d.dim() == 0:
            d = d.expand(dim).clone()
        if d.shape != (dim,):
            raise ValueError(f"default must be a scalar or a vector of {dim} values, got shape {tuple(d.shape)}")
        self.default = d.contiguous()

    # -- required
    @abc.abstractmethod
    def lookup(self, ids: IdsLike) -> Lookup:
        """Values, optimizer state and found mask of ``ids`` (defaults where not found)."""

    @abc.abstractmethod
    def put(self, ids: IdsLike, values: Any, state: Any = None) -> int:
        """Insert or overwrite rows; returns the new :attr:`version`."""

    @abc.abstractmethod
    def delete(self, ids: IdsLike) -> int:
        """Remove rows (unknown ids are ignored); returns the new :attr:`version`."""

    @abc.abstractmethod
    def export(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        """Every row held, in batches of at most ``batch_size``."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """Grows with every mutation."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of rows held."""

    # -- shared
    def get(self, ids: IdsLike) -> torch.Tensor:
        """``[n, dim]`` values of ``ids``; the configured default where not held."""
        return self.lookup(ids).values

    def apply_changes(self, batch: ChangeBatch) -> None:
        """Apply a syncer push: upserts, then tombstones. Serving stores override this to
        record ``batch.version`` and to make the batch visible at once."""
        if batch.num_rows:
            self.put(batch.ids, batch.values, batch.state)
        if batch.deleted.numel():
            self.delete(batch.deleted)

    def stats(self) -> Dict[str, Any]:
        """Counters for logs and ``gauss`` listings (JSON-able)."""
        return {"rows": len(self), "dim": self.dim, "state_dim": self.state_dim, "version": self.version}

    def close(self) -> None:
        """Release files, sockets and threads (idempotent)."""

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers for subclasses
    def _check_put(self, ids: IdsLike, values: Any, state: Any) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Validate a put and resolve duplicate ids to their last occurrence."""
        ids_t = as_ids(ids)
        vals = as_rows(values, ids_t.numel(), self.dim, "values")
        st: Optional[torch.Tensor] = None
        if state is not None:
            if self.state_dim == 0:
                raise ValueError("this store keeps no optimizer state (state_dim=0) but state was given")
            st = as_rows(state, ids_t.numel(), self.state_dim, "state")
        uniq, pos = last_occurrence(ids_t)
        if uniq.numel() != ids_t.numel():
            vals = vals.index_select(0, pos)
            st = st.index_select(0, pos) if st is not None else None
        else:  # keep the caller's order when there is nothing to resolve
            uniq = ids_t
        return uniq, vals, st

    def _missing(self, n: int) -> Lookup:
        values = self.default.expand(n, self.dim).clone()
        state = torch.zeros(n, self.state_dim) if self.state_dim else None
        return Lookup(values, state, torch.zeros(n, dtype=torch.bool))
