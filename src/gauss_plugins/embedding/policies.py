"""Admission and eviction policies of dynamic embedding tables.

Admission decides when an id that is not in the table gets a row (in training mode):

* :class:`AlwaysAdmit` (``"always"``): on first sight.
* :class:`CountingAdmission` (``"counting"``): after ``min_count`` sightings, counted in a
  count-min sketch of fixed size (``depth x width`` int32, 4 MiB by default) whatever the
  number of distinct ids; estimates never undercount, so an id seen N times is admitted.
* :class:`ProbabilisticAdmission` (``"probability"``): each sighting is admitted with
  probability ``p``, decided by a hash of (seed, id, admission round): replicas that see the
  same batches make the same decisions, and a frequent id gets in after ~1/p sightings.

Eviction frees rows when the table is full and cannot grow, or when :meth:`evict` is called
(TTL). A policy keeps at most one int32 per row:

* :class:`LRUEviction` (``"lru"``): least recently touched (inserted, updated by the
  optimizer or written), from the table's own version stamps: no extra bytes per row.
* :class:`LFUEviction` (``"lfu"``): least frequently used (saturating access count).
* :class:`TTLEviction` (``"ttl"``): rows unused for more than ``ttl`` steps or seconds
  expire; when space is needed the least recently used go first.
* :class:`ScoreEviction` (``"score"``): a custom ``score_fn(ids, rows, table) -> scores``.

Lower score = evicted first; ties are broken by id, so eviction is deterministic.

Cost per round is bounded on large tables (every policy takes these options):

* ``sample_factor`` (default 8): once the table holds more than ``exact_below`` (default
  65,536) rows, a round that must free ``k`` rows takes its victims from the table's lowest
  ``~1/sample_factor`` quantile by score, not exactly its ``k`` lowest; a round costs O(k),
  whatever the table size. ``sample_factor=0`` always selects exactly (a full scan:
  O(table) per round). Smaller tables, and rounds that would sample most of the table,
  select exactly. ``evict_fraction`` still adds its headroom to ``k``: set it to 0 for the
  smallest, steadiest rounds (each training step then frees what its new ids need).
* ``sweep`` (default True; compiled (C++) index, int32 scores as LRU/LFU/TTL have): a round
  estimates the ``1/(2 * sample_factor)`` quantile of the scores from 8,192 random rows and
  takes, in row order from where the previous round stopped (a clock hand that wraps), the
  rows at or under it. The margin of 2 absorbs the estimate's error (about 1% of the table),
  so every victim lies in the lowest ``1/sample_factor`` (tested against the exact quantile).
  Reading consecutive stamps is what makes it cheap: at 10M rows a round of 6,554 victims
  costs 0.6-1.0 ms of selection where the random sample costs ~2.8 ms (its reads are cache
  misses). Within the quantile the order is the rows', not the scores'. A round that finds
  too few such rows within ``8 * 2 * sample_factor * k`` rows (e.g. the batch uses them)
  falls back to the sample below (``table.sweep_fallbacks`` counts them).
  ``sweep=False``, other backends and custom scores (``ScoreEviction``): scores
  ``sample_factor * k`` rows drawn uniformly at random (from a generator seeded by the
  table's seed) and evicts the ``k`` lowest of them. With the compiled index that sample is
  drawn in aligned runs of 8 consecutive rows (every row equally likely, one cache line per
  run) by a stream of its own, ties go to the smaller row. Either way a seeded table evicts
  the same rows run after run.
* ``preselect`` (default False): with the compiled index, draw the next round's sample on
  a background thread while training runs, and at the round keep the candidates whose
  stamp and score have not changed since and that the batch does not use
  (:class:`~gauss_plugins.embedding.tracking.VictimPreselector`). The training thread then
  pays only that check and the removal. Same sample size and order as ``sweep=False``, but
  the victims depend on how far training got while the sample was drawn: not repeatable run
  to run (without it, a seeded table evicts the same rows every run). A round whose
  pre-selection is unusable selects as without it (by the sweep, by default). Since the
  sweep, the check costs the training thread more than a swept round does (500k-row run of
  ``table_under_load.py --quick``, 2026-11-29: 2.9 against 2.3 ms CPU, p50).
* ``expire_scan_rows`` (default 65,536): automatic expiry (``auto_evict_every``) checks the
  next this many rows of a sweep over the table, so an expired row goes within
  ``capacity / expire_scan_rows`` rounds. ``table.evict()`` with no arguments still
  removes every expired row at once (a full scan).
Third-party policies subclass :class:`AdmissionPolicy` / :class:`EvictionPolicy` and register
through the ``gauss_register_admission_policies`` / ``gauss_register_eviction_policies`` hooks.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from gauss_plugins.embedding.index import hash_keys

__all__ = [
    "AdmissionPolicy",
    "AlwaysAdmit",
    "CountingAdmission",
    "ProbabilisticAdmission",
    "Clock",
    "EvictionPolicy",
    "LRUEviction",
    "LFUEviction",
    "TTLEviction",
    "ScoreEviction",
]

_INT32_MAX = 2**31 - 1
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64


def _mix(keys: torch.Tensor, salt: int) -> torch.Tensor:
    """A hash of ``keys`` under ``salt`` (int64 wrap-around)."""
    salt_t = hash_keys(torch.tensor([salt], dtype=torch.int64))
    return hash_keys(keys ^ salt_t.to(keys.device))


# --------------------------------------------------------------------------- admission
class AdmissionPolicy:
    """Decides which new ids get a row. Subclasses override :meth:`admit`."""

    name = "admission"

    def admit(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """bool[U] for the distinct absent ``ids`` of a training batch, ``counts`` their
        occurrences in it. May update internal state (sightings)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "AdmissionPolicy":
        return self

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        pass

    def options(self) -> Dict[str, object]:
        """Constructor options (saved in checkpoints to rebuild the policy)."""
        return {}


