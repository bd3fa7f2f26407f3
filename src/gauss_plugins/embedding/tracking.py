"""Incremental bookkeeping that keeps a sync pull O(changed rows) and an eviction round bounded.

Why: a dynamic table can hold tens of millions of rows, and both consumers of "which rows"
questions run while training waits (the syncer's pull holds the training lock; eviction runs
inside a training lookup). A full scan of the rows costs ~25 ms a million rows on one core,
so neither may look at every row.

* :class:`ChangeLog` -- the rows each mutation stamped, appended as they happen (the tensors
  the mutation already built: no copy). ``changed_since(v)`` reads only the chunks newer
  than ``v`` and keeps a row where the table's version stamp says its *latest* change is
  in that chunk (each row therefore survives once, without a sort). The log holds at most
  ``limit`` row entries; older chunks are dropped and a query older than what is kept
  falls back to a full scan (still exact, just O(table)).
* :func:`sampled_victims` -- approximate LRU/LFU/TTL victim selection: the victims come
  from the lowest ``~1/sample_factor`` quantile of the table's scores rather than being its
  exact bottom ``k``, at O(k) a round whatever the table size. Small tables
  (``live <= exact_below``) and rounds that would sample most of the table keep the exact
  selection. Two ways, neither with per-row state beyond what the policies already keep:

  - a sweep (the default with the C++ index and int32 scores): a threshold at the
    ``1/(2 * sample_factor)`` quantile, estimated from ``SWEEP_PROBE_ROWS`` random rows,
    then the rows at or under it in row order from a clock hand that resumes where the
    last round stopped. Why: at 10M rows a random sample of ``sample_factor * k`` rows is
    ~6.5k cache misses on the stamps plus 65k on a table-sized bitmap of the batch's
    (protected) rows; the sweep reads consecutive stamps (the hardware prefetcher streams
    them) and checks protection only over the rows it swept. Measured there, 6,554 victims
    a round: 0.6-1.0 ms against ~2.8 ms (CPU time, 2026-11-29). Rows at or under the threshold are ~1/16 of the table
    by construction, so a sweep looks at ~``2 * sample_factor * k`` rows; it gives up after
    ``SWEEP_SCAN_LIMIT`` times that and the round samples instead.
  - a random sample, as Redis does it (``sweep=False``, the torch backends, custom
    scores): score ``sample_factor * k`` rows drawn uniformly at random and evict the ``k``
    lowest. With the C++ index it is one compiled call: rows are drawn in aligned runs of
    8 (each row still equally likely; one cache line of stamps per run), and membership
    (protected rows, repeats) is one bit a row in a per-thread bitmap.
* :class:`VictimPreselector` -- (eviction option ``preselect``) the next round's sample
  drawn on a background thread while training runs, checked at the round (a candidate is
  kept iff its stamp and score are unchanged and the batch does not use it).
* :func:`distinct_rows` -- de-duplication in O(n) through a scratch array with a slot per
  row (no sort).
* A sync pull (``TableSource``) holds the training lock only to take references: the log's
  chunks and the tombstone chunks after its version, then the chunks written meanwhile.
  Everything per row (which rows, their ids and values, which evicted ids were live again
  at the pull's version, dropping rows written meanwhile) runs after the release, from the
  log's row chunks and the ids it keeps for insertions.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Deque, List, Optional, Tuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from gauss_plugins.embedding.table import DynamicEmbeddingTable

__all__ = ["ChangeLog", "ChangeSnapshot", "RowScratch", "distinct_rows", "lowest_k", "sampled_victims", "expire_window",
           "VictimPreselector"]

# Fewer, larger chunks keep the Python loop of a query short; past this many the oldest go.
_MAX_CHUNKS = 1 << 14
# The sweep's threshold comes from this many random rows (1,024 cache lines of stamps): its
# quantile is off by ~1% of the table (one standard error), which the sweep's margin of 2 on
# the quantile absorbs.
SWEEP_PROBE_ROWS = 8192
# A sweep looks at no more than this many times the rows it expects to (2 * sample_factor *
# k); a round that finds too few low rows within that falls back to the random sample.
SWEEP_SCAN_LIMIT = 8


class RowScratch:
    """Per-row scratch arrays reused between calls and never cleared as a whole.

    :meth:`get`: int32 slots, written before they are read (positions, :func:`distinct_rows`).
    :meth:`mark` / :meth:`marked`: one byte a row for membership; each call marks with a
    fresh value, so stale marks never match, and the bytes are cleared once every 255 calls
    (a quarter of the int32 array's size: random marks stay in cache better).
    """

    def __init__(self) -> None:
        self._buf: Optional[torch.Tensor] = None
        self._marks: Optional[torch.Tensor] = None
        self._token = 0

    def get(self, num_rows: int, device: torch.device) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < num_rows or self._buf.device != device:
            self._buf = torch.empty(num_rows, dtype=torch.int32, device=device)
        return self._buf

    def mark(self, rows: torch.Tensor, num_rows: int) -> int:
        """Mark ``rows`` (values in ``[0, num_rows)``); returns the token :meth:`marked` tests."""
        if self._marks is None or self._marks.numel() < num_rows or self._marks.device != rows.device:
            self._marks = torch.zeros(num_rows, dtype=torch.uint8, device=rows.device)
            self._token = 0
        self._token += 1
        if self._token > 255:  # every value used once: start over on cleared bytes
            self._marks.zero_()
            self._token = 1
        self._marks.index_fill_(0, rows, self._token)
        return self._token

    def marked(self, rows: torch.Tensor, token: int) -> torch.Tensor:
        return self._marks.index_select(0, rows) == token

    def nbytes(self) -> int:
        return sum(0 if b is None else b.numel() * b.element_size() for b in (self._buf, self._marks))


# index_select / index_copy_ / index_fill_ rather than ``t[rows]`` indexing: on CPU the
# advanced-indexing kernels are several times slower for these 1-D gathers and scatters.

def distinct_rows(rows: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``rows`` with each value once, in O(n): every position writes its index into the
    row's scratch slot; one write per row wins, and that position is kept. Leaves
    ``scratch[row]`` = the kept position for every row of the result."""
    if rows.numel() == 0:
        return rows
    pos = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device)
    scratch.index_copy_(0, rows, pos)
    return rows[scratch.index_select(0, rows) == pos]


