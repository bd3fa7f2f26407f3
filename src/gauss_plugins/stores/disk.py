"""The on-disk tier of TierPS: a crash-consistent, append-only segment log of packed rows.

Design
------
The directory holds segment files ``seg-00000001.log, seg-00000002.log, ...``. A segment is
a sequence of *records*; every mutation is one record appended at the end of the newest
(active) segment; nothing is ever overwritten in place::

    header (32 bytes, little-endian)
        u32 magic 0x47504c52 ("RLPG")   u32 crc32 of everything after this field
        u8  kind (1 PUT, 2 DEL, 3 RESET)   3 pad   u32 count   u64 version   u64 payload bytes
    payload
        PUT:   count int64 ids, then count rows of ``width`` float32
        DEL:   count int64 ids
        RESET: nothing -- "forget every segment before this one" (written by compaction)

Every record size is a multiple of 4, so each row starts 4-byte aligned and is read straight
out of a read-only memory map of its segment.

*Acknowledgement.* With ``sync=True`` (default) a write returns only after ``fsync`` of the
segment: a returned ``put``/``delete`` is persisted. With ``sync=False`` writes are buffered
by the OS and :meth:`DiskTier.sync` is the acknowledgement point (TierPS calls it at the end
of ``flush()``). A new segment is created only after the previous one was fsynced, and the
directory is fsynced after every create, rename and unlink, so the set of files is durable too.

*Recovery* (on open) replays the segments in order, starting at the newest one that begins
with a (CRC-checked) RESET. A crash can tear only the last record of the active (newest)
segment: a new segment is created only after the previous one was fsynced, and acknowledged
records were fsynced before the acknowledgement. So a bad record (wrong magic, length past
the end, CRC mismatch) with nothing valid after it, at the end of the active segment, is a torn
write: it is cut and appends start clean. Anything else -- a bad record in a sealed segment,
or one in the active segment followed by a valid record -- is damage on disk (bit rot, a bad
copy) that would silently delete acknowledged rows if cut: opening raises
:class:`CorruptLogError` naming the file and byte offset, changes nothing, and points to
``gauss store repair PATH`` (:func:`repair_log`), which reports exactly which records it
drops. Thus a kill -9 at any moment leaves a store that opens and holds every acknowledged
row, each with a value that was actually written (the newest acknowledged one, or a newer one
whose write completed before the kill). (With ``sync=False`` a power loss, not a kill, may
leave a hole in the unacknowledged tail followed by intact records; that too is refused rather
than guessed at, and ``repair`` drops the hole.)

*Compaction.* Overwritten and deleted rows are dead bytes. When they exceed
``compact_ratio`` of the log (and the log is larger than ``min_compact_bytes``), the live
rows are rewritten into a temporary file that starts with a RESET record, fsynced, renamed
to the next segment number (atomic), the directory fsynced, and only then the old segments
unlinked. A crash before the rename leaves a ``.tmp`` file that recovery deletes; a crash
after it leaves old segments that recovery skips (they precede a RESET) and deletes.

*Index.* In memory, a hash index of the dynamic table (``table_backend`` from the registry:
the compiled CPU one when built, else :class:`~gauss_plugins.embedding.index.TorchHashIndex`)
maps each id to a slot whose location word is ``segment << 40 | byte offset of the row``;
it is rebuilt by the replay. A directory lock (``flock``) keeps a second process out.
"""
from __future__ import annotations

import fcntl
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from gauss_plugins.embedding.index import TorchHashIndex
from gauss_plugins.stores.base import as_ids

__all__ = ["DiskTier", "CorruptLogError", "DroppedRange", "make_index", "repair_log"]

MAGIC = 0x47504C52
_HEADER = struct.Struct("<IIB3xIQQ")
HEADER_BYTES = _HEADER.size  # 32
PUT, DEL, RESET = 1, 2, 3
_SEG_RE = re.compile(r"^seg-(\d{8})\.log$")
_OFFSET_BITS = 40


