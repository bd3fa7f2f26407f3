"""The elastic protocol's state machine: membership, generations, step boundaries, data assignment.

Framework-neutral and single-threaded: :class:`ElasticState` holds what a coordinator knows and
decides; the Ray coordinator actor (``gauss_integrations.ray.elastic``) wraps it with a lock and
turns its answers into remote calls. Keeping the rules here lets them be tested without any
process being started.

Words:

* *generation*: one process group. Members ``0..world-1`` train steps ``step0+1, step0+2, ...``;
  any membership change (death, hang, join, scale) ends it and the next generation forms.
* *step s*: every member trains ``batch_size`` samples, all-reduces gradients and the step's
  sample indices, and applies the optimizer. Steps are numbered from 1; step 0 is "nothing done".
* *committed*: step s is committed when every member of its generation reported it done, or
  when a member that survives into the next generation holds it (a member only finishes s after
  the all-reduce of s completed, i.e. after every member's gradient of s reached it). Committed
  steps never go back.

Data assignment (:func:`sample_indices`): a generation starts at a stream *cursor* (the number of
samples committed so far) and step ``s`` of it reads the contiguous range
``cursor0 + (s - step0 - 1) * world * batch_size`` onwards, rank ``r`` the ``r``-th slice of
``batch_size``. An abandoned step never advances the cursor, so its samples are re-assigned,
re-partitioned over the next generation's world.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["Generation", "ElasticState", "sample_indices", "desired_workers", "AllReplicasLostError"]

#: A worker with no model state yet (a joiner) checks in with this local step.
NO_STATE = -1


class AllReplicasLostError(RuntimeError):
    """Every replica holding the trained state is gone; only a disaster checkpoint can resume."""


@dataclass(frozen=True)
class Generation:
    """One process group: who is in it, where its data starts and who sends the state."""

    gen: int
    members: Tuple[str, ...]      # worker ids, index = rank
    step0: int                    # last completed step when the generation formed
    cursor0: int                  # samples committed before step0 + 1
    batch_size: int               # samples per worker per step
    source_rank: int              # the member whose weights and optimizer state everyone takes
    transfer: bool                # False when every member already holds step0's state
    restore_path: Optional[str] = None  # a disaster checkpoint the source loads first (resume only)

    @property
    def world(self) -> int:
        return len(self.members)

    def cursor_after(self, step: int) -> int:
        """The stream cursor once steps ``step0+1 .. step`` of this generation are committed."""
        if step < self.step0:
            raise ValueError(f"step {step} precedes generation {self.gen}'s start {self.step0}")
        return self.cursor0 + (step - self.step0) * self.world * self.batch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = list(self.members)
        return d


def sample_indices(gen: Generation, step: int, rank: int) -> torch.Tensor:
    """Global sample indices that ``rank`` trains in ``step`` of ``gen`` (int64, ``batch_size``)."""
    if not gen.step0 < step:
        raise ValueError(f"step {step} is not after generation {gen.gen}'s start step {gen.step0}")
    if not 0 <= rank < gen.world:
        raise ValueError(f"rank {rank} outside generation {gen.gen}'s world of {gen.world}")
    start = gen.cursor_after(step - 1) + rank * gen.batch_size
    return torch.arange(start, start + gen.batch_size, dtype=torch.int64)


def desired_workers(backlog: int, samples_per_worker: int, min_workers: int, max_workers: int) -> int:
    """Backlog scaling policy: enough workers to drain ``backlog`` at ``samples_per_worker`` each,
    clamped to ``[min_workers, max_workers]``."""
    if samples_per_worker < 1:
        raise ValueError(f"samples_per_worker must be >= 1, got {samples_per_worker}")
    want = math.ceil(max(backlog, 0) / samples_per_worker)
    return max(min_workers, min(max_workers, want))


@dataclass
class _StepReport:
    indices: List[int]
    loss: float


@dataclass
class ElasticState:
    """What the coordinator knows. Every method is a transition; none blocks or does I/O."""

    batch_size: int
    min_workers: int = 1
    target: int = 1
    max_workers: int = 1 << 30
    gen: Optional[Generation] = None
    committed: int = 0
    cursor: int = 0
    generation_count: int = 0
    # membership outside the current generation
    joiners: List[str] = field(default_factory=list)      # registered, ready, not yet members
    dead: set = field(default_factory=set)
    leaving: set = field(default_factory=set)             # chosen to go at the next boundary
    checkins: Dict[str, int] = field(default_factory=dict)  # worker -> local step, for the next generation
    # step bookkeeping of the current generation
    allowed: int = 0              # the highest step any member has been told to run
    stop_step: Optional[int] = 0  # members wait after this step (None: run on)
    boundary: Optional[int] = None  # members regroup after this step
    broken: bool = False          # a collective failed: regroup now
    done: Dict[int, set] = field(default_factory=dict)
    reports: Dict[int, _StepReport] = field(default_factory=dict)
    # history
    ledger: Dict[int, int] = field(default_factory=dict)  # sample index -> times committed
    losses: Dict[int, float] = field(default_factory=dict)
    restore_path: Optional[str] = None
    lost: Optional[str] = None
    released: set = field(default_factory=set)           # told to stop at the last formation

    # -- membership -------------------------------------------------------------------------
    def register(self, wid: str) -> None:
        if wid in self.dead:
            raise ValueError(f"worker {wid} was declared dead; a replacement must use a new id")
        if wid not in self.joiners and (self.gen is None or wid not in self.gen.members):
            self.joiners.append(wid)
        if self.gen is not None:
            self.request_regroup()

    def mark_dead(self, wid: str) -> None:
        self.dead.add(wid)
        self.checkins.pop(wid, None)
        if wid in self.joiners:
            self.joiners.remove(wid)
        if self.gen is not None and wid in self.gen.members:
            self.broken = True

    def set_target(self, n: int) -> None:
        if not self.min_workers <= n <= self.max_workers:
            raise ValueError(f"cannot scale to {n} workers: the job allows {self.min_workers}..{self.max_workers}")
        self.target = n
        if self.gen is not None:
            live = [m for m in self.gen.members if m not in self.dead]
            excess = len(live) - n
            self.leaving = set(live[len(live) - excess:]) if excess > 0 else set()
            if self.leaving:
                self.request_regroup()

    def request_regroup(self) -> None:
        """End the generation at the next step boundary every member can reach: the highest
        step any member was already allowed to start."""
        if self.boundary is None:
            self.boundary = max(self.allowed, self.committed)

    def fail(self) -> None:
        self.broken = True

    # -- steps ------------------------------------------------------------------------------
    def next_action(self, wid: str, gen: int, step: int, report: Optional[Tuple[List[int], float]]) -> str:
        """A member finished ``step`` (with ``report`` of it) or polls: "step", "wait", "regroup"."""
        if self.gen is None or gen != self.gen.gen or wid not in self.gen.members or wid in self.dead:
            return "regroup"
        if report is not None:
            self._record(wid, step, report)
        if self.broken or (self.boundary is not None and step >= self.boundary):
            return "regroup"
        if self.stop_step is not None and step + 1 > self.stop_step:
            return "wait"
        if self.boundary is not None and step + 1 > self.boundary:
            return "regroup"
        self.allowed = max(self.allowed, step + 1)
        return "step"

    def _record(self, wid: str, step: int, report: Tuple[List[int], float]) -> None:
        indices, loss = report
        known = self.reports.get(step)
        if known is not None and known.indices != list(indices):
            raise RuntimeError(f"members disagree on the samples of step {step}: the all-reduce is broken")
        self.reports[step] = _StepReport(list(indices), float(loss))
        self.done.setdefault(step, set()).add(wid)
        assert self.gen is not None
        live = set(self.gen.members) - self.dead
        while live and self.committed + 1 in self.reports and self.done.get(self.committed + 1, set()) >= live:
            self._commit(self.committed + 1)

    def _commit(self, step: int) -> None:
        rep = self.reports[step]
        for i in rep.indices:
            self.ledger[i] = self.ledger.get(i, 0) + 1
        self.losses[step] = rep.loss
        self.committed = step
        assert self.gen is not None
        self.cursor = self.gen.cursor_after(step)

    def pause(self) -> int:
        """Stop after the steps already granted; returns the step training will stop at."""
        self.stop_step = max(self.allowed, self.committed)
        return self.stop_step

    # -- forming a generation -----------------------------------------------------------------
    def checkin(self, wid: str, local_step: int) -> None:
        if wid in self.dead:
            raise ValueError(f"worker {wid} was declared dead")
        self.checkins[wid] = local_step

    def expected(self) -> List[str]:
        old = [] if self.gen is None else [m for m in self.gen.members if m not in self.dead]
        return old + [j for j in self.joiners if j not in old]

    def try_form(self) -> Optional[Generation]:
        """Form the next generation once every expected worker checked in; None: keep waiting."""
        if self.lost is not None:
            return None
        expected = self.expected()
        if not expected or any(w not in self.checkins for w in expected):
            return None
        stay = [w for w in expected if w not in self.leaving]
        if self.gen is None and len(stay) < self.target:
            return None  # the first generation starts with the requested world
        if len(stay) < self.min_workers:
            return None
        # Never above the target: survivors come first in ``expected``, so surplus joiners (spawned
        # for a target that has since dropped) are the ones released.
        stay = stay[:max(self.target, self.min_workers)]
        steps = {w: self.checkins[w] for w in stay}
        top = max(steps.values())
        if top == NO_STATE and (self.committed > 0 and self.restore_path is None):
            self.lost = (f"all replicas lost after step {self.committed}: no live worker holds the trained state. "
                         "Start a new ElasticTrainer with start(from_checkpoint=<the latest disaster checkpoint>)")
            raise AllReplicasLostError(self.lost)
        if top != NO_STATE and top < self.committed:
            raise RuntimeError(f"survivors hold step {top} but step {self.committed} was committed")
        # Steps a survivor finished count as committed: its update holds every member's gradient.
        for s in range(self.committed + 1, top + 1):
            if s not in self.reports:
                raise RuntimeError(f"a survivor holds step {s} but never reported it")
            self._commit(s)
        step0 = self.committed
        source_rank = 0 if top == NO_STATE else next(i for i, w in enumerate(stay) if steps[w] == top)
        transfer = top == NO_STATE or any(v != top for v in steps.values())
        restore = self.restore_path if top == NO_STATE else None
        self.generation_count += 1
        self.gen = Generation(self.generation_count, tuple(stay), step0, self.cursor, self.batch_size,
                              source_rank, transfer, restore)
        self.restore_path = None  # a checkpoint seeds one generation; later losses are errors
        self.released = set(self.leaving) | (set(expected) - set(stay))
        self.joiners = [j for j in self.joiners if j not in stay]
        self.leaving = set()
        self.checkins = {}
        self.allowed = step0
        self.boundary = None
        self.broken = False
        self.done = {}
        self.reports = {}
        return self.gen

    def rank_of(self, wid: str) -> Optional[int]:
        if self.gen is None or wid not in self.gen.members:
            return None
        return self.gen.members.index(wid)

    def set_restore(self, path: str, step: int, cursor: int) -> None:
        """Start from a disaster checkpoint taken after ``step`` with ``cursor`` samples consumed."""
        if self.gen is not None:
            raise RuntimeError("a disaster checkpoint can only seed the first generation")
        self.restore_path, self.committed, self.cursor = path, step, cursor
        self.stop_step = step

    def summary(self) -> dict:
        return {"step": self.committed, "generation": self.generation_count,
                "workers": 0 if self.gen is None else len([m for m in self.gen.members if m not in self.dead]),
                "samples_trained": sum(self.ledger.values()), "cursor": self.cursor, "target": self.target}

    @staticmethod
    def duplicates(ledger: Dict[int, int]) -> List[int]:
        return sorted(i for i, c in ledger.items() if c > 1)

    @staticmethod
    def missing(ledger: Dict[int, int], upto: int) -> List[int]:
        return [i for i in range(upto) if ledger.get(i, 0) == 0]
