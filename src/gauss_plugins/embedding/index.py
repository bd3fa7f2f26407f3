"""The hash index of a dynamic embedding table: int64 key -> dense row number.

Every ``table_backend`` implements :class:`HashIndex`. The index maps raw int64 ids (any
value, negatives, ``INT64_MIN`` and ``INT64_MAX`` included) to row numbers in
``[0, capacity)``, without collisions. The values (embedding vectors, optimizer state,
policy state) live in dense arrays *owned by the table* and indexed by row; the index only
hands out and takes back row numbers. That keeps the index small (a slot holds a key and a
row) and lets the arrays be gathered with ordinary dense kernels.

Backends
--------
* :class:`TorchHashIndex` (here, table_backend ``"torch"``): open addressing written as
  vectorized torch ops, CPU or CUDA. The reference the others are tested against.
* ``gauss_kernels.hash_table.cpu_ext:CpuHashIndex`` (``"cpu_ext"``): a compiled C++ op.
* ``gauss_kernels.hash_table.triton_index:TritonHashIndex`` (``"triton"``): CUDA kernels.

A backend is built as ``Backend(capacity, device)`` and selected through
``get_registry().select("table_backend", "auto", device=device)``. The conformance tests in
``tests/embedding/test_index.py`` run against every registered, available backend.

Contract (what every backend must do)
-------------------------------------
* Keys are 1-D ``int64`` tensors on the index's device; anything else raises ``TypeError``
  (dtype) or ``ValueError`` (shape, device) before any state changes. Row tensors returned
  are ``int64`` on the index's device, same length as ``keys``.
* ``find`` never changes state. ``insert`` maps every key to a row, allocating rows for
  keys not present; several occurrences of one key in a call get one row. ``remove`` frees
  rows; a freed row may be handed out again by a later ``insert``.
* Row numbers are stable: ``rehash`` (growth) and ``load_state_dict`` keep every key's row.
* ``insert`` is all-or-nothing: if the new keys do not fit it raises :class:`IndexFullError`
  and inserts none of them.
* Which free row a new key gets is backend-defined but deterministic on CPU backends (same
  state + same keys -> same rows). Tables must not let numerics depend on row numbers.
* Not thread-safe: the caller serializes calls on one index.

Optional fused kernels
----------------------
A backend may set ``fused`` to an object with all the methods of :class:`FusedKernels`; the
table then uses them instead of its torch code for pooling, gradient accumulation, the
sparse optimizer update and row initialisation (``None``: torch code). Each must compute
what the documented torch reference computes, with per-row sums in batch-position order.
"""
from __future__ import annotations

import abc
import math
import numbers
from typing import Dict, List, Optional, Protocol, Tuple, Union

import torch

__all__ = [
    "FusedKernels",
    "HashIndex",
    "IndexFullError",
    "TorchHashIndex",
    "check_keys",
    "hash_keys",
    "slots_for_capacity",
    "MAX_LOAD_FACTOR",
]

Device = Union[str, torch.device, None]

# Slots per row are sized so a full index is at most this full (open addressing with linear
# probing stays at a few probes per hit up to here; see overhead_bytes_per_row in the
# benchmark: 12 bytes per slot / 0.75 = 16 bytes per live row).
MAX_LOAD_FACTOR = 0.75

_INT64_MIN = -(2**63)


class IndexFullError(RuntimeError):
    """``insert`` needed more rows than ``capacity``; nothing was inserted."""


def slots_for_capacity(capacity: int, max_load_factor: float = MAX_LOAD_FACTOR) -> int:
    """Number of slots for ``capacity`` rows: ``ceil(capacity / max_load_factor)``, at least 8."""
    return max(8, math.ceil(capacity / max_load_factor))