def make_index(backend: str, capacity: int):
    """A CPU hash index of the dynamic table from the ``table_backend`` registry: ``"auto"``
    picks the best available one (e.g. the compiled ``cpu_ext``), ``"torch"`` the reference."""
    if backend == "torch":
        return TorchHashIndex(capacity)
    from gauss_plugins.plugins import get_registry

    registry = get_registry()
    if backend == "auto" and not registry.names("table_backend"):
        return TorchHashIndex(capacity)  # a build without the embedding plugin: the reference
    comp = registry.select("table_backend", backend, device=torch.device("cpu"))
    return comp.create(capacity, torch.device("cpu"))


class CorruptLogError(RuntimeError):
    """The log cannot be replayed as it is: damage that is not a torn tail of the active
    segment, or a record of the wrong row width. ``path`` and ``offset`` locate the record."""

    def __init__(self, message: str, path: str = "", offset: int = -1):
        super().__init__(message)
        self.path = path
        self.offset = offset


def _record_at(data: np.ndarray, pos: int) -> Tuple[Optional[Tuple[int, int, int, int]], str]:
    """``((kind, count, version, end), "")`` for a valid record at byte ``pos`` of a segment's
    bytes, else ``(None, why)``."""
    size = data.size
    if size - pos < HEADER_BYTES:
        return None, f"{size - pos} bytes left, less than a record header"
    magic, crc, kind, count, version, payload = _HEADER.unpack(data[pos:pos + HEADER_BYTES].tobytes())
    if magic != MAGIC:
        return None, "bad magic"
    if kind not in (PUT, DEL, RESET):
        return None, f"unknown record kind {kind}"
    end = pos + HEADER_BYTES + payload
    if end > size:
        return None, f"record of {payload} payload bytes runs past the end of the file"
    if zlib.crc32(memoryview(data[pos + 8:end])) != crc:
        return None, "CRC mismatch"
    return (kind, count, version, end), ""


