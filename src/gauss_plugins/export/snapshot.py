"""Frozen item-embedding rows for serving: the ``.gsnp`` snapshot file.

An exported ranker (``.pt2``) takes embedding *rows*, not item ids: the rows are gathered
outside the compiled graph, from a live WePS / Redis store or from a snapshot frozen at
export time. This module writes and reads that snapshot. The C++ runner reads the same
bytes, so the layout is fixed and documented here (all little-endian)::

    offset  size              field
    0       8                 magic b"GSNP0001"
    8       8   uint64        n_rows
    16      4   uint32        dim
    20      4   uint32        dtype code (0 = float32; the only one defined)
    24      8 * n_rows int64  ids, sorted ascending, unique
    ...     4 * n_rows * dim  float32 rows, row i belongs to ids[i]
    end-4   4   uint32        CRC-32 (zlib polynomial) of every preceding byte

Writes are atomic (temporary file in the same directory, fsync, rename), so a server that
reloads the snapshot sees the old file or the new one, never a torn one. Readers check the
magic, the sizes against the file length and the CRC before returning anything. An id that
is not in the snapshot is an error naming the id: serving zeros for an unknown item would
rank it silently and wrongly.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from gauss_plugins.serialization import write_atomic

__all__ = ["MAGIC", "Snapshot", "SnapshotError", "UnknownItemError", "read_snapshot", "write_snapshot"]

MAGIC = b"GSNP0001"
DTYPE_FLOAT32 = 0
_HEADER = struct.Struct("<8sQII")  # magic, n_rows, dim, dtype code
_CRC = struct.Struct("<I")

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("gauss_plugins.export.snapshot supports little-endian hosts only")

PathLike = Union[str, "os.PathLike[str]"]


class SnapshotError(ValueError):
    """A snapshot file is malformed, truncated or corrupted (the message says which and where)."""


class UnknownItemError(KeyError):
    """An item id asked for at serving time is not in the embedding source."""

    def __init__(self, item_id: int, source: str) -> None:
        super().__init__(item_id)
        self.item_id = int(item_id)
        self.source = source

    def __str__(self) -> str:
        return (f"item id {self.item_id} is not in {self.source}: re-export the snapshot from a model that "
                "has seen it, or drop it from the request")


@dataclass(frozen=True)
class Snapshot:
    """Rows of a snapshot: ``ids [n] int64`` sorted unique, ``rows [n, dim] float32``."""

    ids: torch.Tensor
    rows: torch.Tensor
    source: str = "snapshot"

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape, int64) -> ``[*ids.shape, dim]``; an id that is not in the
        snapshot raises :class:`UnknownItemError` naming it."""
        ids = torch.as_tensor(ids)
        if ids.dtype != torch.int64:
            raise TypeError(f"item ids must be int64, got {ids.dtype}")
        flat = ids.reshape(-1)
        if len(self) == 0:
            if flat.numel():
                raise UnknownItemError(int(flat[0]), f"{self.source} (it is empty)")
            return self.rows.new_zeros((*ids.shape, self.dim))
        pos = torch.searchsorted(self.ids, flat).clamp(max=len(self) - 1)
        found = self.ids[pos] == flat
        if not bool(found.all()):
            missing = int(flat[~found][0])
            raise UnknownItemError(missing, self.source)
        return self.rows[pos].reshape(*ids.shape, self.dim)


def _validate(ids: torch.Tensor, rows: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or not isinstance(rows, torch.Tensor):
        raise TypeError("ids and rows must be torch tensors")
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be a 1-D int64 tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    if rows.dim() != 2 or rows.dtype != torch.float32:
        raise ValueError(f"rows must be a 2-D float32 tensor [n, dim], got shape {tuple(rows.shape)} dtype {rows.dtype}")
    if rows.shape[0] != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} ids but {rows.shape[0]} rows")
    if rows.shape[1] < 1:
        raise ValueError("rows must have dim >= 1")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("ids must be sorted ascending and unique (sort them with their rows first)")
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("rows contain NaN or infinite values: refusing to freeze a broken embedding table")


def write_snapshot(path: PathLike, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``ids [n]`` (int64, sorted ascending, unique) and ``rows [n, dim]`` (float32) to
    ``path`` atomically. Bad input raises before anything is written."""
    ids = ids.detach().to("cpu").contiguous() if isinstance(ids, torch.Tensor) else ids
    rows = rows.detach().to("cpu").contiguous() if isinstance(rows, torch.Tensor) else rows
    _validate(ids, rows)
    header = _HEADER.pack(MAGIC, ids.shape[0], rows.shape[1], DTYPE_FLOAT32)
    id_bytes = ids.numpy().astype("<i8", copy=False).tobytes()
    row_bytes = rows.numpy().astype("<f4", copy=False).tobytes()
    crc = zlib.crc32(row_bytes, zlib.crc32(id_bytes, zlib.crc32(header)))

    write_atomic(path, (header, id_bytes, row_bytes, _CRC.pack(crc)))


def read_snapshot(path: PathLike) -> Snapshot:
    """Read and verify a snapshot; raises :class:`SnapshotError` naming the file and the fault."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"snapshot {path} does not exist: write one with `gauss export ... --snapshot {path}`") \
            from None
    if len(data) < _HEADER.size + _CRC.size:
        raise SnapshotError(f"{path}: {len(data)} bytes is too short for a snapshot (header alone is "
                            f"{_HEADER.size + _CRC.size} bytes)")
    magic, n_rows, dim, code = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SnapshotError(f"{path}: not a gauss snapshot (magic {magic!r}, expected {MAGIC!r})")
    if code != DTYPE_FLOAT32:
        raise SnapshotError(f"{path}: unknown dtype code {code} (only 0 = float32 is defined)")
    if dim < 1:
        raise SnapshotError(f"{path}: dim is {dim}")
    expected = _HEADER.size + 8 * n_rows + 4 * n_rows * dim + _CRC.size
    if len(data) != expected:
        raise SnapshotError(f"{path}: {len(data)} bytes but the header ({n_rows} rows of dim {dim}) says "
                            f"{expected}: the file is truncated or was not written by write_snapshot")
    (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    actual = zlib.crc32(memoryview(data)[:len(data) - _CRC.size])
    if stored != actual:
        raise SnapshotError(f"{path}: CRC-32 mismatch (stored {stored:08x}, computed {actual:08x}): the file is "
                            "corrupted; export the snapshot again")
    ids = np.frombuffer(data, dtype="<i8", count=n_rows, offset=_HEADER.size)
    rows = np.frombuffer(data, dtype="<f4", count=n_rows * dim, offset=_HEADER.size + 8 * n_rows)
    ids_t = torch.from_numpy(ids.copy())
    if n_rows > 1 and not bool((ids_t[1:] > ids_t[:-1]).all()):
        raise SnapshotError(f"{path}: ids are not sorted ascending and unique")
    return Snapshot(ids_t, torch.from_numpy(rows.copy()).reshape(n_rows, dim), source=f"snapshot {path}")