def resolve_device(device) -> torch.device:
    """``torch.device`` with the CUDA index filled in: tensors report ``cuda:0``, never
    ``cuda``, so a table created on "cuda" must store the concrete device to compare with."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_keys(keys: torch.Tensor, device: torch.device, what: str = "keys") -> None:
    """Raise a clear error unless ``keys`` is a 1-D int64 tensor on ``device``."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of int64 ids, got {type(keys).__name__}")
    if keys.dtype != torch.int64:
        hint = " (float ids are not accepted: ids are exact int64 values)" if keys.is_floating_point() else ""
        if keys.dtype == torch.uint64:
            hint = " (.long() wraps uint64 ids above 2**63 - 1 to negative ids: map them to int64 deliberately)"
        raise TypeError(f"{what} must have dtype torch.int64, got {keys.dtype}{hint}; convert with .long() "
                        f"only if the values are exact integer ids")
    if keys.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(keys.shape)}; flatten it first")
    if keys.device != device:
        raise ValueError(f"{what} are on {keys.device} but the table is on {device}; move them with .to({str(device)!r})")


# --------------------------------------------------------------------------- hashing
_M1 = 0xFF51AFD7ED558CCD - 2**64  # murmur3 fmix64 constants as signed int64
_M2 = 0xC4CEB9FE1A85EC53 - 2**64


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_keys(keys: torch.Tensor) -> torch.Tensor:
    """murmur3's 64-bit finalizer (fmix64) on int64 keys, wrapping arithmetic.

    All backends use this hash so that their slot layouts agree (not required, but it keeps
    the reference and the kernels comparable). ``slot = ((h >>> 32) * num_slots) >>> 32``.
    """
    h = keys ^ _lshr(keys, 33)
    h = h * _M1
    h = h ^ _lshr(h, 33)
    h = h * _M2
    return h ^ _lshr(h, 33)


