"""``TritonHashIndex``: the dynamic embedding table's hash index as Triton kernels (CUDA).

Implements :class:`gauss_plugins.embedding.index.HashIndex` (table_backend ``"triton"``)
with the slot layout of the reference :class:`~gauss_plugins.embedding.index.TorchHashIndex`
(see :mod:`gauss_kernels.hash_table.triton_kernels` for the layout and the kernels).
``find`` is one probe kernel; ``insert`` is one lock-free find-or-claim kernel followed by
a few dense torch ops that hand out rows; ``remove``, growth and checkpoint loading reuse
the probe and a bulk placement kernel.

Results equal the reference's exactly, rows included: new keys take rows in the order of
their first occurrence in the batch (free rows first, in the order ``state_dict()["free_rows"]``
lists them, then never-used rows), and ``is_new`` marks that first occurrence. So the rows
a GPU index hands out are deterministic, although its kernels race.

Runs on CUDA tensors. Under ``TRITON_INTERPRET=1`` it also accepts CPU tensors (the
interpreter executes the kernels in numpy), which is how its tests run without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Optional, Tuple

import torch

from gauss_plugins.embedding.index import (
    Device,
    IndexFullError,
    SlotArrayIndex,
    check_keys,
    resolve_device,
)

from gauss_kernels.hash_table import triton_kernels as _k

__all__ = ["TritonHashIndex"]

# Claim markers are -3 - position as int32, so one insert call takes fewer keys than this.
MAX_INSERT_KEYS = 2**31 - 5
# Rebuild (same size) once tombstones pass a quarter of the slots, as the reference does,
# or once live + tombstones leave fewer than 1/8 of the slots empty: linear probing slows
# down sharply as empty slots run out, and a probe needs one to stop.
_MAX_TOMBSTONE_FRACTION = 0.25
_MIN_EMPTY_FRACTION = 0.125


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonHashIndex(SlotArrayIndex):
    """Open-addressing int64 -> row index whose probe, insert and placement are Triton kernels.

    Args:
        capacity: maximum number of live keys; rows are in ``[0, capacity)``.
        device: a CUDA device (default: the current one). CPU only under
            ``TRITON_INTERPRET=1``.

    Memory: ``num_slots * 12`` bytes of slots (``num_slots = ceil(capacity / 0.75)``) plus
    8 bytes per free row. Not thread-safe: serialize calls on one index (calls on one CUDA
    stream are serialized by the stream).
    """

    EMPTY = _k.EMPTY
    TOMBSTONE = _k.TOMBSTONE
    # Keys per program of the probe kernels. A block loops until its slowest lane's probe
    # ends, so small blocks waste fewer steps on the long tail of linear probing: one warp
    # of 32 keys measured best on an H100 (benchmarks/hash_table_gpu.py --sweep).
    BLOCK = 32
    NUM_WARPS = 1
    # find_and_gather moves [keys, dim] tiles of values: bigger programs (measured at dim 64).
    GATHER_BLOCK = 128
    GATHER_WARPS = 4

    def __init__(self, capacity: int, device: Device = None) -> None:
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        device = resolve_device(device)
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"TritonHashIndex runs on CUDA devices, got {device}; use table_backend "
                             f"'cpu_ext' or 'torch' on CPU (or set TRITON_INTERPRET=1 to debug the kernels on CPU)")
        self._init_slots(capacity, device)
        self._adam_hp: Optional[Tuple[Tuple[float, float, float], torch.Tensor]] = None

    def _grid(self, n: int) -> Tuple[int]:
        return ((n + self.BLOCK - 1) // self.BLOCK,)

    def _on_device(self):
        # Triton launches on the current CUDA device: make it the index's.
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _launch_opts(self) -> dict:
        return {"BLOCK": self.BLOCK, "num_warps": self.NUM_WARPS}

    def _probe(self, keys: torch.Tensor, default: int, want_slots: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n = keys.numel()
        rows = torch.empty(n, dtype=torch.int64, device=self.device)
        slots = torch.empty(n, dtype=torch.int64, device=self.device) if want_slots else rows
        with self._on_device():
            _k.find_kernel[self._grid(n)](keys, rows, slots, self.slot_keys, self.slot_rows,
                                          n, self.num_slots, default, WRITE_SLOTS=want_slots,
                                          **self._launch_opts())
        return rows, (slots if want_slots else None)

    def find(self, keys: torch.Tensor, default: int = -1) -> torch.Tensor:
        check_keys(keys, self.device)
        if not isinstance(default, int) or not -(2**63) <= default < 2**63:
            raise TypeError(f"default must be an int64 value, got {default!r}")
        if keys.numel() == 0 or self._size == 0:
            return torch.full(keys.shape, default, dtype=torch.int64, device=self.device)
        rows, _ = self._probe(keys.contiguous(), default, want_slots=False)
        return rows

    def find_and_gather(self, keys: torch.Tensor, values: torch.Tensor,
                        out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``keys`` and their value rows in one kernel: ``(rows int64[N], out[N, D])``.

        ``values`` is the table's ``[capacity, D]`` (or larger) array, row-major in its last
        dimension; ``out[i]`` is ``values[rows[i]]``, zeros where ``keys[i]`` is absent
        (``rows[i] == -1``). Saves the separate ``index_select`` pass of find + gather.
        """
        check_keys(keys, self.device)
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError(f"values must be a 2-D tensor [rows, dim], got "
                             f"{getattr(values, 'shape', type(values).__name__)}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device} but the index is on {self.device}")
        if values.stride(1) != 1:
            raise ValueError("values must be contiguous in the last dimension (call .contiguous())")
        if values.shape[0] < self._next_row:
            raise ValueError(f"values has {values.shape[0]} rows but the index hands out rows up to {self._next_row - 1}")
        n, dim = keys.numel(), values.shape[1]
        if out is None:
            out = torch.empty((n, dim), dtype=values.dtype, device=self.device)
        elif (out.shape != (n, dim) or out.dtype != values.dtype or out.device != self.device
              or out.stride(1) != 1):
            raise ValueError(f"out must be a [{n}, {dim}] {values.dtype} tensor on {self.device}, "
                             f"contiguous in the last dimension")
        rows = torch.empty(n, dtype=torch.int64, device=self.device)
        if n == 0:
            return rows, out
        if self._size == 0:
            rows.fill_(-1)
            out.zero_()
            return rows, out
        block_d = 1 << max(0, (dim - 1).bit_length())
        block = max(16, min(self.GATHER_BLOCK, 8192 // block_d))  # keep the [block, block_d] tile in registers
        with self._on_device():
            _k.find_gather_kernel[((n + block - 1) // block,)](
                keys.contiguous(), values, out, rows, self.slot_keys, self.slot_rows,
                n, self.num_slots, dim, values.stride(0), out.stride(0),
                BLOCK=block, BLOCK_D=block_d, num_warps=self.GATHER_WARPS)
        return rows, out

    def insert(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        check_keys(keys, self.device)
        n = keys.numel()
        if n == 0:
            return keys.clone(), torch.zeros(0, dtype=torch.bool, device=self.device)
        if n > MAX_INSERT_KEYS:
            raise ValueError(f"insert takes at most {MAX_INSERT_KEYS} keys per call, got {n}; split the batch")
        keys = keys.contiguous()
        slots, is_new, n_new = self._claim(keys)
        if n_new:
            # ascending input position = first-occurrence order; with the count known, no read back
            new_slots = slots.index_select(0, torch.nonzero_static(is_new, size=n_new).squeeze(1))
            self.slot_rows[new_slots] = self._allocate(n_new).to(torch.int32)
            self._size += n_new
        rows = self.slot_rows[slots].to(torch.int64)
        self._maybe_rebuild()
        return rows, is_new

    def _claim(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Run the claim kernel; on success returns (slots, is_new, n_new) with the new
        slots still holding claim markers. On failure rolls back and raises."""
        n = keys.numel()
        for attempt in range(2):
            slots = torch.empty(n, dtype=torch.int64, device=self.device)
            won = torch.empty(n, dtype=torch.int32, device=self.device)
            with self._on_device():
                _k.insert_claim_kernel[self._grid(n)](keys, slots, won, self.slot_keys, self.slot_rows,
                                                      n, self.num_slots, **self._launch_opts())
            failed = slots < 0
            state = self.slot_rows[slots.clamp_min(0)].to(torch.int64)
            marker = -3 - torch.arange(n, dtype=torch.int64, device=self.device)
            is_new = (state == marker) & ~failed
            n_new, n_failed, n_reused = torch.stack(
                [is_new.sum(), failed.sum(), (won == self.TOMBSTONE).sum()]).tolist()  # the one sync
            if not n_failed and self._size + n_new <= self.capacity:
                self._tombstones -= n_reused
                return slots, is_new, n_new
            # All-or-nothing: give every claimed slot back its previous state (empty or
            # tombstone). The keys written into them are ignored in non-live slots.
            claimed = won != 0
            self.slot_rows[slots[claimed]] = won[claimed]
            # n_new counts the keys that got a slot; with lanes left without one, at least
            # one more distinct key is new.
            needed = self._size + n_new + (1 if n_failed else 0)
            if needed <= self.capacity and self._tombstones and attempt == 0:
                self._rebuild(self.num_slots)  # tombstones filled the free slots: clear, retry
                continue
            raise IndexFullError(
                f"hash index full: {self._size} keys + {'at least ' if n_failed else ''}"
                f"{needed - self._size} new > capacity {self.capacity}; nothing was inserted")
        raise AssertionError("unreachable")

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        check_keys(keys, self.device)
        n = keys.numel()
        if n == 0 or self._size == 0:
            return torch.full(keys.shape, -1, dtype=torch.int64, device=self.device)
        rows, slots = self._probe(keys.contiguous(), -1, want_slots=True)
        pos = (slots >= 0).nonzero().squeeze(1)  # ascending input positions of present keys
        if pos.numel():
            hit_slots = slots[pos]
            # Mark each slot with the first position naming it (a max of -3 - position), so
            # freed rows go on the stack in first-occurrence order, as the reference does.
            marker = (-3 - pos).to(torch.int32)
            self.slot_rows.scatter_reduce_(0, hit_slots, marker, reduce="amax", include_self=False)
            first = self.slot_rows[hit_slots] == marker
            freed = rows[pos[first]]
            self.slot_rows.index_fill_(0, hit_slots, self.TOMBSTONE)  # a scalar: no copy to the GPU
            gone = freed.numel()
            self._tombstones += gone
            self._size -= gone
            self._free = torch.cat([self._free, freed.flip(0)])
            self._maybe_rebuild()
        return rows

    def masked_sparse_update(self, kind: int, weight: torch.Tensor, grads: torch.Tensor, touched: torch.Tensor,
                             ok: torch.Tensor, state1: Optional[torch.Tensor], state2: Optional[torch.Tensor],
                             step: Optional[torch.Tensor], hyperparams, stamp: torch.Tensor, stamp_value: int) -> None:
        """The table's sync-free optimizer step in one kernel: every row where ``touched``
        (bool ``[rows]``) and ``ok`` (0-dim bool, read on the device) is stepped by rule
        ``kind`` (0 sgd, 1 adagrad, 2 rowwise adagrad, 3 adam; ``hyperparams`` =
        ``SparseRule.hyperparams()``) with the float32 sums ``grads [rows, dim]`` and stamped
        with ``stamp_value``; no other row is read or written. The torch reference is
        ``SparseRule.masked_update`` (results within a float32 ulp or two: see
        :func:`~gauss_kernels.hash_table.triton_kernels.masked_update_kernel`)."""
        n_rows, dim = weight.shape
        arrays = [weight, grads, touched, ok, stamp] + [t for t in (state1, state2, step) if t is not None]
        for t in arrays:
            if t.device != self.device or not t.is_contiguous():
                raise ValueError(f"masked_sparse_update needs contiguous tensors on {self.device}")
        if grads.shape != weight.shape or grads.dtype != torch.float32 or touched.shape != (n_rows,) \
                or ok.numel() != 1 or stamp.shape != (n_rows,) or stamp.dtype != torch.int32:
            raise ValueError("masked_sparse_update: grads must be float32 like weight, touched and stamp one per row, "
                             "ok a single bool")
        if kind not in (0, 1, 2, 3):
            raise ValueError(f"masked_sparse_update: unknown rule kind {kind}")
        lr, eps, beta1, beta2, weight_decay = (float(x) for x in hyperparams)
        hp = self._adam_constants(lr, beta1, beta2) if kind == 3 else weight
        f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731  (rounded as torch's float32 scalars)
        block_d = 1 << max(0, (dim - 1).bit_length())
        block_r = max(1, min(128, 4096 // block_d))
        with self._on_device():
            _k.masked_update_kernel[((n_rows + block_r - 1) // block_r,)](
                weight, grads, touched, ok, state1 if state1 is not None else weight,
                state2 if state2 is not None else weight, step if step is not None else stamp, hp, stamp,
                n_rows, dim, int(stamp_value), lr, eps, weight_decay, f32(1.0 - beta1), f32(1.0 - beta2), f32(beta2),
                KIND=kind, HAS_DECAY=weight_decay != 0, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)

    def _adam_constants(self, lr: float, beta1: float, beta2: float) -> torch.Tensor:
        """float64 ``[lr, beta1, beta2]`` on the device, kept while they stay the same (a new
        set goes up through pinned memory, so changing the learning rate syncs nothing)."""
        key = (lr, beta1, beta2)
        cached = self._adam_hp
        if cached is None or cached[0] != key:
            host = torch.tensor(key, dtype=torch.float64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self._adam_hp = cached = (key, host.to(self.device, non_blocking=True))
        return cached[1]

    def _maybe_rebuild(self) -> None:
        n = self.num_slots
        if self._tombstones and (self._tombstones > _MAX_TOMBSTONE_FRACTION * n
                                 or self._size + self._tombstones > (1 - _MIN_EMPTY_FRACTION) * n):
            self._rebuild(n)

    def _place(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        n = keys.numel()
        if n == 0:
            return
        with self._on_device():
            _k.place_kernel[self._grid(n)](keys.contiguous(), rows.contiguous(), self.slot_keys, self.slot_rows,
                                           n, self.num_slots, **self._launch_opts())