def _next_record(data: np.ndarray, start: int) -> int:
    """The first byte offset >= ``start`` where a valid record begins (records are 4-byte
    aligned), or ``data.size`` if none does."""
    start += -start % 4
    words = data[: data.size - data.size % 4].view(np.uint32)
    for w in np.flatnonzero(words[start // 4:] == MAGIC):
        pos = start + 4 * int(w)
        if _record_at(data, pos)[0] is not None:
            return pos
    return data.size


def _segment_numbers(path: str) -> List[int]:
    return sorted(int(m.group(1)) for m in map(_SEG_RE.match, os.listdir(path)) if m)


def _starts_with_reset(seg_path: str) -> bool:
    """Whether a segment begins with a valid RESET record (CRC-checked: a damaged header must
    never make recovery skip, let alone delete, the segments before it)."""
    with open(seg_path, "rb") as f:
        head = np.frombuffer(f.read(HEADER_BYTES), dtype=np.uint8)
    rec, _ = _record_at(head, 0)
    return rec is not None and rec[0] == RESET


def _live_segments(path: str) -> Tuple[List[int], List[int]]:
    """``(superseded, live)`` segment numbers: replay starts at the newest RESET segment."""
    segs = _segment_numbers(path)
    start = 0
    for i, no in enumerate(segs):
        if _starts_with_reset(os.path.join(path, f"seg-{no:08d}.log")):
            start = i
    return segs[:start], segs[start:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buf: memoryview) -> None:
    while len(buf):
        n = os.write(fd, buf)
        buf = buf[n:]


class DiskTier:
    """Rows of ``width`` float32 by int64 id in a segment log under ``path`` (see module doc).

    Not thread-safe: the owner (TierPS) serialises calls.
    """

    def __init__(self, path: str, width: int, *, sync: bool = True, segment_bytes: int = 64 << 20,
                 compact_ratio: float = 0.5, min_compact_bytes: int = 16 << 20, initial_capacity: int = 1 << 16,
                 index_backend: str = "auto"):
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if not 0.0 < compact_ratio < 1.0:
            raise ValueError(f"compact_ratio must be in (0, 1), got {compact_ratio}")
        self.path = os.path.abspath(path)
        self.width = width
        self.row_bytes = 4 * width
        self.sync_writes = sync
        self.segment_bytes = int(segment_bytes)
        self.compact_ratio = compact_ratio
        self.min_compact_bytes = int(min_compact_bytes)
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.path} is open in another process (its LOCK is held)") from None
        self._index = make_index(index_backend, max(initial_capacity, 16))
        self._loc = torch.full((self._index.capacity,), -1, dtype=torch.int64)
        self._maps: Dict[int, np.ndarray] = {}
        self._sizes: Dict[int, int] = {}  # segment -> bytes
        self._live_bytes = 0
        self.max_version = 0
        self.compactions = 0
        self.torn_bytes_dropped = 0
        self._fd: Optional[int] = None
        try:
            self._recover()
        except BaseException:
            os.close(self._lock_fd)  # release the directory for `gauss store repair`
            self._lock_fd = None
            raise

    # ------------------------------------------------------------------ files
    def _seg_path(self, no: int) -> str:
        return os.path.join(self.path, f"seg-{no:08d}.log")

    def _segments(self) -> List[int]:
        return _segment_numbers(self.path)

    def _open_active(self, no: int) -> None:
        fresh = not os.path.exists(self._seg_path(no))
        self._fd = os.open(self._seg_path(no), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._active = no
        self._sizes.setdefault(no, os.fstat(self._fd).st_size)
        if fresh:
            _fsync_dir(self.path)

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        superseded, segs = _live_segments(self.path)
        # Replay (which raises on damage) before deleting anything, so a refused open
        # leaves the directory exactly as it found it.
        for i, no in enumerate(segs):
            self._replay(no, active=i == len(segs) - 1)
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):  # an interrupted compaction's output: never renamed, never used
                os.unlink(os.path.join(self.path, name))
        for no in superseded:  # a completed compaction replaced them; its cleanup was cut short
            os.unlink(self._seg_path(no))
        if superseded:
            _fsync_dir(self.path)
        self._open_active(segs[-1] if segs else 1)

    def _replay(self, no: int, active: bool) -> None:
        path = self._seg_path(no)
        data = np.fromfile(path, dtype=np.uint8)
        size = data.size
        pos = 0
        why = ""
        while pos < size:
            rec, why = _record_at(data, pos)
            if rec is None:
                break
            kind, count, version, end = rec
            payload = end - pos - HEADER_BYTES
            expect = {PUT: count * (8 + self.row_bytes), DEL: count * 8, RESET: 0}[kind]
            if payload != expect:
                raise CorruptLogError(f"{path}: record at {pos} has {payload} payload bytes, expected {expect} "
                                      f"(row width {self.width}); was this directory written with another dim?",
                                      path, pos)
            body = pos + HEADER_BYTES
            ids = torch.from_numpy(data[body:body + 8 * count].view(np.int64).copy()) if count else None
            if kind == PUT and count:
                self._index_put(ids, no, body + 8 * count)
            elif kind == DEL and count:
                self._index_del(ids)
            self.max_version = max(self.max_version, version)
            pos = end
        if pos < size:
            resume = _next_record(data, pos + 1)
            if not active or resume < size:
                where = "sealed segment" if not active else "active segment, followed by valid records at byte " \
                    f"{resume}"
                raise CorruptLogError(
                    f"{path}: damaged record at byte offset {pos} ({why}; {where}). A crash can only tear the end "
                    f"of the newest segment, so this is damage on disk, and cutting here would lose acknowledged "
                    f"rows: nothing was changed. See what would be dropped with `gauss store repair {self.path} "
                    f"--dry-run`, then drop it with `gauss store repair {self.path}` (or restore the directory "
                    f"from a backup).", path, pos)
            # The torn tail of a crashed write: drop it so appends start clean.
            self.torn_bytes_dropped += size - pos
            with open(path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
        self._sizes[no] = pos

    # ------------------------------------------------------------------ index
    def _index_put(self, ids: torch.Tensor, seg: int, rows_at: int) -> None:
        """Point ``ids`` (distinct) at consecutive rows starting at byte ``rows_at`` of ``seg``."""
        n = ids.numel()
        self._ensure_capacity(len(self._index) + n)
        slots, is_new = self._index.insert(ids)
        # An overwritten row's old copy becomes dead bytes; a new id adds live bytes.
        self._live_bytes += int(is_new.sum()) * (self.row_bytes + 8)
        self._loc[slots] = (seg << _OFFSET_BITS) + rows_at + torch.arange(n, dtype=torch.int64) * self.row_bytes

    def _index_del(self, ids: torch.Tensor) -> int:
        slots = self._index.remove(ids)
        gone = int((slots >= 0).sum())
        self._live_bytes -= gone * (self.row_bytes + 8)
        return gone

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._index.capacity:
            return
        cap = self._index.capacity
        while cap < needed:
            cap *= 2
        self._index.rehash(cap)
        loc = torch.full((cap,), -1, dtype=torch.int64)
        loc[: self._loc.numel()] = self._loc
        self._loc = loc

    # ------------------------------------------------------------------ writes
    def _append(self, kind: int, count: int, version: int, payload: List[bytes]) -> int:
        """Append one record; returns the byte offset of its payload in the active segment."""
        body = b"".join(payload)
        head_tail = _HEADER.pack(MAGIC, 0, kind, count, version, len(body))[8:]
        crc = zlib.crc32(body, zlib.crc32(head_tail))
        record = struct.pack("<II", MAGIC, crc) + head_tail + body
        pos = self._sizes[self._active]
        _write_all(self._fd, memoryview(record))
        self._sizes[self._active] = pos + len(record)
        if self.sync_writes:
            os.fsync(self._fd)
        self.max_version = max(self.max_version, version)
        return pos + HEADER_BYTES

    def _maybe_rotate(self) -> None:
        if self._sizes[self._active] < self.segment_bytes:
            return
        os.fsync(self._fd)  # the sealed segment is complete on disk before the next one exists
        os.close(self._fd)
        self._open_active(self._active + 1)

    def put(self, ids: torch.Tensor, rows: torch.Tensor, version: int = 0) -> None:
        """Write rows (``ids`` distinct int64, ``rows`` ``[n, width]`` float32)."""
        ids = as_ids(ids)
        if rows.shape != (ids.numel(), self.width):
            raise ValueError(f"rows must have shape [{ids.numel()}, {self.width}], got {tuple(rows.shape)}")
        if ids.numel() == 0:
            return
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("DiskTier.put needs distinct ids")
        rows = rows.detach().to(torch.float32).contiguous()
        at = self._append(PUT, ids.numel(), version, [ids.numpy().tobytes(), rows.numpy().tobytes()])
        self._index_put(ids, self._active, at + 8 * ids.numel())
        self._maybe_rotate()
        self._maybe_compact()

    def delete(self, ids: torch.Tensor, version: int = 0) -> int:
        """Delete the ids held (others are ignored); returns how many were held."""
        ids = as_ids(ids)
        held = ids[self._index.find(ids) >= 0] if ids.numel() else ids
        held = torch.unique(held)
        if held.numel() == 0:
            return 0
        self._append(DEL, held.numel(), version, [held.numpy().tobytes()])
        gone = self._index_del(held)
        self._maybe_rotate()
        self._maybe_compact()
        return gone

    def sync(self) -> None:
        """Make every write so far durable (the acknowledgement point when ``sync=False``)."""
        os.fsync(self._fd)

    # ------------------------------------------------------------------ reads
    def _map(self, seg: int, need: int) -> np.ndarray:
        m = self._maps.get(seg)
        if m is None or m.size < need:
            m = np.memmap(self._seg_path(seg), dtype=np.uint8, mode="r")
            self._maps[seg] = m
        return m

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        return self._index.find(as_ids(ids)) >= 0

    def get(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows [n, width], found [n])``; rows not found are zero."""
        ids = as_ids(ids)
        n = ids.numel()
        out = torch.zeros(n, self.width)
        if n == 0:
            return out, torch.zeros(0, dtype=torch.bool)
        slots = self._index.find(ids)
        found = slots >= 0
        if not bool(found.any()):
            return out, found
        loc = self._loc.index_select(0, slots[found])
        at = torch.nonzero(found).squeeze(1)
        seg = loc >> _OFFSET_BITS
        off = loc & ((1 << _OFFSET_BITS) - 1)
        for s in torch.unique(seg).tolist():
            pick = seg == s
            o = off[pick].numpy()
            m = self._map(s, int(o.max()) + self.row_bytes)
            f32 = m[: m.size - m.size % 4].view(np.float32)
            # Overlapping windows of `width` floats starting at every 4-byte position: a row
            # starting at byte o is window o // 4, so one fancy index gathers the batch.
            windows = np.lib.stride_tricks.as_strided(f32, shape=(f32.size - self.width + 1, self.width),
                                                      strides=(4, 4), writeable=False)
            out[at[pick]] = torch.from_numpy(windows[o // 4])
        return out, found

    def ids(self) -> torch.Tensor:
        keys, _ = self._index.keys_and_rows()
        return keys

    def items(self, batch_size: int = 65536) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        keys = torch.sort(self.ids()).values
        for s in range(0, keys.numel(), batch_size):
            k = keys[s:s + batch_size]
            yield k, self.get(k)[0]

    def __len__(self) -> int:
        return len(self._index)

    @property
    def log_bytes(self) -> int:
        return sum(self._sizes.values())

    # ------------------------------------------------------------------ compaction
    def _maybe_compact(self) -> None:
        total = self.log_bytes
        if total >= self.min_compact_bytes and total - self._live_bytes > self.compact_ratio * total:
            self.compact()

    def compact(self, batch_size: int = 65536) -> None:
        """Rewrite the live rows into one fresh segment and drop the old ones (see module doc)."""
        os.fsync(self._fd)
        old = sorted(self._sizes)
        no = old[-1] + 1
        final = self._seg_path(no)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        placed: List[Tuple[torch.Tensor, int]] = []
        try:
            pos = 0
            for kind, ids, rows in [(RESET, None, None)] + [(PUT, k, r) for k, r in self.items(batch_size)]:
                payload = [] if ids is None else [ids.numpy().tobytes(), rows.numpy().tobytes()]
                count = 0 if ids is None else ids.numel()
                body = b"".join(payload)
                head_tail = _HEADER.pack(MAGIC, 0, kind, count, self.max_version, len(body))[8:]
                record = struct.pack("<II", MAGIC, zlib.crc32(body, zlib.crc32(head_tail))) + head_tail + body
                _write_all(fd, memoryview(record))
                if ids is not None:
                    placed.append((ids, pos + HEADER_BYTES + 8 * count))
                pos += len(record)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, final)
        _fsync_dir(self.path)  # from here on, recovery starts at the new segment
        os.close(self._fd)
        self._fd = None
        self._maps.clear()
        for seg in old:
            os.unlink(self._seg_path(seg))
        _fsync_dir(self.path)
        self._sizes = {no: pos}
        for ids, at in placed:
            slots = self._index.find(ids)
            self._loc[slots] = (no << _OFFSET_BITS) + at + torch.arange(ids.numel(), dtype=torch.int64) * self.row_bytes
        self._live_bytes = len(self._index) * (self.row_bytes + 8)
        self._open_active(no)
        self.compactions += 1

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._maps.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


# ---------------------------------------------------------------------- repair
@dataclass
class DroppedRange:
    """Bytes ``[offset, offset + length)`` of ``segment`` that repair drops (or would drop).

    ``records`` describes what the damaged bytes held, read from the first record header
    when that header itself is intact (``kind``, ``count``, ``version`` and the ids as stored:
    the record failed its CRC, so the ids may be damaged too); it is empty when the header is
    unreadable. ``torn_tail`` marks the end of the active segment, which opening would cut anyway.
    """

    segment: str
    offset: int
    length: int
    reason: str
    torn_tail: bool
    records: List[dict] = field(default_factory=list)

    def describe(self) -> str:
        what = "torn tail of the active segment" if self.torn_tail else "damaged"
        line = f"{self.segment}: bytes {self.offset}..{self.offset + self.length} ({self.length} bytes, {what}: {self.reason})"
        for r in self.records:
            ids = r["ids"]
            shown = ", ".join(map(str, ids[:20])) + (f", ... ({len(ids)} ids)" if len(ids) > 20 else "")
            line += f"\n    {r['kind']} of {r['count']} rows, version {r['version']}; ids as stored: [{shown}]"
        if not self.records:
            line += "\n    record header unreadable: the ids it held are unknown"
        return line


def _describe_damage(data: np.ndarray, pos: int, stop: int) -> List[dict]:
    """The record header at ``pos`` when it is intact and its payload lies inside ``[pos, stop)``."""
    if stop - pos < HEADER_BYTES:
        return []
    magic, _, kind, count, version, payload = _HEADER.unpack(data[pos:pos + HEADER_BYTES].tobytes())
    if magic != MAGIC or kind not in (PUT, DEL, RESET) or pos + HEADER_BYTES + payload > stop \
            or (kind != RESET and 8 * count > payload):
        return []
    body = pos + HEADER_BYTES
    ids = data[body:body + 8 * count].view(np.int64).tolist() if kind != RESET else []
    return [{"kind": {PUT: "PUT", DEL: "DELETE", RESET: "RESET"}[kind], "count": count, "version": version, "ids": ids}]


def repair_log(path: str, dry_run: bool = False) -> List[DroppedRange]:
    """Drop the damaged records of the segment log under ``path`` and report what was dropped.

    Every live segment is scanned; each run of bytes that is not a valid record, up to the next
    valid record, is one :class:`DroppedRange`. Unless ``dry_run``, each damaged segment is
    rewritten without those bytes (to a ``.tmp`` file, fsynced, renamed over the segment, the
    directory fsynced: a crash mid-repair leaves the original). Dropping a PUT can bring back
    the previous value of its ids; dropping a DELETE brings its ids back: the report lists them.
    Takes the directory lock, so the store must be closed.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path) or not _segment_numbers(path):
        raise FileNotFoundError(f"{path} holds no segment log (seg-*.log files): is this a TierPS / DiskTier directory?")
    lock_fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{path} is open in another process (its LOCK is held): close the store first") from None
        _, segs = _live_segments(path)
        dropped: List[DroppedRange] = []
        for i, no in enumerate(segs):
            seg_path = os.path.join(path, f"seg-{no:08d}.log")
            data = np.fromfile(seg_path, dtype=np.uint8)
            keep: List[Tuple[int, int]] = []
            mine: List[DroppedRange] = []
            pos = start = 0
            while pos < data.size:
                rec, why = _record_at(data, pos)
                if rec is not None:
                    pos = rec[3]
                    continue
                keep.append((start, pos))
                stop = _next_record(data, pos + 1)
                mine.append(DroppedRange(seg_path, pos, stop - pos, why,
                                         torn_tail=i == len(segs) - 1 and stop == data.size,
                                         records=_describe_damage(data, pos, stop)))
                pos = start = stop
            keep.append((start, data.size))
            dropped += mine
            if mine and not dry_run:
                tmp = seg_path + ".tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    for a, b in keep:
                        _write_all(fd, memoryview(data[a:b]))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, seg_path)
                _fsync_dir(path)
        return dropped
    finally:
        os.close(lock_fd)