def home_slots(keys: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The first slot probed for each key (multiply-shift range reduction, num_slots < 2**31)."""
    return (_lshr(hash_keys(keys), 32) * num_slots) >> 32


# --------------------------------------------------------------------------- interface
class FusedKernels(Protocol):
    """Kernels a backend may offer beside the index (attribute ``HashIndex.fused``)."""

    def lookup_pool(self, index: "HashIndex", ids: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                    per_sample_weights: Optional[torch.Tensor], mode: int, default_row: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Probe ``ids`` in ``index`` and pool their rows of ``weight`` per bag (``offsets``
        int64[B+1]; mode 0 sum, 1 mean; absent ids read ``default_row``). Returns
        (float32[B, D], rows int64[N]). Same arithmetic as :meth:`pool_rows`."""

    def stamp_rows(self, rows: torch.Tensor, stamp: torch.Tensor, stamp_value: int,
                   policy_array: Optional[torch.Tensor], policy_mode: int, policy_value: int, skip_row: int) -> None:
        """Stamp the rows a training lookup read (rows < 0 and ``skip_row`` excepted):
        ``stamp[row] = stamp_value``; ``policy_array[row] = policy_value`` (mode 1) or
        ``+= 1`` per occurrence, saturating at 2**31 - 1 (mode 2); mode 0 no policy."""

    def select_victims(self, index: "HashIndex", stamp: torch.Tensor, scores: torch.Tensor, protect: torch.Tensor,
                       limit: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys ascending, rows) of the ``k`` rows of smallest (``scores[row]``, key) among
        rows ``< limit`` with ``stamp[row] >= 0`` (int32; -1 marks rows without a key) that
        are not in ``protect``."""

    def sample_victims(self, stamp: torch.Tensor, scores: Optional[torch.Tensor], row_ids: torch.Tensor,
                       protect: torch.Tensor, rng_state: torch.Tensor, limit: int, k: int, m: int
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Optional (the table checks with ``getattr``): sampled victim selection in one call.
        Draws ``m`` rows uniformly from ``[0, limit)`` (``rng_state``, int64[1], is the
        stream position and advances by ``m``), keeps each once if ``stamp[row] >= 0`` and
        it is not in ``protect`` (negative entries ignored), and returns (keys ascending,
        rows) of the ``k`` lowest (``scores[row]``, row) among them (``stamp`` when
        ``scores`` is None); fewer than ``k`` when the sample holds fewer candidates."""

    def sweep_victims(self, stamp: torch.Tensor, scores: Optional[torch.Tensor], row_ids: torch.Tensor,
                      protect: torch.Tensor, rng_state: torch.Tensor, hand: torch.Tensor, limit: int, k: int,
                      probe: int, quantile_div: int, max_scan: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Optional (the table checks with ``getattr``): victim selection by a sweep. The
        threshold ``t`` is the ``1/quantile_div`` quantile of the scores of the live rows
        among ``probe`` rows drawn as :meth:`sample_victims` draws them; then, from row
        ``hand[0]`` on (wrapping at ``limit``), the live rows with ``scores[row] <= t`` that
        are not in ``protect`` are taken in row order until ``k`` are, or ``max_scan`` rows
        were looked at. ``hand`` (int64[1]) ends just past the last row taken or looked at.
        Returns (keys ascending, rows); fewer than ``k`` when the sweep fell short."""

    def sample_candidates(self, stamp: torch.Tensor, scores: Optional[torch.Tensor], row_ids: torch.Tensor,
                          rng_state: torch.Tensor, limit: int, k: int, m: int
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Optional (with :meth:`take_victims`): victim pre-selection off the training thread.
        The sample of :meth:`sample_victims` with nothing protected; returns the ``k``
        candidates of lowest (score, row), in that order, as (rows int64, the stamps and the
        scores read, int32, and their positions ordered by (id, row), int64). Reads the
        table only, so it may run while training writes it."""

    def take_victims(self, stamp: torch.Tensor, scores: Optional[torch.Tensor], row_ids: torch.Tensor,
                     cand_rows: torch.Tensor, cand_stamps: torch.Tensor, cand_scores: torch.Tensor,
                     cand_by_key: torch.Tensor, protect: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keys ascending, rows) of the first ``k`` candidates (in score order) still valid:
        ``stamp[row]`` (and ``scores[row]`` when given) unchanged since
        :meth:`sample_candidates`, not in ``protect`` (negative entries ignored); fewer than
        ``k`` when too few are."""

    def gather_changed(self, chunks: List[torch.Tensor], chunk_rel: List[int], exact: List[bool], version_rel: int,
                       stamp: torch.Tensor, row_ids: torch.Tensor, weight: torch.Tensor, default_row: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Optional: a sync pull's resolve in one call. Keeps row ``r`` of chunk ``c`` when
        ``stamp[r] == chunk_rel[c]`` (exact chunk) or ``stamp[r] > version_rel``, each row
        once, never ``default_row``; returns (ids ascending, rows, ``weight`` rows, entries
        visited)."""

    def rows_not_in(self, rows: torch.Tensor, chunks: List[torch.Tensor], num_rows: int) -> torch.Tensor:
        """Optional: bool per entry of ``rows``: in none of ``chunks`` (rows < ``num_rows``)."""

    def pool_rows(self, weight: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                  per_sample_weights: Optional[torch.Tensor], mode: int, stamp: Optional[torch.Tensor] = None,
                  stamp_value: int = 0, policy_array: Optional[torch.Tensor] = None, policy_mode: int = 0,
                  policy_value: int = 0, skip_row: int = -1) -> torch.Tensor:
        """float32[B, D]: per bag, ``sum_i psw[i] * weight[rows[i]]`` in position order (mean:
        times ``1 / len`` as float32); with ``stamp``, also :meth:`stamp_rows` on the rows read."""

    def bag_index(self, offsets: torch.Tensor) -> torch.Tensor:
        """int64[N]: the bag of each position (``repeat_interleave(arange(B), lengths)``)."""

    def accumulate_grads(self, rows: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor,
                         scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Sum ``scale[i] * src[src_idx[i]]`` (empty src_idx: ``i``; empty scale: 1) per
        distinct row, in position order. Returns (distinct rows ascending, float32[U, D],
        all finite)."""

    def sparse_update(self, kind: int, weight: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
                      state1: Optional[torch.Tensor], state2: Optional[torch.Tensor],
                      steps: Optional[torch.Tensor], hyperparams: List[float]) -> None:
        """In-place update of distinct ``rows`` (see :mod:`gauss_plugins.embedding.optim`)."""

    def accumulate_update(self, kind: int, weight: torch.Tensor, state1: Optional[torch.Tensor],
                          state2: Optional[torch.Tensor], steps: Optional[torch.Tensor], hyperparams: List[float],
                          rows: torch.Tensor, src: torch.Tensor, src_idx: torch.Tensor, scale: torch.Tensor,
                          skip_row: int, stamp: torch.Tensor, stamp_value: int) -> torch.Tensor:
        """:meth:`accumulate_grads` then :meth:`sparse_update` in one pass over the distinct
        rows, also setting ``stamp[row] = stamp_value`` (rows equal to ``skip_row`` are left
        alone), for gradients known to be finite with sums that cannot overflow. Returns the
        distinct rows."""

    def init_uniform(self, weight: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, seed: int,
                     low: float, high: float) -> None:
        """``weight[rows] = deterministic_uniform(ids, ...)``, bit for bit."""


class HashIndex(abc.ABC):
    """Interface of a collision-free int64 key -> row index (see the module docstring).

    Attributes every backend has: ``device`` (torch.device), ``capacity`` (max live keys;
    rows are in ``[0, capacity)``), ``num_slots`` (memory footprint driver).
    """

    device: torch.device
    capacity: int
    #: optional :class:`FusedKernels` (None: the table uses its torch code)
    fused: Optional[FusedKernels] = None

    @abc.abstractmethod
    def __init__(self, capacity: int, device: Device = None) -> None:
        """An empty index for up to ``capacity`` keys (rows ``0..capacity-1``) on ``device``."""

    # -- queries ---------------------------------------------------------------
    @abc.abstractmethod
    def find(self, keys: torch.Tensor, default: int = -1) -> torch.Tensor:
        """Rows of ``keys`` (int64[N]); ``default`` where a key is absent. No state change."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of live keys."""

    @property
    @abc.abstractmethod
    def num_slots(self) -> int:
        """Number of hash slots (``len(self) / num_slots`` is the load factor)."""

    @abc.abstractmethod
    def keys_and_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All live ``(keys, rows)``, both int64[len(self)], in a backend-defined order."""

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of device memory held by the index (slots and allocator), for accounting."""

    # -- updates ---------------------------------------------------------------
    @abc.abstractmethod
    def insert(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows for ``keys``, allocating rows for absent keys.

        Returns ``(rows int64[N], is_new bool[N])``. ``is_new`` is True at exactly one
        position of each key that was absent before the call (which position is
        unspecified), so ``keys[is_new]`` / ``rows[is_new]`` list each new key once.
        Raises :class:`IndexFullError` (inserting nothing) when ``len(self)`` plus the number
        of distinct new keys would exceed ``capacity``.
        """

    @abc.abstractmethod
    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        """Remove ``keys``; returns their former rows (-1 where absent; a key repeated in the
        call reports its row at every position). The rows become free."""

    @abc.abstractmethod
    def rehash(self, new_capacity: int) -> None:
        """Grow to ``new_capacity >= capacity`` rows (more slots); every key keeps its row."""

    # -- checkpoints -----------------------------------------------------------
    @abc.abstractmethod
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Portable state, the same format for every backend (CPU tensors)::

            capacity   int64 scalar
            keys       int64[L]   live keys, ascending
            rows       int64[L]   their rows
            free_rows  int64[F]   rows given out before and now free, in the order
                                  ``insert`` will reuse them (first element first)
            next_row   int64 scalar: rows >= next_row were never handed out

        ``insert`` hands out ``free_rows`` first, then ``next_row, next_row + 1, ...``.
        Backends whose allocator works differently must still export and import this form.
        """

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the whole state with ``state`` (from any backend's :meth:`state_dict`);
        capacity, rows and the allocator order are restored exactly."""

    # -- conveniences (shared) ---------------------------------------------------
    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """bool[N]: whether each key is present."""
        return self.find(keys) >= 0

    @property
    def load_factor(self) -> float:
        return len(self) / self.num_slots

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(len={len(self)}, capacity={self.capacity}, "
                f"num_slots={self.num_slots}, device={self.device})")


def _validate_state(state: Dict[str, torch.Tensor]) -> Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Check a portable index state; returns (capacity, keys, rows, free_rows, next_row) on CPU."""
    missing = {"capacity", "keys", "rows", "free_rows", "next_row"} - set(state)
    if missing:
        raise ValueError(f"index state is missing {sorted(missing)}")
    capacity = int(state["capacity"])
    keys = state["keys"].to("cpu", torch.int64).reshape(-1)
    rows = state["rows"].to("cpu", torch.int64).reshape(-1)
    free_rows = state["free_rows"].to("cpu", torch.int64).reshape(-1)
    next_row = int(state["next_row"])
    if keys.numel() != rows.numel():
        raise ValueError("index state: keys and rows differ in length")
    if not 0 <= next_row <= capacity:
        raise ValueError(f"index state: next_row {next_row} outside [0, {capacity}]")
    used = torch.cat([rows, free_rows])
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= next_row):
        raise ValueError("index state: a row is outside [0, next_row)")
    if used.numel() != next_row or torch.unique(used).numel() != next_row:
        raise ValueError("index state: live rows and free rows must partition [0, next_row)")
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError("index state: duplicate keys")
    return capacity, keys, rows, free_rows, next_row


# --------------------------------------------------------------------------- torch backend
class SlotArrayIndex(HashIndex):
    """The slot layout shared by the open-addressing backends (torch ops, Triton kernels).

    Slots are two tensors, ``slot_keys`` int64 and ``slot_rows`` int32 (12 bytes a slot),
    with ``slot_rows == EMPTY`` (-1) an empty slot and ``TOMBSTONE`` (-2) a removed key, so
    any int64 is a valid key. Free rows are a stack reused from its end. Subclasses probe
    and claim slots (``find``, ``insert``, ``remove``) and place known keys (``_place``);
    growth, rebuilds, row allocation and checkpoints are the same for all of them.
    """

    EMPTY = -1
    TOMBSTONE = -2

    def _init_slots(self, capacity: int, device: torch.device) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.device = device
        self.capacity = int(capacity)
        self._alloc_slots(slots_for_capacity(self.capacity))
        self._size = 0
        self._tombstones = 0
        self._free = torch.empty(0, dtype=torch.int64, device=self.device)  # stack: reuse from the end
        self._next_row = 0

    @staticmethod
    def _check_slot_count(n: int) -> None:
        if n >= 2**31:
            raise ValueError(f"{n} slots is too many for one index (max 2**31 - 1); shard the table")

    def _alloc_slots(self, n: int) -> None:
        self._check_slot_count(n)
        self.slot_keys = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.slot_rows = torch.full((n,), self.EMPTY, dtype=torch.int32, device=self.device)

    @abc.abstractmethod
    def _place(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Put keys known to be absent and distinct into the slots with the given rows."""

    # -- queries ---------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.slot_keys.numel()

    def __len__(self) -> int:
        return self._size

    def memory_bytes(self) -> int:
        return (self.slot_keys.numel() * 8 + self.slot_rows.numel() * 4
                + self._free.numel() * self._free.element_size())

    def keys_and_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        live = self.slot_rows >= 0
        return self.slot_keys[live].clone(), self.slot_rows[live].to(torch.int64)

    # -- updates ---------------------------------------------------------------
    def _allocate(self, count: int) -> torch.Tensor:
        """``count`` rows: free rows first (from the top of the stack), then fresh ones."""
        take = min(count, self._free.numel())
        reused = self._free[self._free.numel() - take:].flip(0)
        self._free = self._free[: self._free.numel() - take]
        fresh = torch.arange(self._next_row, self._next_row + count - take, dtype=torch.int64, device=self.device)
        self._next_row += count - take
        return torch.cat([reused, fresh])

    def rehash(self, new_capacity: int) -> None:
        if isinstance(new_capacity, bool) or not isinstance(new_capacity, numbers.Integral):
            raise TypeError(f"new_capacity must be an int, got {new_capacity!r}")
        if new_capacity < self.capacity:
            raise ValueError(f"rehash can only grow: {new_capacity} < capacity {self.capacity}")
        slots = slots_for_capacity(new_capacity)
        self._check_slot_count(slots)
        self.capacity = int(new_capacity)
        self._rebuild(slots)

    def _rebuild(self, num_slots: int) -> None:
        keys, rows = self.keys_and_rows()
        self._alloc_slots(num_slots)
        self._tombstones = 0
        if keys.numel():
            self._place(keys, rows)

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        keys, rows = self.keys_and_rows()
        keys, order = keys.sort()
        return {
            "capacity": torch.tensor(self.capacity, dtype=torch.int64),
            "keys": keys.cpu(),
            "rows": rows[order].cpu(),
            "free_rows": self._free.flip(0).cpu(),
            "next_row": torch.tensor(self._next_row, dtype=torch.int64),
        }

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        capacity, keys, rows, free_rows, next_row = _validate_state(state)
        self._check_slot_count(slots_for_capacity(capacity))  # before anything changes
        self.capacity = capacity
        self._alloc_slots(slots_for_capacity(capacity))
        self._tombstones = 0
        self._size = keys.numel()
        self._free = free_rows.flip(0).to(self.device)
        self._next_row = next_row
        if keys.numel():
            self._place(keys.to(self.device), rows.to(self.device))


class TorchHashIndex(SlotArrayIndex):
    """Open addressing with linear probing, every operation a few vectorized torch ops.

    The slot layout is :class:`SlotArrayIndex`'s. Lookups run in rounds: every unresolved key reads its current slot, resolves
    on a match or an empty slot, else moves one slot on. Inserts claim empty slots by
    scatter-then-read-back (one winner per slot per round). Removal leaves tombstones, which
    a rebuild clears once they fill a quarter of the slots.
    Works on CPU and CUDA; far slower than the compiled backends on CPU (see PLATFORM.md).
    """

    def __init__(self, capacity: int, device: Device = None) -> None:
        self._init_slots(capacity, resolve_device(device))

    def _probe(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slot, found) per key: the slot holding it, or the empty slot ending its probe."""
        n = self.num_slots
        pos = home_slots(keys, n)
        slot = torch.zeros_like(keys)  # keys never resolved (no empty slot on their path) are absent
        found = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
        active = torch.arange(keys.numel(), device=keys.device)
        k = keys
        for _ in range(n + 1):
            if active.numel() == 0:
                break
            r = self.slot_rows[pos]
            hit = (r >= 0) & (self.slot_keys[pos] == k)
            done = hit | (r == self.EMPTY)
            if bool(done.any()):
                idx = active[done]
                slot[idx] = pos[done]
                found[idx] = hit[done]
                keep = ~done
                active, pos, k = active[keep], pos[keep], k[keep]
            pos = pos + 1
            pos = torch.where(pos == n, torch.zeros_like(pos), pos)
        return slot, found

    def find(self, keys: torch.Tensor, default: int = -1) -> torch.Tensor:
        check_keys(keys, self.device)
        if keys.numel() == 0 or self._size == 0:
            return torch.full(keys.shape, default, dtype=torch.int64, device=self.device)
        slot, found = self._probe(keys)
        rows = self.slot_rows[slot].to(torch.int64)
        return torch.where(found, rows, torch.full_like(rows, default))

    def insert(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        check_keys(keys, self.device)
        if keys.numel() == 0:
            return keys.clone(), torch.zeros(0, dtype=torch.bool, device=self.device)
        uniq, first, inverse = _unique_first(keys)
        rows_u = self.find(uniq)
        new = rows_u < 0
        n_new = int(new.sum())
        if n_new:
            if self._size + n_new > self.capacity:
                raise IndexFullError(f"hash index full: {self._size} keys + {n_new} new > capacity {self.capacity}")
            # New keys take rows in order of their first occurrence in `keys`.
            new_keys, order = uniq[new], first[new].argsort()
            new_keys = new_keys[order]
            new_rows = self._allocate(n_new)
            self._place(new_keys, new_rows)
            self._size += n_new
            placed = torch.empty_like(new_rows)
            placed[order] = new_rows
            rows_u[new] = placed
            self._maybe_clean()
        rows = rows_u[inverse]
        is_new = torch.zeros(keys.shape, dtype=torch.bool, device=self.device)
        is_new[first[new]] = True
        return rows, is_new

    def _place(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Write distinct absent ``keys`` with ``rows`` into empty or tombstone slots."""
        n = self.num_slots
        pos = home_slots(keys, n)
        ident = torch.arange(keys.numel(), device=self.device)
        claim = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        while keys.numel():
            free = self.slot_rows[pos] < 0
            if bool(free.any()):
                # Several keys may want one slot: the highest index wins the scatter; read back.
                cand = ident[free]
                claim[pos[free]] = cand
                won = torch.zeros_like(free)
                won[free] = claim[pos[free]] == cand
                wpos = pos[won]
                self._tombstones -= int((self.slot_rows[wpos] == self.TOMBSTONE).sum())
                self.slot_keys[wpos] = keys[won]
                self.slot_rows[wpos] = rows[won].to(torch.int32)
                claim[wpos] = -1
                keep = ~won
                keys, rows, pos, ident = keys[keep], rows[keep], pos[keep], ident[keep]
            pos = pos + 1
            pos = torch.where(pos == n, torch.zeros_like(pos), pos)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        check_keys(keys, self.device)
        if keys.numel() == 0 or self._size == 0:
            return torch.full(keys.shape, -1, dtype=torch.int64, device=self.device)
        slot, found = self._probe(keys)
        rows = torch.where(found, self.slot_rows[slot].to(torch.int64), torch.full_like(slot, -1))
        gone = torch.unique(slot[found])
        if gone.numel():
            freed = self.slot_rows[gone].to(torch.int64)
            dead_keys = self.slot_keys[gone]
            self.slot_rows[gone] = self.TOMBSTONE
            self._tombstones += gone.numel()
            self._size -= gone.numel()
            # Freed rows are reused in order of their keys' first occurrence in this call.
            order = _first_positions(keys, dead_keys).argsort()
            self._free = torch.cat([self._free, freed[order].flip(0)])
            self._maybe_clean()
        return rows

    def _maybe_clean(self) -> None:
        """Rebuild without tombstones once they fill a quarter of the slots, or leave fewer
        than an eighth of the slots empty (probes of absent keys stop at empty slots)."""
        used = self._size + self._tombstones
        if self._tombstones and (self._tombstones * 4 > self.num_slots or used * 8 > self.num_slots * 7):
            self._rebuild(self.num_slots)


def _unique_first(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique keys, position of each one's first occurrence, inverse)."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((uniq.numel(),), keys.numel(), dtype=torch.int64, device=keys.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return uniq, first, inverse


def _first_positions(keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each of ``targets`` (all present in ``keys``), its first position in ``keys``."""
    uniq, first, _ = _unique_first(keys)
    return first[torch.searchsorted(uniq, targets)]
