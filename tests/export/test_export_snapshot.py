"""The .gsnp snapshot: the documented byte layout, round trip, verification, atomic writes,
and unknown ids named at lookup."""
from __future__ import annotations

import os
import struct
import zlib

import pytest
import torch

from gauss_plugins.export.snapshot import (MAGIC, SnapshotError, UnknownItemError, read_snapshot,
                                           write_snapshot)


def _rows(n=5, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([2, 7, 10, 2**40, 2**62][:n], dtype=torch.int64)
    return ids, torch.randn(n, dim, generator=g)


def test_layout_is_the_documented_bytes(tmp_path):
    ids, rows = _rows()
    path = tmp_path / "rows.gsnp"
    write_snapshot(path, ids, rows)
    data = path.read_bytes()
    body = MAGIC + struct.pack("<QII", 5, 3, 0) + struct.pack("<5q", *ids.tolist()) \
        + struct.pack(f"<{rows.numel()}f", *rows.reshape(-1).tolist())
    assert data == body + struct.pack("<I", zlib.crc32(body))


def test_round_trip_and_lookup(tmp_path):
    ids, rows = _rows()
    path = tmp_path / "rows.gsnp"
    write_snapshot(path, ids, rows)
    snap = read_snapshot(path)
    assert torch.equal(snap.ids, ids) and torch.equal(snap.rows, rows) and snap.dim == 3 and len(snap) == 5
    query = torch.tensor([[2**62, 2], [10, 10]])
    assert torch.equal(snap.lookup(query), rows[torch.tensor([[4, 0], [2, 2]])])


def test_unknown_id_is_named(tmp_path):
    ids, rows = _rows()
    write_snapshot(tmp_path / "rows.gsnp", ids, rows)
    snap = read_snapshot(tmp_path / "rows.gsnp")
    with pytest.raises(UnknownItemError, match="item id 8 is not in snapshot"):
        snap.lookup(torch.tensor([2, 8, 10]))
    with pytest.raises(UnknownItemError, match="item id 99"):
        snap.lookup(torch.tensor([99]))  # beyond the largest id
    with pytest.raises(TypeError, match="int64"):
        snap.lookup(torch.tensor([2], dtype=torch.int32))


@pytest.mark.parametrize("where", ["magic", "count", "id", "row", "crc"])
def test_corruption_is_refused(tmp_path, where):
    ids, rows = _rows()
    path = tmp_path / "rows.gsnp"
    write_snapshot(path, ids, rows)
    data = bytearray(path.read_bytes())
    offset = {"magic": 0, "count": 8, "id": 30, "row": 24 + 40 + 7, "crc": len(data) - 1}[where]
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=str(path)):
        read_snapshot(path)


def test_truncated_and_missing_files(tmp_path):
    ids, rows = _rows()
    path = tmp_path / "rows.gsnp"
    write_snapshot(path, ids, rows)
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(SnapshotError, match="truncated"):
        read_snapshot(path)
    path.write_bytes(b"GSNP")
    with pytest.raises(SnapshotError, match="too short"):
        read_snapshot(path)
    with pytest.raises(FileNotFoundError, match="gauss export"):
        read_snapshot(tmp_path / "absent.gsnp")


@pytest.mark.parametrize("bad", ["unsorted", "duplicate", "dtype", "rows_dtype", "count", "nan"])
def test_bad_input_writes_nothing(tmp_path, bad):
    ids, rows = _rows()
    path = tmp_path / "rows.gsnp"
    write_snapshot(path, ids, rows)
    before = path.read_bytes()
    if bad == "unsorted":
        ids = ids.flip(0)
    elif bad == "duplicate":
        ids = torch.tensor([2, 2, 10, 11, 12])
    elif bad == "dtype":
        ids = ids.to(torch.int32)
    elif bad == "rows_dtype":
        rows = rows.double()
    elif bad == "count":
        rows = rows[:4]
    else:
        rows[1, 1] = float("nan")
    with pytest.raises(ValueError):
        write_snapshot(path, ids, rows)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["rows.gsnp"]  # no temporary file left behind


def test_empty_snapshot(tmp_path):
    path = tmp_path / "empty.gsnp"
    write_snapshot(path, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    snap = read_snapshot(path)
    assert len(snap) == 0 and snap.dim == 4
    with pytest.raises(UnknownItemError, match="item id 3"):
        snap.lookup(torch.tensor([3]))