class ChangeLog:
    """Row numbers stamped by each mutation, newest last: ``(version, rows, exact, distinct)``.

    ``exact``: every row of the chunk was stamped with exactly ``version`` (so a row whose
    stamp equals it had its latest change here). ``distinct``: no row repeats in the chunk.
    A chunk that is not exact is matched by "stamp newer than the query" and de-duplicated.
    The log is complete for queries at versions ``>= since``.
    """

    def __init__(self, limit: int, since: int = 0) -> None:
        self.limit = int(limit)
        self.since = int(since)
        # Bumped when rows are written with stamps from elsewhere (an incremental
        # checkpoint): a reader's stamp check cannot see such writes, so it redoes its work.
        self.generation = 0
        self._chunks: Deque[Tuple[int, torch.Tensor, bool, bool]] = deque()
        # The ids each insertion gave a row, beside its chunk: with the tombstones they say
        # which evicted ids were live again at a version, without the hash index (a reader
        # works out its deletions after releasing the lock).
        self._inserted: Deque[Tuple[int, torch.Tensor]] = deque()
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def nbytes(self) -> int:
        """Bytes the log keeps alive. A tensor filed under several versions counts once: the
        masked optimizer step of a small table files the same all-rows tensor every step."""
        held = {}
        for t in [c[1] for c in self._chunks] + [c[1] for c in self._inserted]:
            held[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return sum(held.values())

    def reset(self, since: int) -> None:
        """Forget everything; queries before ``since`` need a full scan from now on."""
        self._chunks.clear()
        self._inserted.clear()
        self._total = 0
        self.since = int(since)

    def add(self, rows: torch.Tensor, version: int, exact: bool = True, distinct: bool = True,
            ids: Optional[torch.Tensor] = None) -> None:
        """Record that ``rows`` were stamped with ``version`` (the tensor is kept, not copied:
        callers never modify it afterwards); ``ids``: the rows were just given to these ids
        (an insertion), kept likewise."""
        n = rows.numel()
        if n == 0:
            return
        if self._chunks and version < self._chunks[-1][0]:
            # Out of order: file it under the newest version and match by "stamp newer than
            # the query" instead, which stays correct for any later label.
            version, exact = self._chunks[-1][0], False
        self._chunks.append((int(version), rows.reshape(-1), bool(exact), bool(distinct)))
        if ids is not None:
            self._inserted.append((int(version), ids.reshape(-1)))
        self._total += n
        while len(self._chunks) > 1 and (self._total > self.limit or len(self._chunks) > _MAX_CHUNKS):
            old_version, old_rows, _, _ = self._chunks.popleft()
            self._total -= old_rows.numel()
            self.since = max(self.since, old_version)
        while self._inserted and self._inserted[0][0] <= self.since:
            self._inserted.popleft()

    def covers(self, version: int) -> bool:
        return int(version) >= self.since

    def inserted_after(self, version: int) -> List[Tuple[int, torch.Tensor]]:
        """``(version, ids)`` of the insertions after ``version``, newest first: O(chunks).
        Complete when :meth:`covers` ``(version)``."""
        out = []
        for chunk in reversed(self._inserted):
            if chunk[0] <= version:
                break
            out.append(chunk)
        return out

    def tail(self, version: int) -> List[Tuple[int, torch.Tensor, bool, bool]]:
        """The chunks newer than ``version``, newest first: O(chunks), no tensor work. A
        reader may take them under a lock and :meth:`filter` them after releasing it."""
        out = []
        for chunk in reversed(self._chunks):
            if chunk[0] <= version:
                break  # versions never decrease along the log
            out.append(chunk)
        return out

    def rows_since(self, version: int, stamps: torch.Tensor, stamp_base: int,
                   scratch: RowScratch) -> Tuple[torch.Tensor, int]:
        """(distinct rows whose stamp is newer than ``version``, log entries visited).
        Only valid when :meth:`covers` ``(version)`` and ``version >= stamp_base``."""
        return self.filter(self.tail(version), version, stamps, stamp_base, scratch)

    @staticmethod
    def filter(chunks: List[Tuple[int, torch.Tensor, bool, bool]], version: int, stamps: torch.Tensor,
               stamp_base: int, scratch: RowScratch) -> Tuple[torch.Tensor, int]:
        """The rows of ``chunks`` (from :meth:`tail`) whose latest change the stamps place
        after ``version``, each once, and the entries visited. Run without the table's lock
        it can only err by dropping rows written meanwhile (their stamps moved past their
        chunk) or keeping rows whose stamps moved on: a reader checks its rows afterwards."""
        rel = int(version) - stamp_base
        parts = []
        visited = 0
        dedupe = False
        last_version = None
        for chunk_version, rows, exact, distinct in chunks:
            visited += rows.numel()
            stamp = stamps.index_select(0, rows)
            if exact:
                keep = stamp == (chunk_version - stamp_base)
            else:
                keep = stamp.to(torch.int64) > rel
                dedupe = True
            parts.append(rows[keep])
            dedupe = dedupe or not distinct or chunk_version == last_version
            last_version = chunk_version
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=stamps.device), 0
        rows = parts[0] if len(parts) == 1 else torch.cat(parts)
        if dedupe:
            rows = distinct_rows(rows, scratch.get(stamps.numel(), stamps.device))
        return rows, visited