class AlwaysAdmit(AdmissionPolicy):
    """Every new id gets a row on first sight."""

    name = "always"

    def admit(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)


class CountingAdmission(AdmissionPolicy):
    """Admit an id once it was seen ``min_count`` times (count-min sketch, bounded memory)."""

    name = "counting"

    def __init__(self, min_count: int = 2, width: int = 1 << 18, depth: int = 4, seed: int = 0) -> None:
        if min_count < 1 or width < 1 or depth < 1:
            raise ValueError(f"counting admission needs min_count, width, depth >= 1, got {min_count}, {width}, {depth}")
        self.min_count, self.width, self.depth, self.seed = int(min_count), int(width), int(depth), int(seed)
        self.sketch = torch.zeros(self.depth, self.width, dtype=torch.int32)

    def to(self, device: torch.device) -> "CountingAdmission":
        self.sketch = self.sketch.to(device)
        return self

    def _buckets(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([_mix(ids, self.seed * 1000003 + d).remainder(self.width) for d in range(self.depth)])

    def admit(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=ids.device)
        buckets = self._buckets(ids)
        inc = counts.to(torch.int64).clamp_max(_INT32_MAX)
        est = None
        for d in range(self.depth):
            row = self.sketch[d].to(torch.int64)
            row.index_add_(0, buckets[d], inc)
            self.sketch[d] = row.clamp_max(_INT32_MAX).to(torch.int32)
            got = self.sketch[d][buckets[d]]
            est = got if est is None else torch.minimum(est, got)
        return est >= self.min_count

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"sketch": self.sketch}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        sketch = state["sketch"]
        if tuple(sketch.shape) != (self.depth, self.width):
            raise ValueError(f"sketch shape {tuple(sketch.shape)} does not match depth x width {self.depth} x {self.width}")
        self.sketch = sketch.to(self.sketch.device, torch.int32).clone()

    def options(self) -> Dict[str, object]:
        return {"min_count": self.min_count, "width": self.width, "depth": self.depth, "seed": self.seed}


class ProbabilisticAdmission(AdmissionPolicy):
    """Admit each sighting with probability ``p`` (hash of seed, id and admission round)."""

    name = "probability"

    def __init__(self, p: float = 0.1, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"admission probability must be in [0, 1], got {p}")
        self.p, self.seed = float(p), int(seed)
        self.round = 0

    def admit(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        self.round += 1
        u = (_mix(ids, self.seed * 1000003 + self.round) >> 11) & ((1 << 53) - 1)
        # P(at least one of `counts` sightings admitted) = 1 - (1 - p)^counts
        prob = 1.0 - (1.0 - self.p) ** counts.to(torch.float64)
        return u.to(torch.float64) < prob * float(1 << 53)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"round": torch.tensor(self.round, dtype=torch.int64)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.round = int(state["round"])

    def options(self) -> Dict[str, object]:
        return {"p": self.p, "seed": self.seed}


# --------------------------------------------------------------------------- eviction
@dataclass(frozen=True)
class Clock:
    """The table's notion of time: ``step`` counts training lookups, ``now`` is wall time."""

    step: int
    now: float


class EvictionPolicy:
    """Per-row bookkeeping and a score; lower scores are evicted first.

    The table calls :meth:`resize` when it grows, :meth:`on_insert` for new rows,
    :meth:`on_access` for rows read by a training lookup, :meth:`scores` to choose victims
    and :meth:`expired` (if a policy expires rows) in :meth:`DynamicEmbeddingTable.evict`.
    ``row_state``/``load_row_state`` move the per-row state in and out of checkpoints.
    """

    name = "eviction"
    #: per-row int32 arrays this policy keeps (names -> tensors after resize)
    row_fields: tuple = ()
    #: whether :meth:`on_access` does anything (the table skips recording reads otherwise)
    records_reads: bool = True

    def __init__(self, sample_factor: int = 8, exact_below: int = 1 << 16, expire_scan_rows: int = 1 << 16,
                 preselect: bool = False, sweep: bool = True) -> None:
        for name, value, low in (("sample_factor", sample_factor, 0), ("exact_below", exact_below, 0),
                                 ("expire_scan_rows", expire_scan_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"eviction option {name} must be an int >= {low}, got {value!r}")
        for name, value in (("preselect", preselect), ("sweep", sweep)):
            if not isinstance(value, bool):
                raise ValueError(f"eviction option {name} must be True or False, got {value!r}")
        self.sample_factor, self.exact_below, self.expire_scan_rows = sample_factor, exact_below, expire_scan_rows
        self.preselect, self.sweep = preselect, sweep
        self.rows: Dict[str, torch.Tensor] = {}

    def bind(self, table) -> None:
        """Called once by the table that uses this policy."""

    def resize(self, num_rows: int, device: torch.device) -> None:
        for field in self.row_fields:
            old = self.rows.get(field)
            new = torch.zeros(num_rows, dtype=torch.int32, device=device)
            if old is not None:
                n = min(old.numel(), num_rows)
                new[:n] = old[:n]
            self.rows[field] = new

    def on_insert(self, rows: torch.Tensor, clock: Clock) -> None:
        pass

    def on_access(self, rows: torch.Tensor, clock: Clock) -> None:
        pass

    def scores(self, ids: torch.Tensor, rows: torch.Tensor, clock: Clock, table) -> torch.Tensor:
        raise NotImplementedError

    def score_array(self) -> Optional[torch.Tensor]:
        """The int32 per-row array :meth:`scores` reads (``scores == array[rows]``), so a
        fused kernel can select victims from it; None when scores are computed otherwise."""
        return None

    def access_stamp(self, clock: Clock) -> Optional[Tuple[int, torch.Tensor, int]]:
        """What :meth:`on_access` does, if it is a plain stamp a fused kernel can apply while
        reading rows: ``(1, array, value)`` sets ``array[row] = value``, ``(2, array, 0)``
        adds 1 per occurrence (saturating). None: call :meth:`on_access` instead."""
        return None

    def expired(self, rows: torch.Tensor, clock: Clock) -> Optional[torch.Tensor]:
        """bool per row that has expired, or None when this policy never expires rows."""
        return None

    def memory_bytes_per_row(self) -> int:
        return 4 * len(self.row_fields)

    def row_state(self, rows: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {f: self.rows[f][rows] for f in self.row_fields}

    def load_row_state(self, rows: torch.Tensor, state: Dict[str, torch.Tensor]) -> None:
        for f in self.row_fields:
            if f not in state:
                raise ValueError(f"{self.name} eviction state is missing {f!r}")
            self.rows[f][rows] = state[f].to(self.rows[f].device, torch.int32)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        pass

    def options(self) -> Dict[str, object]:
        return {"sample_factor": self.sample_factor, "exact_below": self.exact_below,
                "expire_scan_rows": self.expire_scan_rows, "preselect": self.preselect, "sweep": self.sweep}


def _stamp(step: int) -> int:
    if step > _INT32_MAX:
        raise OverflowError("eviction clock passed 2**31 steps")
    return step


class LRUEviction(EvictionPolicy):
    """Evict the rows touched longest ago.

    A row is touched when it is inserted, the optimizer updates it (every row a training
    batch reads gets its gradient) or ``set`` writes it. The table's per-row version stamp
    records exactly that, so this policy keeps no state of its own (0 bytes a row), records
    no reads, and its score is the stamp."""

    name = "lru"
    row_fields = ()
    records_reads = False

    def bind(self, table) -> None:
        self._table = weakref.ref(table)

    def access_stamp(self, clock):
        return 0, None, 0  # the table's own stamp is all LRU needs

    def scores(self, ids, rows, clock, table):
        return table.row_stamps.index_select(0, rows)

    def score_array(self):
        return self._table().row_stamps


class LFUEviction(EvictionPolicy):
    """Evict the rows read least often (count saturates at 2**31 - 1)."""

    name = "lfu"
    row_fields = ("count",)

    def on_insert(self, rows, clock):
        self.rows["count"][rows] = 0

    def on_access(self, rows, clock):
        count = self.rows["count"]
        touched = torch.unique(rows)
        inc = torch.bincount(torch.searchsorted(touched, rows), minlength=touched.numel())
        count[touched] = (count[touched].to(torch.int64) + inc).clamp_max(_INT32_MAX).to(torch.int32)

    def access_stamp(self, clock):
        return 2, self.rows["count"], 0

    def scores(self, ids, rows, clock, table):
        return self.rows["count"].index_select(0, rows)

    def score_array(self):
        return self.rows["count"]


class TTLEviction(EvictionPolicy):
    """Rows not read for more than ``ttl`` steps (``unit="steps"``) or seconds expire."""

    name = "ttl"
    row_fields = ("last_seen",)

    def __init__(self, ttl: float = 1000, unit: str = "steps", **bounds: int) -> None:
        super().__init__(**bounds)
        if unit not in ("steps", "seconds"):
            raise ValueError(f"ttl unit must be 'steps' or 'seconds', got {unit!r}")
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        self.ttl, self.unit = float(ttl), unit
        self.epoch = int(time.time())  # seconds are stored relative to this, as int32

    def _now(self, clock: Clock) -> int:
        return _stamp(clock.step if self.unit == "steps" else int(clock.now) - self.epoch)

    def on_insert(self, rows, clock):
        self.rows["last_seen"][rows] = self._now(clock)

    on_access = on_insert

    def access_stamp(self, clock):
        return 1, self.rows["last_seen"], self._now(clock)

    def scores(self, ids, rows, clock, table):
        return self.rows["last_seen"].index_select(0, rows)

    def score_array(self):
        return self.rows["last_seen"]

    def expired(self, rows, clock):
        return (self._now(clock) - self.rows["last_seen"][rows].to(torch.int64)) > self.ttl

    def state_dict(self):
        return {"epoch": torch.tensor(self.epoch, dtype=torch.int64)}

    def load_state_dict(self, state):
        self.epoch = int(state["epoch"])

    def options(self):
        return {**super().options(), "ttl": self.ttl, "unit": self.unit}


class ScoreEviction(EvictionPolicy):
    """Custom scores: ``score_fn(ids, rows, table) -> Tensor`` (lower is evicted first)."""

    name = "score"
    records_reads = False

    def __init__(self, score_fn: Callable[..., torch.Tensor], **bounds: int) -> None:
        super().__init__(**bounds)
        if not callable(score_fn):
            raise TypeError("ScoreEviction needs a callable score_fn(ids, rows, table) -> scores")
        self.score_fn = score_fn

    def scores(self, ids, rows, clock, table):
        scores = self.score_fn(ids, rows, table)
        if not isinstance(scores, torch.Tensor) or scores.shape != ids.shape:
            raise ValueError(f"score_fn must return a tensor of shape {tuple(ids.shape)}, got {scores!r:.80}")
        return scores