@dataclass
class ChangeSnapshot:
    """The change-log chunks after ``version`` as a table's ``change_snapshot`` took them at
    ``now`` (or, when the log does not reach back, the ``resolved`` ids and rows)."""

    version: int
    now: int
    stamp_base: int
    default_row: int
    chunks: List[Tuple[int, torch.Tensor, bool, bool]]
    resolved: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    visited: int = 0
    log: Optional["ChangeLog"] = None   # the table's log then, and its generation:
    generation: int = 0                 # a checkpoint load since makes the snapshot stale
    # With ``deletions``: the tombstone chunks and insertions after ``version`` (resolved
    # into ids later), or the ``deleted`` ids themselves when the log does not reach back.
    tombstones: Optional[List[Tuple[int, torch.Tensor]]] = None
    inserted: Optional[List[Tuple[int, torch.Tensor]]] = None
    deleted: Optional[torch.Tensor] = None


def lowest_k(ids: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids (ascending) of the ``k`` lowest scores, ties broken by the smaller id."""
    if k <= 0 or ids.numel() == 0:
        return ids[:0]
    if k >= ids.numel():
        return ids.sort().values
    scores = scores.to(torch.float64) if scores.is_floating_point() else scores.to(torch.int64)
    # Everything below the k-th score goes; among the rows tied at it, the smallest ids.
    threshold = scores.kthvalue(k).values
    below = scores < threshold
    tied = ids[scores == threshold]
    m = k - int(below.sum())
    if m < tied.numel():
        tied = tied[tied <= tied.kthvalue(m).values]
    return torch.cat([ids[below], tied]).sort().values


def _unprotected(rows: torch.Tensor, protect: Optional[torch.Tensor], scratch: RowScratch,
                 num_rows: int) -> Optional[torch.Tensor]:
    """bool per row of ``rows``: not in ``protect`` (None when nothing is protected)."""
    if protect is None or protect.numel() == 0:
        return None
    return ~scratch.marked(rows, scratch.mark(protect, num_rows))


def sampled_victims(table: "DynamicEmbeddingTable", k: int, protect: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Ids (ascending) of ``k`` victims from the lowest ~1/sample_factor of the scores, or
    None when the exact selection should run instead (small table, a round that would
    sample most of it, or too few live unprotected rows in the sample). ``protect``: rows
    that must stay (entries < 0 are ignored).

    With a backend that offers ``sweep_victims`` / ``sample_victims`` (the C++ index) and a
    policy whose score is an int32 array, the round is a compiled sweep (policy option
    ``sweep``, the default) and, if that falls short or is off, one compiled sampling call
    (its own random stream, ties by row); otherwise the torch steps below: the lowest-scored
    of ``sample_factor * k`` random rows.

    Every step is a gather or a filter over the sample (no sort of it): rows are drawn with
    replacement and the rare repeats are dropped among the chosen ones; ties in score are
    broken arbitrarily (but deterministically), not by id as the exact selection does."""
    policy = table.eviction
    if not _round_is_sampled(table, k):
        return None
    capacity = table.capacity
    factor = int(policy.sample_factor)
    m = k * factor
    array = policy.score_array()
    compiled = array is not None and array.dtype == torch.int32
    guard = protect if protect is not None else torch.empty(0, dtype=torch.int64, device=table.device)
    scores = None if array is table._row_stamp else array
    sweep = getattr(table.index.fused, "sweep_victims", None)
    if compiled and sweep is not None and policy.sweep:
        # Rows at or under the 1/(2 * factor) quantile, in row order from where the last
        # round stopped: a margin of 2 on the quantile absorbs the probe's error, so the
        # victims still lie in the lowest ~1/factor (see the module docstring).
        ids, _ = sweep(table._row_stamp, scores, table._row_ids, guard, table._eviction_stream(), table._sweep_hand(),
                       capacity, k, SWEEP_PROBE_ROWS, 2 * factor, SWEEP_SCAN_LIMIT * 2 * factor * k)
        if ids.numel() == k:
            return ids
        table.sweep_fallbacks += 1  # too few low rows within the scan limit: sample this round
    fused = getattr(table.index.fused, "sample_victims", None)
    if compiled and fused is not None:
        # One compiled pass: draw, filter (keyless, protected, repeated), score, select.
        ids, _ = fused(table._row_stamp, scores, table._row_ids, guard, table._eviction_stream(), capacity, k, m)
        return ids if ids.numel() == k else None
    if protect is not None:
        protect = protect[protect >= 0]
    rows = torch.randint(0, capacity, (m,), generator=table._eviction_rng(), device=table.device, dtype=torch.int64)
    stamps = table._row_stamp.index_select(0, rows)
    keep = stamps >= 0  # rows with a key
    free = _unprotected(rows, protect, table._scratch, capacity + 1)
    if free is not None:
        keep &= free
    rows = rows[keep]
    if rows.numel() < k:
        return None
    if array is table._row_stamp:
        scores = stamps[keep]  # LRU: the stamps just read are the scores
    elif array is not None:
        scores = array.index_select(0, rows)
    else:
        scores = policy.scores(table._row_ids.index_select(0, rows), rows, table._clock(), table)
    scores = scores.to(torch.float64) if scores.is_floating_point() else scores.to(torch.int64)
    # Extra picks cover the repeats a sample drawn with replacement may hold (~m/capacity).
    want = min(rows.numel(), k + (k * m) // capacity + 8)
    chosen = rows.index_select(0, torch.topk(scores, want, largest=False, sorted=True).indices)
    # A repeated row has one score, so any copy may stay; the order (by score) is kept.
    chosen = distinct_rows(chosen, table._scratch.get(capacity + 1, table.device))[:k]
    if chosen.numel() < k:
        return None
    return table._row_ids.index_select(0, chosen).sort().values


def _round_is_sampled(table: "DynamicEmbeddingTable", k: int) -> bool:
    """Whether a round of ``k`` victims samples (as :func:`sampled_victims` does) rather than
    selecting exactly: a table above ``exact_below`` live rows that the sample would not cover."""
    policy = table.eviction
    factor = int(policy.sample_factor)
    live = len(table)
    return not (factor <= 0 or live <= policy.exact_below or k * factor >= live)


def _preselect_backend(table: "DynamicEmbeddingTable", k: int):
    """(fused ops, the policy's int32 score array) when a round of ``k`` victims may use
    pre-selected candidates: the policy asks for it, the round would be sampled (as in
    :func:`sampled_victims`) and the index has the compiled ops; else None."""
    policy = table.eviction
    if policy is None or not getattr(policy, "preselect", False) or k <= 0 or not _round_is_sampled(table, k):
        return None
    fused = table.index.fused
    array = policy.score_array()
    if getattr(fused, "sample_candidates", None) is None or array is None or array.dtype != torch.int32:
        return None
    return fused, array


_worker_lock = threading.Lock()
_worker: Optional[Tuple[int, ThreadPoolExecutor]] = None  # (pid, executor): a forked child makes its own


def _background_worker() -> ThreadPoolExecutor:
    """The one thread (per process, shared by all tables) that draws pre-selections. Its
    jobs take milliseconds; ``concurrent.futures`` joins it at interpreter exit."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker[0] != os.getpid():
            _worker = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="gauss-evict-preselect"))
        return _worker[1]


def _draw_candidates(sample, stamp, scores, row_ids, stream, limit: int, k: int, m: int):
    c0 = time.thread_time()
    out = sample(stamp, scores, row_ids, stream, limit, k, m)
    return out, time.thread_time() - c0


class VictimPreselector:
    """The next eviction round's sample, drawn on a background thread while training runs
    (eviction option ``preselect``), and checked at the round that uses it.

    Why: at 10M rows a sampled round is memory-latency bound (random reads of stamps over
    the table) and runs inside a training step; drawn beforehand, the step pays only the
    check and the removal. After each round, :meth:`prepare` starts the next round's sample
    (``sample_factor * k`` rows, as :func:`sampled_victims` draws, nothing protected, a
    random stream of its own) keeping its ``k + k/4 + 64`` lowest candidates in (score,
    row) order. :meth:`take` (the next round) waits for it if it still runs (at most what a
    synchronous selection costs) and keeps, in that order, the first ``k`` candidates whose
    stamp (and score) are what the sample read and that the batch needing the room does not
    use. Too few left, or a table that changed shape meanwhile: the caller selects
    synchronously, exactly as without this option.

    Locking (none is taken, by construction):

    * The training thread is the table's only writer, as before (callers serialise table
      operations, e.g. under the syncer's lock). Only it calls :meth:`prepare` and
      :meth:`take`, so a table has at most one job in flight.
    * The job only reads the stamp and score arrays (relaxed atomic loads in C++, with the
      GIL released) and writes only its own stream tensor and its results.
    * A stale read cannot evict a row on old evidence: a row's stamp moves to a newer
      version whenever it is written, removed (-1) or inserted again, so a candidate whose
      stamp and score still match was not touched since the sample read them.
    * Arrays replaced meanwhile (growth, stamp rebase, checkpoint load): the job keeps the
      old tensors alive, and :meth:`take` drops a sample drawn from arrays that are no
      longer the table's or under another stamp base.

    Stopping: the worker thread is shared and joined by ``concurrent.futures`` at exit;
    :meth:`close` waits for this table's job. Copies and pickles start empty.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._stream = torch.tensor([(seed ^ 0x5E1EC7) << 32], dtype=torch.int64)
        self._pending = None  # (future, stamp tensor, score tensor, stamp base)
        self.rounds_preselected = 0   # rounds served by a pre-selection
        self.rounds_synchronous = 0   # rounds that had one but fell back to a synchronous selection
        self.rounds_waited = 0        # rounds whose sample was still being drawn (the round waited for it)
        self.background_cpu_ms: Deque[float] = deque(maxlen=4096)  # CPU time of each job (its own thread)

    def __reduce__(self):
        return VictimPreselector, (self._seed,)

    def prepare(self, table: "DynamicEmbeddingTable", k: int) -> None:
        """Start drawing the candidates for a next round of ``k`` victims (if it may use them)."""
        self.close()
        backend = _preselect_backend(table, k)
        if backend is None:
            return
        fused, array = backend
        stamp = table._row_stamp
        scores = None if array is stamp else array
        k_pool = k + k // 4 + 64
        future = _background_worker().submit(_draw_candidates, fused.sample_candidates, stamp, scores,
                                             table._row_ids, self._stream, table.capacity, k_pool,
                                             k * int(table.eviction.sample_factor))
        self._pending = (future, stamp, array, table._stamp_base)

    def take(self, table: "DynamicEmbeddingTable", k: int, protect: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Ids (ascending) of ``k`` victims from the pending sample, none of them in
        ``protect`` (rows; entries < 0 ignored); None when there is none or too few of its
        candidates are still valid (the caller then selects synchronously)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        future, stamp, array, base = pending
        self.rounds_waited += not future.done()
        (rows, stamps, scores, by_key), cpu_s = future.result()  # a failed job is a bug: raise it here
        self.background_cpu_ms.append(cpu_s * 1e3)
        backend = _preselect_backend(table, k)
        if (backend is None or stamp is not table._row_stamp or backend[1] is not array or base != table._stamp_base
                or rows.numel() < k):
            self.rounds_synchronous += 1
            return None
        fused, _ = backend
        guard = protect if protect is not None else torch.empty(0, dtype=torch.int64)
        ids, _ = fused.take_victims(stamp, None if array is stamp else array, table._row_ids, rows, stamps, scores,
                                    by_key, guard, k)
        if ids.numel() < k:
            self.rounds_synchronous += 1
            return None
        self.rounds_preselected += 1
        return ids

    def close(self) -> None:
        """Wait for and drop the pending job (if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[0].result()


def expire_window(table: "DynamicEmbeddingTable", protect: Optional[torch.Tensor]) -> torch.Tensor:
    """Ids (ascending) that have expired among the next ``expire_scan_rows`` rows of a
    sweep over the table (a clock hand that wraps): automatic expiry costs O(window) per
    round, and every row is examined once per ``capacity / window`` rounds."""
    policy = table.eviction
    capacity = table.capacity
    width = min(int(policy.expire_scan_rows), capacity)
    start = table._expire_hand % capacity
    rows = torch.arange(start, start + width, dtype=torch.int64, device=table.device) % capacity
    table._expire_hand = (start + width) % capacity
    rows = rows[table._row_stamp.index_select(0, rows) >= 0]
    if rows.numel() == 0:
        return rows
    expired = policy.expired(rows, table._clock())
    if expired is None:
        return rows[:0]
    rows = rows[expired]
    free = _unprotected(rows, protect, table._scratch, capacity + 1)
    if free is not None:
        rows = rows[free]
    return table._row_ids.index_select(0, rows).sort().values
