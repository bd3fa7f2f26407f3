"""Elastic data-parallel training on Ray: recovery from a live replica, scaling at step boundaries.

::

    from gauss_integrations.ray.elastic import ElasticTrainer, ElasticConfig
    trainer = ElasticTrainer(make_model, make_optimizer, loss_fn, stream, ElasticConfig(num_workers=3))
    trainer.start(); trainer.run(steps=100); trainer.scale(2); trainer.run(steps=50); trainer.shutdown()

Processes: the driver (this object and a supervisor thread), one *coordinator* actor (named
``config.name`` in namespace ``gauss-elastic``, so ``gauss elastic scale`` finds it) holding
:class:`~gauss_plugins.elastic.protocol.ElasticState`, and ``num_workers`` *worker* actors, each
a full replica (model + optimizer) in a ``torch.distributed`` group (gloo on CPU, NCCL on GPU).

A step: each member asks the coordinator for leave to run the next step (the coordinator's
answer is where step boundaries, pauses and regroups take effect), trains its slice of the
stream (:func:`~gauss_plugins.elastic.protocol.sample_indices`), all-reduces the slice's sample
indices and the gradients, applies the optimizer and reports the step.

Recovery: a worker that dies (SIGKILL: its peer links close, and a peer declares it dead to the
coordinator within milliseconds; its peers' collectives fail at once; the supervisor sees the
actor die) or hangs (no heartbeat for ``dead_after_s``: the supervisor kills it) ends the
generation. Survivors abandon the in-flight step, destroy their group, check in with the last
step they finished, and the next generation forms among them on a new TCPStore (new port):
its step0 is the highest step a survivor holds, and that survivor's weights and optimizer
state are broadcast when the survivors differ (otherwise nothing moves). Meanwhile the
supervisor starts a replacement, which registers when built and joins at the next step
boundary, receiving the state by broadcast from a live peer. No checkpoint is read on this path.
The sample guarantee is stated in :mod:`gauss_plugins.elastic`.

NCCL (``backend="nccl"``, one GPU per worker through Ray's ``num_gpus=1``, so ``cuda:0`` in the
actor): a dead peer's collectives hang instead of failing. A member aborts its communicator
(``ProcessGroup.abort()``, from another thread) when a peer link ends or, while it has waited on
collectives for over ``WATCH_AFTER_S``, when the coordinator says the generation closed (or the
wait passed ``step_timeout_s``); the torch watchdog is told to stay out of it
(``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``: its default would end the survivor's process). An NCCL
call returns once queued, so after the gradient all-reduce (before the optimizer reads it and
before rank 0 writes rows on its strength), after an id gather and after a state transfer the
member waits for the collectives on the host and drops their results if they were aborted; a
member that received an aborted transfer holds no trusted state (it needs a transfer next
time). Groups are built eagerly (``device_id``) and torn down by abort. Dynamic tables must then
live on the GPU (``DynamicTableConfig(device="cuda")``): their row collectives run over NCCL too.

Dynamic tables (``stores={name: store}``, ``table_ids=fn``; :mod:`gauss_plugins.elastic.rows`):
each replica's table is backed by the one shared store; a step also gathers the global batch's ids,
inserts the ones a replica lacks, averages the row gradients over the group and applies the same
sparse update everywhere; rank 0 writes step s's rows after step s+1's all-reduce (the store's
``put`` returning is the acknowledgement), and a new group's rank 0 writes its start state.

Disaster checkpoints (``disaster_checkpoint_every``): rank 0 writes one after every N-th step
(atomic, pickle-free, :mod:`gauss_plugins.elastic.state`). They serve only when every replica or
the coordinator is lost: ``ElasticTrainer(...).start(from_checkpoint=path)``.
"""
from __future__ import annotations

import os
import signal as _signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Union

import ray
import torch

from gauss_plugins.elastic.protocol import (NO_STATE, AllReplicasLostError, ElasticState, Generation,
                                            desired_workers, sample_indices)
from gauss_plugins.embedding.backing import pack_state as pack_table_state
from gauss_plugins.elastic.liveness import PeerLinks
from gauss_plugins.elastic.rows import RowCommitLog, check_table, gather_ids, install_ids, tables_of
from gauss_plugins.elastic.state import (broadcast_state, latest_disaster_checkpoint, load_disaster_checkpoint,
                                         pack_state, save_disaster_checkpoint, unpack_state)

__all__ = ["ElasticConfig", "ElasticTrainer", "ElasticCoordinatorLost", "ElasticWorkerError", "AllReplicasLostError",
           "NAMESPACE",
           "get_coordinator"]

NAMESPACE = "gauss-elastic"
#: A step's forward/backward running longer than this asks the coordinator whether to go on.
WATCH_AFTER_S = 0.2


class ElasticCoordinatorLost(RuntimeError):
    """The coordinator actor died: membership, step and data cursor are gone with it."""


class _StepAbandoned(RuntimeError):
    """The coordinator closed the generation while this member computed a step (a peer died):
    the rest of the step's forward and backward would be thrown away, so they are skipped."""


class _CollectivesAborted(RuntimeError):
    """NCCL: this member aborted its communicator because the generation ended (a peer died) while
    it waited on a collective. What the aborted collectives left in their buffers is garbage, so
    the step (or transfer) they belonged to is dropped before anything reads them."""


class ElasticWorkerError(RuntimeError):
    """The user's model, loss or stream raised in a worker: a replacement would fail the same way,
    so training stops instead of re-forming groups forever."""


@dataclass
class ElasticConfig:
    """Launcher settings. Worker counts obey ``min_workers <= num_workers <= max_workers``.

    ``backlog_samples_per_worker`` > 0 turns on the backlog policy: the target world follows
    ``ceil(stream.backlog(cursor) / backlog_samples_per_worker)`` within ``[min, max]``.

    ``huge_pages`` (default on) puts the workers' CPU tensors of 2 MB and more on transparent huge
    pages (PyTorch's ``THP_MEM_ALLOC_ENABLE=1``; the kernel must allow ``madvise``). Why: a
    SIGKILLed process's sockets close only after the kernel freed its memory, ~0.2 s per GB on
    4 KB pages; on huge pages a 2.4 GB replica is gone in ~0.07 s, so its peers see it die that
    much sooner (and steps take fewer page faults). It goes into each worker actor's environment
    (a Ray ``runtime_env``), since the allocator reads it once, at start.
    """

    num_workers: int = 3
    min_workers: int = 1
    max_workers: int = 8
    backend: str = "gloo"
    heartbeat_s: float = 0.5
    dead_after_s: float = 2.0
    disaster_checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    ray_temp_dir: Optional[str] = None
    batch_size: int = 32
    name: str = "gauss-elastic"
    step_timeout_s: float = 60.0
    backlog_samples_per_worker: int = 0
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.num_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= num_workers <= max_workers, got {self.min_workers}, "
                             f"{self.num_workers}, {self.max_workers}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {self.backend!r}")
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA devices; use backend='gloo' on a CPU machine")
        if self.heartbeat_s <= 0 or self.dead_after_s <= self.heartbeat_s:
            raise ValueError(f"need 0 < heartbeat_s < dead_after_s, got {self.heartbeat_s}, {self.dead_after_s}")
        if self.disaster_checkpoint_every < 0:
            raise ValueError("disaster_checkpoint_every is a step count (0 = off)")
        if self.disaster_checkpoint_every and not self.checkpoint_dir:
            raise ValueError("disaster_checkpoint_every needs checkpoint_dir (where the checkpoints go)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# ------------------------------------------------------------------------------------------
# coordinator actor
# ------------------------------------------------------------------------------------------
class _Coordinator:
    """Wraps :class:`ElasticState` with a condition variable; runs threaded (blocking waits)."""

    def __init__(self, batch_size: int, min_workers: int, target: int, max_workers: int,
                 dead_after_s: float) -> None:
        self.s = ElasticState(batch_size=batch_size, min_workers=min_workers, target=target,
                              max_workers=max_workers)
        self.cv = threading.Condition()
        self.dead_after_s = dead_after_s
        self.heartbeats: Dict[str, float] = {}
        self.pids: Dict[str, int] = {}
        self.spawned_at: Dict[str, float] = {}
        self.store_addr: Dict[int, tuple] = {}
        self.recoveries: List[dict] = []
        self.joins: List[dict] = []
        self._open_recovery: Optional[dict] = None
        self._open_joins: List[dict] = []
        self.checkpoints: List[dict] = []
        self.checkpoint_reads = 0
        #: rank 0's newest store acknowledgement of table rows: {"step", "rows"}
        self.rows_acked: Optional[dict] = None
        self.stopping = False
        self.errors: List[str] = []
        self.failures: List[dict] = []

    def pid(self) -> int:
        return os.getpid()

    # membership ------------------------------------------------------------------------------
    def register(self, wid: str, pid: int, spawned_at: float) -> None:
        with self.cv:
            self.pids[wid], self.spawned_at[wid] = pid, spawned_at
            self.heartbeats[wid] = time.time()
            self.s.register(wid)
            self.cv.notify_all()

    def heartbeat(self, wid: str) -> None:
        self.heartbeats[wid] = time.time()

    def note_kill(self, wid: str, t: float) -> None:
        """The driver signalled ``wid`` at ``t`` (its clock, the same host): the recovery is timed
        from then, also when a peer or Ray reported the death before this note arrived."""
        with self.cv:
            r = self._open_recovery
            if r is not None:
                r["t"] = min(r["t"], t)
            elif wid in self.s.dead and self.recoveries and self.recoveries[-1]["started"] > t:
                # That recovery already ended (faster than this note): re-time it from the kill.
                rec, shift = self.recoveries[-1], self.recoveries[-1]["started"] - t
                rec["started"] = t
                rec["first_step_after_s"] += shift
                rec["timeline"] = {k: v + shift for k, v in rec["timeline"].items()}
                rec["worker_timelines"] = {w: {k: v + shift for k, v in ev.items()}
                                           for w, ev in rec["worker_timelines"].items()}
            else:
                self._start_recovery(t)

    def _start_recovery(self, t: float) -> None:
        if self._open_recovery is None:
            self._open_recovery = {"t": t, "killed_at": self.s.committed, "events": {}, "workers": {}}

    def _event(self, name: str, t: Optional[float] = None) -> None:
        """Timeline of the open recovery: when ``name`` first happened here (``t``, default now);
        :meth:`_on_commit` files it with the recovery as seconds after the kill (or the first sign
        of the loss)."""
        if self._open_recovery is not None:
            self._open_recovery["events"].setdefault(name, time.time() if t is None else t)

    def mark_dead(self, wid: str, reason: str = "") -> None:
        with self.cv:
            if wid in self.s.dead:
                return
            was_member = self.s.gen is not None and wid in self.s.gen.members and wid not in self.s.released
            if was_member:
                self._start_recovery(time.time())
                self._event("declared_dead")
            self.s.mark_dead(wid)
            self.heartbeats.pop(wid, None)
            if reason:
                self.errors.append(f"{wid}: {reason}")
            self._try_form()
            self.cv.notify_all()

    def peer_lost(self, wid: str, gen: int, lost_rank: int, why: str) -> None:
        """Member ``wid`` of generation ``gen`` saw the link to rank ``lost_rank`` end without a
        goodbye (:mod:`gauss_plugins.elastic.liveness`): that process is gone. Declaring it dead
        now lets the next group form without waiting for Ray to notice the dead actor. Should the
        process still live after all, it is told to stop at its next check-in and is replaced;
        nothing it did after its last committed step counts, so the sample guarantee holds."""
        with self.cv:
            g = self.s.gen
            if g is None or g.gen != gen or wid not in g.members or wid in self.s.dead \
                    or not 0 <= lost_rank < g.world:
                return  # a stale report: that generation already ended
            lost = g.members[lost_rank]
            if lost in self.s.dead:
                return
            self.failures.append({"worker": wid, "generation": gen, "reason": f"peer {lost} lost: {why}"[:300]})
            del self.failures[:-100]
            self._start_recovery(time.time())
            self._event("peer_lost_reported")
            self.s.mark_dead(lost)
            self.heartbeats.pop(lost, None)
            self._try_form()
            self.cv.notify_all()

    def report_failure(self, wid: str, gen: int, message: str) -> None:
        with self.cv:
            self.failures.append({"worker": wid, "generation": gen, "reason": message[:300]})
            del self.failures[:-100]  # status() carries them: keep the newest
            if self.s.gen is not None and gen == self.s.gen.gen:
                self._start_recovery(time.time())
                self._event("failure_reported")
                self.s.fail()
            self.cv.notify_all()

    def set_target(self, n: int) -> None:
        with self.cv:
            self.s.set_target(n)
            self.cv.notify_all()

    # stepping -----------------------------------------------------------------------------------
    def set_stop(self, step: Optional[int]) -> None:
        with self.cv:
            self.s.stop_step = step
            self.cv.notify_all()

    def pause(self) -> int:
        with self.cv:
            stop = self.s.pause()
            self.cv.notify_all()
            return stop

    def next_action(self, wid: str, gen: int, step: int, report: Optional[dict], timeout: float = 0.5) -> str:
        deadline = time.time() + timeout
        with self.cv:
            if report is not None and report.get("checkpoint"):
                self.checkpoints.append(report["checkpoint"])
            if report is not None and report.get("rows_acked"):
                self.rows_acked = report["rows_acked"]
            r = self._open_recovery
            if report is not None and report.get("timeline") and r is not None and r.get("gen_started", 10 ** 9) <= gen:
                # The member's own clock (one host here): when it left the old group, formed the
                # new one, synced and went through the first step's phases.
                r["workers"][wid] = dict(report["timeline"])
            rep = None if report is None else (report["indices"], report["loss"])
            while True:
                if self.stopping:
                    return "stop"
                before = self.s.committed
                act = self.s.next_action(wid, gen, step, rep)
                rep = None
                if act == "step" and r is not None and r.get("gen_started", 10 ** 9) <= gen:
                    self._event("first_step_granted")
                if self.s.committed != before:
                    self._on_commit()
                    self.cv.notify_all()
                left = deadline - time.time()
                if act != "wait" or left <= 0:
                    return act
                self.cv.wait(left)

    def _on_commit(self) -> None:
        now = time.time()
        g = self.s.gen
        if g is None or self.s.committed <= g.step0:
            return
        if self._open_recovery is not None and self._open_recovery.get("gen_started", 10 ** 9) <= g.gen:
            r = self._open_recovery
            self._event("first_step_committed", now)
            t0 = r["t"]
            self.recoveries.append({"killed_at": r["killed_at"], "first_step_after_s": now - t0,
                                    "steps_redone": r["steps_redone"], "generation": g.gen, "world": g.world,
                                    "started": t0, "timeline": {k: v - t0 for k, v in r["events"].items()},
                                    "worker_timelines": {w: {k: v - t0 for k, v in ev.items()}
                                                         for w, ev in r["workers"].items()}})
            self._open_recovery = None
        for j in [j for j in self._open_joins if j["gen"] <= g.gen]:
            self.joins.append({"worker": j["worker"], "join_s": now - j["spawned_at"], "generation": g.gen})
            self._open_joins.remove(j)

    # forming generations ----------------------------------------------------------------------
    def _try_form(self) -> Optional[Generation]:
        first = self.s.gen is None
        try:
            g = self.s.try_form()
        except AllReplicasLostError:
            self.cv.notify_all()
            return None
        if g is None:
            return None
        if self._open_recovery is not None and "gen_started" not in self._open_recovery:
            self._open_recovery["gen_started"] = g.gen
            self._open_recovery["steps_redone"] = max(0, self._open_recovery["killed_at"] - g.step0)
            self._event("generation_formed")
        if not first:
            for w in g.members:
                if w in self.spawned_at and self.spawned_at[w] is not None and w not in \
                        {j["worker"] for j in self.joins}:
                    self._open_joins.append({"worker": w, "gen": g.gen, "spawned_at": self.spawned_at[w]})
                    self.spawned_at[w] = None
        else:
            for w in g.members:
                self.spawned_at[w] = None
        return g

    def checkin(self, wid: str, local_step: int, prev_gen: int, timeout: float = 1.0) -> dict:
        deadline = time.time() + timeout
        with self.cv:
            if self.stopping:
                return {"action": "stop"}
            if wid in self.s.dead:
                return {"action": "stop", "reason": "declared dead"}
            formed = self._formed_for(wid, prev_gen)
            if formed is not None:
                return formed
            self.s.checkin(wid, local_step)
            if self._try_form() is not None:
                self.cv.notify_all()
            while True:
                formed = self._formed_for(wid, prev_gen)
                if formed is not None:
                    return formed
                if self.s.lost is not None:
                    return {"action": "stop", "reason": self.s.lost}
                left = deadline - time.time()
                if left <= 0 or self.stopping:
                    return {"action": "wait"}
                self.cv.wait(left)

    def _formed_for(self, wid: str, prev_gen: int) -> Optional[dict]:
        g = self.s.gen
        if g is None or g.gen <= prev_gen:
            return None
        if wid in g.members:
            if self.checkpoint_reads_pending(g, wid):
                self.checkpoint_reads += 1
            return {"action": "join", "gen": g.to_dict(), "rank": g.members.index(wid)}
        if wid in self.s.released:
            self.heartbeats.pop(wid, None)  # it stops now: silence from it is not a hang
            return {"action": "stop", "reason": "scaled down"}
        return None

    @staticmethod
    def checkpoint_reads_pending(g: Generation, wid: str) -> bool:
        return g.restore_path is not None and g.members.index(wid) == g.source_rank

    def publish_store(self, gen: int, host: str, port: int) -> None:
        with self.cv:
            self._event("store_published")
            self.store_addr[gen] = (host, port)
            self.cv.notify_all()

    def store_address(self, gen: int, timeout: float = 0.5) -> dict:
        deadline = time.time() + timeout
        with self.cv:
            while True:
                if gen in self.store_addr:
                    host, port = self.store_addr[gen]
                    return {"host": host, "port": port}
                if self.s.gen is None or self.s.gen.gen != gen or self.s.broken or self.stopping:
                    return {"abandon": True}
                left = deadline - time.time()
                if left <= 0:
                    return {"wait": True}
                self.cv.wait(left)

    def generation_open(self, gen: int) -> bool:
        """Whether generation ``gen`` is still the one forming or training (no member lost)."""
        with self.cv:
            return self.s.gen is not None and self.s.gen.gen == gen and not self.s.broken and not self.stopping

    def set_restore(self, path: str, step: int, cursor: int) -> None:
        with self.cv:
            self.s.set_restore(path, step, cursor)

    # supervision ------------------------------------------------------------------------------
    def tick(self) -> dict:
        now = time.time()
        with self.cv:
            hung = [w for w, t in self.heartbeats.items() if now - t > self.dead_after_s and w not in self.s.dead]
            return {"target": self.s.target, "hung": hung, "lost": self.s.lost, "cursor": self.s.cursor,
                    "released": sorted(self.s.released)}

    def status(self) -> dict:
        with self.cv:
            out = self.s.summary()
            g = self.s.gen
            out.update({
                "members": [] if g is None else [{"worker": w, "rank": i, "pid": self.pids.get(w)}
                                                 for i, w in enumerate(g.members) if w not in self.s.dead],
                "recoveries": list(self.recoveries), "joins": list(self.joins),
                # the newest 10,000 steps: status() is polled while training, it must stay small
                "losses": sorted(self.s.losses.items())[-10_000:], "lost": self.s.lost,
                "disaster_checkpoints": list(self.checkpoints), "checkpoint_reads": self.checkpoint_reads,
                "errors": list(self.errors), "stop_step": self.s.stop_step,
                # why members left a generation (a failed collective, an abandoned step): newest 100
                "failures": list(self.failures),
                "rows_acked": self.rows_acked,
            })
            return out

    def sample_ledger(self) -> Dict[int, int]:
        with self.cv:
            return dict(self.s.ledger)

    def shutdown(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()


# ------------------------------------------------------------------------------------------
# worker actor
# ------------------------------------------------------------------------------------------
class _Worker:
    """One replica. ``serve()`` runs until the coordinator says stop; it returns normally only then."""

    def __init__(self, wid: str, coordinator: str, make_model: Callable, make_optimizer: Callable,
                 loss_fn: Callable, stream: Any, config: dict, spawned_at: float,
                 stores: Optional[Dict[str, Any]] = None, table_ids: Optional[Callable] = None) -> None:
        torch.set_num_threads(1)  # replicas share the machine's cores with each other
        self.wid, self.cfg, self.spawned_at = wid, config, spawned_at
        self.coord = ray.get_actor(coordinator, namespace=NAMESPACE)
        self.device = torch.device("cuda", 0) if config["backend"] == "nccl" else torch.device("cpu")
        # NCCL: the live group (None under gloo, whose collectives fail by themselves when a peer
        # dies), its generation, since when the main thread waits on its collectives (0: not now),
        # and the generation whose collectives this member aborted, with why.
        self._pg: Any = None
        self._comm_gen, self._comm_since = 0, 0.0
        self._aborted_gen, self._abort_why = 0, ""
        self._abort_lock = threading.Lock()
        if self.device.type == "cuda":
            # Ray narrows CUDA_VISIBLE_DEVICES to the one GPU it gave this actor (num_gpus=1): it is cuda:0 here.
            if torch.cuda.device_count() < 1:
                raise RuntimeError(f"worker {wid} has no CUDA device (CUDA_VISIBLE_DEVICES="
                                   f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): backend='nccl' needs a Ray "
                                   "cluster with a GPU per worker (ray.init(num_gpus=...))")
            torch.cuda.set_device(self.device)
            # A dead peer makes an NCCL collective hang, not fail; this worker aborts the communicator
            # itself when the generation ends (_abort_collectives). The watchdog must not act on its own:
            # its default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) ends the whole process on a communicator
            # error or timeout, the survivor with the dead. Read when the process group is built.
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        self.model = make_model().to(self.device)
        # A factory that builds the optimizer from the whole model (a LightningModule's
        # configure_optimizers) says so; the default takes the parameter list.
        self.opt = make_optimizer(self.model) if getattr(make_optimizer, "takes_model", False) else \
            make_optimizer(list(self.model.parameters()))
        self.loss_fn, self.stream = loss_fn, stream
        self._init_tables(stores or {}, table_ids)
        self.step = NO_STATE
        self.gen = 0
        #: event -> wall time, from leaving a group to the next group's first step; sent with that
        #: step's report (the coordinator files it with a recovery: where its seconds went)
        self._timeline: Dict[str, float] = {}
        self._grad_views: Optional[List[tuple]] = None
        self._flat_grads: List[torch.Tensor] = []
        self._stop_heartbeat = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True, name="gauss-elastic-heartbeat").start()
        # A step whose generation ends (a peer died) is abandoned wherever its forward or backward
        # is: every module checks the flag before its forward, every parameter after its gradient.
        self._abandon = threading.Event()
        self._lost_gen = 0  # the generation in which a peer link saw a peer die
        self._links: Optional[PeerLinks] = None
        self._step_gen, self._step_started = 0, 0.0
        for module in self.model.modules():
            module.register_forward_pre_hook(self._check_abandon)
        for p in self.model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._check_abandon)
        threading.Thread(target=self._watch_generation, daemon=True, name="gauss-elastic-watch").start()

    def _init_tables(self, stores: Dict[str, Any], table_ids: Optional[Callable]) -> None:
        """Back each dynamic table by its shared store (:mod:`gauss_plugins.elastic.rows`)."""
        self.tables = tables_of(self.model)
        self.table_ids = table_ids
        self.rowlog: Optional[RowCommitLog] = None
        if not self.tables:
            return
        missing = sorted(set(self.tables) - set(stores))
        if missing or table_ids is None:
            raise ValueError(f"the model has dynamic tables {sorted(self.tables)}: pass ElasticTrainer(stores={{name: "
                             f"store}}, table_ids=fn) with a shared store for each (missing: {missing}) and "
                             "table_ids(batch) -> {name: ids the step looks up}")
        for name, table in self.tables.items():
            check_table(table)
            if self.device.type == "cuda" and table.device.type != "cuda":
                raise ValueError(f"dynamic table {name!r} is on {table.device}, but backend='nccl' runs the row "
                                 "collectives over NCCL, which moves CUDA tensors only: build the table with "
                                 "DynamicTableConfig(device='cuda')")
            if table.backing is None:
                table.attach_store(stores[name])
            # Every replica applies the group-averaged row update (below), so they stay identical.
            table.synchronized_replicas = True
        from gauss_plugins.embedding import SparseOptimizer
        from gauss_integrations.lightning.strategy import reduce_row_gradients

        self._reduce_rows = reduce_row_gradients
        self.sparse_opt = SparseOptimizer(list(self.tables.values()))
        self.rowlog = RowCommitLog(self.tables)

    def _heartbeat(self) -> None:
        while not self._stop_heartbeat.wait(self.cfg["heartbeat_s"]):
            try:
                self.coord.heartbeat.remote(self.wid)
            except Exception:  # the coordinator is gone: serve() reports that, not this thread
                return

    def _on_peer_lost(self, gen: int, rank: int, why: str) -> None:
        """A peer link ended without a goodbye: abandon this generation's step now (a step of
        another generation is left alone) and tell the coordinator, which declares the peer dead."""
        self._lost_gen = gen
        if self._step_gen == gen:
            self._abandon.set()
        try:
            self.coord.peer_lost.remote(self.wid, gen, rank, why)
        except Exception:  # the coordinator is gone: serve() reports that, not this thread
            pass
        self._abort_collectives(gen, f"peer rank {rank} lost: {why}")  # after the report: it is the slower

    def _check_abandon(self, *_: Any) -> None:
        if self._abandon.is_set():
            raise _StepAbandoned(f"generation {self._step_gen} ended while {self.wid} computed a step")

    def _watch_generation(self) -> None:
        """While a step's forward/backward runs longer than ``WATCH_AFTER_S``, ask the coordinator
        every 50 ms whether its generation still stands. Without this a survivor notices a dead
        peer only at the step's all-reduce, after computing a gradient it must throw away (at a
        1.8 GB state, most of a second). Short steps never ask: the all-reduce comes soon."""
        while not self._stop_heartbeat.wait(0.05):
            if self._pg is not None and not self._watch_collectives():
                return
            gen = self._step_gen
            if not gen or time.time() - self._step_started < WATCH_AFTER_S:
                continue
            try:
                still = ray.get(self.coord.generation_open.remote(gen), timeout=5)
            except Exception:  # the coordinator is gone: serve() reports that, not this thread
                return
            if not still and self._step_gen == gen:
                self._abandon.set()

    def _watch_collectives(self) -> bool:
        """NCCL: while the main thread has waited on collectives for over ``WATCH_AFTER_S``, ask the
        coordinator whether their generation still stands, and abort them when it does not (a peer
        died: they would wait forever) or when the wait passed ``step_timeout_s`` (gloo's own
        timeout). Returns False when the coordinator is gone."""
        gen, since = self._comm_gen, self._comm_since
        if not gen or not since or time.time() - since < WATCH_AFTER_S:
            return True
        if time.time() - since > self.cfg["step_timeout_s"]:
            self._abort_collectives(gen, f"collectives waited over step_timeout_s={self.cfg['step_timeout_s']} s")
            return True
        try:
            still = ray.get(self.coord.generation_open.remote(gen), timeout=5)
        except Exception:  # the coordinator is gone: serve() reports that, not this thread
            return False
        if not still:
            self._abort_collectives(gen, "the coordinator closed the generation")
        return True

    def _abort_collectives(self, gen: int, why: str) -> None:
        """NCCL: abort the communicator of generation ``gen`` (from a watching thread): the kernels
        of its hung collectives exit and the main thread's wait returns, to find
        :attr:`_aborted_gen` set (before the abort, so it is seen) and drop what it waited for."""
        with self._abort_lock:
            if self._pg is None or self._comm_gen != gen or self._aborted_gen == gen:
                return
            self._aborted_gen, self._abort_why = gen, why
            try:
                self._pg.abort()
            except Exception as exc:  # called from a watching thread: say so where the logs go
                print(f"gauss-elastic {self.wid}: aborting generation {gen}'s NCCL group failed "
                      f"({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)

    def _collectives_done(self, g: Generation, more: bool = False) -> None:
        """NCCL: wait on the host until the collectives queued so far ran (an NCCL call returns once
        queued), then raise :class:`_CollectivesAborted` if they were aborted meanwhile: nothing
        may read their results, write rows on their strength or report the step then. ``more``:
        further collectives follow (the watch goes on). Under gloo the collectives already ran and
        cannot have been aborted: nothing to do."""
        if self._pg is not None:
            torch.cuda.current_stream(self.device).synchronize()
            self._comm_since = time.time() if more else 0.0
            if self._aborted_gen == g.gen:
                raise _CollectivesAborted(f"generation {g.gen}: {self.wid} aborted its NCCL collectives "
                                          f"({self._abort_why}); their results are dropped")

    def _destroy_group(self) -> None:
        import torch.distributed as dist

        with self._abort_lock:
            nccl, self._pg, self._comm_gen, self._comm_since = self._pg is not None, None, 0, 0.0
        if nccl:
            # A group that ended on a dead peer may hold collectives that never finish, and
            # destroy_process_group finalizes the communicator, which waits for them: abort instead
            # (also after an orderly end: it frees the same resources).
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as exc:
                # This process's NCCL state is unknown now. Leave as a dead worker does (the supervisor
                # replaces it from a live peer) rather than raise, which would stop the job as if the
                # user's code had failed.
                print(f"gauss-elastic {self.wid}: tearing down the NCCL group failed ({type(exc).__name__}: "
                      f"{exc}); this worker exits and is replaced", file=sys.stderr, flush=True)
                os._exit(1)
        else:
            dist.destroy_process_group()

    def _call(self, ref):
        return ray.get(ref, timeout=self.cfg["step_timeout_s"])

    def state(self) -> tuple:
        """``(step, spec, tensors)`` of this replica (:func:`pack_state`). Runs beside ``serve()``
        (the actor has two threads): ask only while training is paused, as
        :meth:`ElasticTrainer.fetch_state` does, so no step changes the state while it is copied."""
        spec, tensors = pack_state(self.model, self.opt)
        return self.step, spec, [t.detach().cpu().clone() for t in tensors]

    def content_digest(self) -> tuple:
        """``(step, sha256)`` of what this replica has learned: the dense state and each table's
        rows and optimizer state by ascending id (row numbers and stamps differ between replicas
        that admitted ids in another order, so they are left out). Ask only while paused."""
        import hashlib

        h = hashlib.sha256()
        table_prefixes = tuple(f"{n}." for n, m in self.model.named_modules() if m in self.tables.values() and n)
        for name, t in sorted(self.model.state_dict().items()):
            if not table_prefixes or not name.startswith(table_prefixes):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        for name in sorted(self.tables):
            table = self.tables[name]
            ids = table.index.keys_and_rows()[0].sort().values
            rows = table.find(ids)
            h.update(ids.cpu().numpy().tobytes())
            h.update(table.weight.index_select(0, rows).float().cpu().numpy().tobytes())
            state = pack_table_state(table, rows)
            if state is not None:
                h.update(state.numpy().tobytes())
        for group in self.opt.state_dict()["state"].values():
            for key, value in sorted(group.items()):
                if isinstance(value, torch.Tensor):
                    h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return self.step, h.hexdigest()

    def write_rows(self) -> dict:
        """Write the snapshots rank 0 still holds (the paused step's rows). Like :meth:`state`, ask
        only while training is paused: the paused step is committed then."""
        if self.rowlog is None:
            return {"step": self.step, "written": 0, "acked_step": 0}
        written = self.rowlog.write_pending()
        return {"step": self.step, "written": written, "acked_step": self.rowlog.acked_step}

    def serve(self) -> str:
        import torch.distributed as dist

        self._call(self.coord.register.remote(self.wid, os.getpid(), self.spawned_at))
        while True:
            answer = self._call(self.coord.checkin.remote(self.wid, self.step, self.gen))
            if answer["action"] == "wait":
                continue
            if answer["action"] == "stop":
                self._stop_heartbeat.set()
                return answer.get("reason", "stopped")
            g = Generation(**{**answer["gen"], "members": tuple(answer["gen"]["members"])})
            rank = answer["rank"]
            self.gen = g.gen
            self._timeline["joined"] = time.time()
            try:
                if self._form_group(g, rank):
                    self._sync(g, rank)
                    self._train(g, rank)
            except (ray.exceptions.RayActorError, ElasticWorkerError):
                raise
            except Exception as exc:  # a collective failed: a peer died, hung or left
                self._timeline = {"left": time.time()}
                self.coord.report_failure.remote(self.wid, g.gen, f"{type(exc).__name__}: {exc}")
            finally:
                if self.rowlog is not None:
                    self.rowlog.discard()  # a snapshot of this group is never written by the next
                if self._links is not None:
                    self._links.close()  # with a goodbye: the peers must not take this member for dead
                    self._links = None
                if dist.is_initialized():
                    self._destroy_group()
                self._timeline["group_destroyed"] = time.time()

    def _form_group(self, g: Generation, rank: int) -> bool:
        import torch.distributed as dist

        timeout = timedelta(seconds=self.cfg["step_timeout_s"])
        if rank == 0:
            host = ray.util.get_node_ip_address()
            store = dist.TCPStore(host, 0, g.world, is_master=True, wait_for_workers=False, timeout=timeout)
            self.coord.publish_store.remote(g.gen, host, store.port)
        else:
            while True:
                addr = self._call(self.coord.store_address.remote(g.gen))
                if addr.get("abandon"):
                    return False
                if "port" in addr:
                    break
            store = dist.TCPStore(addr["host"], addr["port"], g.world, is_master=False, timeout=timeout)
        self._store = store  # one store per generation: a new port, nothing left from the last group
        self._timeline["store"] = time.time()
        links = None
        if g.world > 1:
            # Published before arriving: once every member arrived, every address is there.
            links = self._links = PeerLinks.listen(ray.util.get_node_ip_address())
            store.set(f"gauss/link/{rank}", links.address)
        if not self._all_reached_store(store, g):
            return False
        if self.device.type == "cuda":
            # device_id: the NCCL communicator is built now, while every member is known to be here,
            # not inside the first collective (where a member lost meanwhile could not be aborted).
            dist.init_process_group("nccl", store=store, rank=rank, world_size=g.world, timeout=timeout,
                                    device_id=self.device)
            with self._abort_lock:
                self._pg, self._comm_gen, self._comm_since = dist.group.WORLD, g.gen, 0.0
        else:
            dist.init_process_group(self.cfg["backend"], store=store, rank=rank, world_size=g.world, timeout=timeout)
        if links is not None:
            addresses = {r: store.get(f"gauss/link/{r}").decode() for r in range(rank)}
            links.connect(rank, addresses, lambda peer, why, gen=g.gen: self._on_peer_lost(gen, peer, why))
        self._timeline["group_formed"] = time.time()
        return True

    def _all_reached_store(self, store: Any, g: Generation) -> bool:
        """Wait until every member reached the generation's store, asking the coordinator
        meanwhile whether the generation was abandoned: ``init_process_group`` would wait the
        whole ``step_timeout_s`` for a member that died while the group formed."""
        store.add("gauss/arrived", 1)
        deadline = time.time() + self.cfg["step_timeout_s"]
        asked = 0.0
        while int(store.add("gauss/arrived", 0)) < g.world:
            now = time.time()
            if now - asked >= 0.05:
                if not self._call(self.coord.generation_open.remote(g.gen)):
                    return False
                asked = now
            if now > deadline:
                raise TimeoutError(f"generation {g.gen}: not every member reached its store within "
                                   f"step_timeout_s={self.cfg['step_timeout_s']} s")
            time.sleep(0.005)
        return True

    def _sync(self, g: Generation, rank: int) -> None:
        if g.transfer:
            if g.restore_path is not None and rank == g.source_rank:
                load_disaster_checkpoint(g.restore_path, self.model, self.opt)
            if self._pg is not None:
                if rank != g.source_rank:
                    # An aborted NCCL broadcast leaves garbage that may already be loaded: until the
                    # transfer is known good this replica holds no state a later group may trust.
                    self.step = NO_STATE
                self._comm_since = time.time()
            broadcast_state(self.model, self.opt, g.source_rank, self.device)
            self._collectives_done(g)
        elif self.step != g.step0:
            raise RuntimeError(f"{self.wid} holds step {self.step}, generation {g.gen} starts at {g.step0} "
                               "without a transfer")
        self.step = g.step0
        if self.rowlog is not None:
            for table in self.tables.values():
                table.zero_grad()
                table.backing.reset(table)  # rows may have come by broadcast: none is known clean
            if rank == 0:
                # The group starts from step0, which a member finished (committed): its rows go to
                # the store now, so rows whose snapshot died with the last rank 0 are not lost.
                self.rowlog.write_all(g.step0)
        self._timeline["synced"] = time.time()

    def _train(self, g: Generation, rank: int) -> None:
        report = None
        while True:
            act = self._call(self.coord.next_action.remote(self.wid, g.gen, self.step, report))
            report = None
            if act == "step":
                report = self._one_step(g, rank, self.step + 1)
            elif act in ("regroup", "stop"):
                return

    def _grad_buffers(self) -> List[torch.Tensor]:
        """One flat gradient buffer per dtype, every ``p.grad`` a view of it (as DDP's
        ``gradient_as_bucket_view``): backward accumulates into the buffer and the all-reduce
        and the averaging run on it in place, so a step makes no full-size gradient copy (at a
        1.8 GB state the old concatenate-then-clone cost two 0.6 GB copies a step)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._grad_views is None or len(self._grad_views) != len(params):
            by_dtype: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p)
            self._flat_grads, self._grad_views = [], []
            for dtype in sorted(by_dtype, key=str):  # the same order on every rank
                group = by_dtype[dtype]
                flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=self.device)
                offset = 0
                for p in group:
                    self._grad_views.append((p, flat[offset:offset + p.numel()].view_as(p)))
                    offset += p.numel()
                self._flat_grads.append(flat)
        for p, view in self._grad_views:
            if p.grad is not view:  # set to None or replaced by user code: back into the buffer
                if p.grad is not None:
                    view.copy_(p.grad)
                else:
                    view.zero_()
                p.grad = view
        return self._flat_grads

    def _one_step(self, g: Generation, rank: int, step: int) -> dict:
        import torch.distributed as dist

        idx = sample_indices(g, step, rank)
        first = step == g.step0 + 1  # the generation's first step: its phases go in the timeline
        if first:
            self._timeline["step_started"] = time.time()
        flats = self._grad_buffers()
        try:
            batch = self.stream.batch(idx)
            if isinstance(batch, (tuple, list)):
                batch = type(batch)(b.to(self.device) if isinstance(b, torch.Tensor) else b for b in batch)
            for flat in flats:
                flat.zero_()
            self._abandon.clear()
            self._step_gen, self._step_started = g.gen, time.time()
            if self._lost_gen == g.gen:  # a peer died before this step began
                self._abandon.set()
            loss = self.loss_fn(self.model, batch)
            loss.backward()
        except _StepAbandoned:
            raise  # serve() reports it like a failed collective: the group re-forms
        except Exception as exc:
            raise ElasticWorkerError(f"step {step} on worker {self.wid} (rank {rank}) failed in the stream, model "
                                     f"or loss: {type(exc).__name__}: {exc}") from exc
        finally:
            # From the all-reduce on the step may be committed through this member: never abandon it then.
            self._step_gen = 0
        flats = self._grad_buffers()  # re-binds any grad the loss replaced (the buffers stay)
        if self._pg is not None:
            self._comm_since = time.time()
        if first:
            self._timeline["backward_done"] = time.time()
        all_idx = torch.zeros(g.world * g.batch_size, dtype=torch.int64, device=self.device)
        all_idx[rank * g.batch_size:(rank + 1) * g.batch_size] = idx.to(self.device)
        losses = torch.zeros(g.world, dtype=torch.float64, device=self.device)
        losses[rank] = float(loss.detach())
        # The step's sample indices travel with it: a member that finishes the step knows
        # exactly which samples every member trained, which is what the ledger records.
        dist.all_reduce(all_idx)
        dist.all_reduce(losses)
        if g.world > 1:
            for flat in flats:
                dist.all_reduce(flat)
                flat.div_(g.world)
        # NCCL: before the optimizer reads the gradients, and before rank 0 writes the last
        # step's rows on the strength of this all-reduce, it must have run, and not been aborted.
        self._collectives_done(g)
        if first:
            self._timeline["all_reduce_done"] = time.time()
        acked = None
        if self.rowlog is not None:
            if self._pg is not None:
                self._comm_since = time.time()
            acked = self._row_step(g, rank, step, batch)
            self._collectives_done(g)
        # A loss object may own the update (a LightningModule's optimizer_step hook, which also
        # steps what the optimizer does not hold); the default is the optimizer's step.
        apply_step = getattr(self.loss_fn, "apply_step", None)
        if apply_step is not None:
            apply_step(self.model, self.opt, step)
        else:
            self.opt.step()
        if self.rowlog is not None:
            self.sparse_opt.step()
            if rank == 0:
                self.rowlog.applied(step, self._step_ids)
        self.step = step
        report = {"indices": all_idx.cpu().tolist(), "loss": float(losses.mean())}
        if first:
            self._timeline["optimizer_done"] = time.time()
            report["timeline"], self._timeline = self._timeline, {}
        if acked is not None:
            report["rows_acked"] = acked
        every = self.cfg["disaster_checkpoint_every"]
        if every and rank == 0 and step % every == 0:
            path = save_disaster_checkpoint(self.cfg["checkpoint_dir"], step, g.cursor_after(step), self.model,
                                            self.opt)
            report["checkpoint"] = {"step": step, "path": path}
        return report


    def _row_step(self, g: Generation, rank: int, step: int, batch: Any) -> Optional[dict]:
        """Average the row gradients over the group for the global batch's ids; on rank 0, write
        the previous step's rows first: this step's all-reduce completed, so every member
        finished it (the write-after-next-commit rule). Returns the acknowledgement, if any."""
        acked = None
        if rank == 0 and self.rowlog.pending:
            written = self.rowlog.committed_through(step - 1)
            acked = {"step": self.rowlog.acked_step, "rows": written}
        local = self.table_ids(batch)
        self._step_ids = {}
        for name in sorted(self.tables):  # the same order of collectives on every rank
            table = self.tables[name]
            ids = gather_ids(local.get(name, torch.empty(0, dtype=torch.int64)), g.world, table.device)
            self._collectives_done(g, more=True)  # NCCL: an aborted gather's ids would put garbage rows in the table
            install_ids(table, ids)
            self._reduce_rows(table, ids, world=g.world)
            self._step_ids[name] = ids
        return acked


_CoordinatorActor = ray.remote(_Coordinator)
_WorkerActor = ray.remote(_Worker)


def get_coordinator(name: str = "gauss-elastic"):
    """The running coordinator actor ``name`` (Ray must be initialised); a clear error if none runs."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError(f"no elastic coordinator named {name!r} runs in namespace {NAMESPACE!r} of this Ray "
                           "cluster: start an ElasticTrainer first (or pass the --name / --address it uses)") from None


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
class ElasticTrainer:
    """Run data-parallel replicas on Ray with live recovery and scaling (see the module docstring).

    ``stream.batch(indices: LongTensor) -> batch`` must be deterministic in the indices: a sample
    is addressed by its global index, which is what lets abandoned steps be re-assigned exactly.
    """

    def __init__(self, make_model: Callable[[], torch.nn.Module], make_optimizer: Callable[[Any], Any],
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], stream: Any,
                 config: Optional[ElasticConfig] = None,
                 stores: Union[Dict[str, Any], Callable[[], Dict[str, Any]], None] = None,
                 table_ids: Optional[Callable[[Any], Dict[str, torch.Tensor]]] = None) -> None:
        if not hasattr(stream, "batch"):
            raise TypeError("stream must have batch(indices: LongTensor) -> batch (samples by global index)")
        self.make_model, self.make_optimizer, self.loss_fn, self.stream = make_model, make_optimizer, loss_fn, stream
        # Dynamic tables: name -> the store every replica's table of that name is backed by (it
        # must outlive the workers: a ShardedTierPS), or a function making that dict once Ray runs
        # (start() may be what starts Ray); table_ids(batch) -> {name: ids the step looks up}.
        self.stores, self.table_ids = stores if callable(stores) else dict(stores or {}), table_ids
        self.config = config or ElasticConfig()
        if self.config.backlog_samples_per_worker and not hasattr(stream, "backlog"):
            raise TypeError("backlog_samples_per_worker needs a stream with backlog(cursor) -> int")
        self._coord = None
        self._coord_pid: Optional[int] = None
        self._workers: Dict[str, Any] = {}
        self._refs: Dict[Any, str] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._owns_ray = False
        self._stop = threading.Event()
        self._supervisor: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None

    # lifecycle --------------------------------------------------------------------------------
    def start(self, from_checkpoint: Optional[str] = None, timeout_s: float = 180.0) -> "ElasticTrainer":
        """Start the coordinator and ``num_workers`` workers; return when the first group formed.

        ``from_checkpoint``: a disaster checkpoint (:func:`latest_disaster_checkpoint`) the first
        generation starts from, after all replicas or the coordinator were lost.
        """
        if self._coord is not None:
            raise RuntimeError("this ElasticTrainer already started")
        cfg = self.config
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # Ray's socket paths must stay under 107 bytes: a short temp dir of our own.
            temp = cfg.ray_temp_dir or tempfile.mkdtemp(prefix=f"gray-{os.getpid()}-", dir="/tmp")
            ray.init(_temp_dir=temp, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        try:
            ray.get_actor(cfg.name, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise RuntimeError(f"an elastic coordinator named {cfg.name!r} already runs on this Ray cluster: "
                               "shut that trainer down or give this one another ElasticConfig(name=...)")
        if callable(self.stores):
            self.stores = dict(self.stores())
        restore = None
        if from_checkpoint is not None:
            restore = (from_checkpoint, *load_disaster_checkpoint(from_checkpoint))  # verifies the CRC now
        self._coord = _CoordinatorActor.options(name=cfg.name, namespace=NAMESPACE, num_cpus=0,
                                                max_concurrency=64).remote(
            cfg.batch_size, cfg.min_workers, cfg.num_workers, cfg.max_workers, cfg.dead_after_s)
        self._coord_pid = ray.get(self._coord.pid.remote())
        if restore is not None:
            ray.get(self._coord.set_restore.remote(*restore))
        for _ in range(cfg.num_workers):
            self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="gauss-elastic-supervisor")
        self._supervisor.start()
        self._wait(lambda st: st["generation"] >= 1, timeout_s, "the first generation to form")
        return self

    def shutdown(self) -> None:
        """Stop the workers and the coordinator (and Ray, if this trainer started it)."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        if self._coord is not None:
            try:
                ray.get(self._coord.shutdown.remote(), timeout=5)
                ray.wait(list(self._refs), num_returns=len(self._refs), timeout=10)
            except Exception:  # already dead: nothing to ask it
                pass
        for actor in list(self._workers.values()):
            ray.kill(actor)
        if self._coord is not None:
            ray.kill(self._coord)
        self._workers.clear()
        self._refs.clear()
        self._coord = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # training -----------------------------------------------------------------------------------
    def run(self, steps: int, timeout_s: Optional[float] = None) -> dict:
        """Train ``steps`` more committed steps; return the status."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        target = self.status()["step"] + steps
        self._call(self._coord.set_stop.remote(target))
        return self._wait(lambda st: st["step"] >= target, timeout_s, f"step {target}")

    def run_until(self, predicate: Callable[[dict], bool], timeout_s: Optional[float] = None) -> dict:
        """Train until ``predicate(status())`` holds, then stop at the next step boundary."""
        self._call(self._coord.set_stop.remote(None))
        try:
            self._wait(predicate, timeout_s, "the run_until condition")
        except TimeoutError:
            self._call(self._coord.pause.remote())  # leave the workers waiting, not running away
            raise
        stop = self._call(self._coord.pause.remote())
        return self._wait(lambda st: st["step"] >= stop, timeout_s, f"step {stop}")

    def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` workers at the next step boundary (training must be running
        for the boundary to come)."""
        cfg = self.config
        if not cfg.min_workers <= n <= cfg.max_workers:
            raise ValueError(f"cannot scale to {n}: allowed {cfg.min_workers}..{cfg.max_workers} workers")
        self._call(self._coord.set_target.remote(n))

    def kill_worker(self, rank: int, signal: int = _signal.SIGKILL) -> int:
        """Send ``signal`` to the process of the member at ``rank`` (local cluster); returns its pid."""
        members = self.status()["members"]
        match = [m for m in members if m["rank"] == rank]
        if not match:
            raise ValueError(f"no member at rank {rank}; members: {[m['rank'] for m in members]}")
        # The clock starts at the signal itself; the note follows it (a note sent first would
        # count its own round trip as recovery time).
        t = time.time()
        os.kill(match[0]["pid"], signal)
        self._call(self._coord.note_kill.remote(match[0]["worker"], t))
        return match[0]["pid"]

    def status(self) -> dict:
        return self._call(self._coord.status.remote())

    def sample_ledger(self) -> Dict[int, int]:
        """Global sample index -> how many committed steps trained it."""
        return self._call(self._coord.sample_ledger.remote())

    def fetch_state(self, model: torch.nn.Module, optimizer: Any) -> int:
        """Load the trained weights and optimizer state of the live member at rank 0 into
        ``model`` and ``optimizer`` (the driver's copies, same structure); returns its step.
        Call between runs (after :meth:`run` / :meth:`run_until` returned): training is paused
        then, so the replica's state is a committed step's."""
        st, rank0 = self._paused_rank0("fetch_state", "fetch the state from")
        step, spec, tensors = ray.get(rank0.state.remote(), timeout=600)
        if step != st["step"]:
            raise RuntimeError(f"rank 0 holds step {step}, the job committed {st['step']}: fetch again once "
                               "the group settled")
        unpack_state(spec, tensors, model, optimizer)
        return step

    def write_rows(self) -> dict:
        """Have rank 0 write the rows of the paused (committed) step to the stores; returns
        ``{"step", "written", "acked_step"}``. Call between runs, like :meth:`fetch_state`."""
        _, rank0 = self._paused_rank0("write_rows", "write the rows")
        return ray.get(rank0.write_rows.remote(), timeout=600)

    def _paused_rank0(self, what: str, purpose: str) -> tuple:
        """(status, actor of the live rank-0 member), once training is paused; a clear error else."""
        st = self.status()
        if st["stop_step"] is None or st["step"] < st["stop_step"]:
            raise RuntimeError(f"{what} needs training paused: call it after run() or run_until() returned")
        members = [m for m in st["members"] if m["rank"] == 0]
        if not members or members[0]["worker"] not in self._workers:
            raise RuntimeError(f"no live member at rank 0 to {purpose} (members: {st['members']})")
        return st, self._workers[members[0]["worker"]]

    def replica_digests(self) -> Dict[int, tuple]:
        """rank -> ``(step, sha256 of the learned content)`` of every live member (equal digests:
        the replicas agree). Call between runs, like :meth:`fetch_state`."""
        st = self.status()
        if st["stop_step"] is None or st["step"] < st["stop_step"]:
            raise RuntimeError("replica_digests needs training paused: call it after run() or run_until() returned")
        members = [m for m in st["members"] if m["worker"] in self._workers]
        refs = [self._workers[m["worker"]].content_digest.remote() for m in members]
        return {m["rank"]: d for m, d in zip(members, ray.get(refs, timeout=600))}

    def worker_pids(self) -> Dict[int, int]:
        return {m["rank"]: m["pid"] for m in self.status()["members"]}

    def coordinator_pid(self) -> Optional[int]:
        return self._coord_pid

    # internals ----------------------------------------------------------------------------------
    def _lost_message(self) -> str:
        cfg = self.config
        latest = latest_disaster_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        where = (f"the latest disaster checkpoint is {latest}: start a new ElasticTrainer with "
                 f"start(from_checkpoint={latest!r})") if latest else \
            "no disaster checkpoint exists (set disaster_checkpoint_every and checkpoint_dir to have one)"
        return (f"the elastic coordinator {cfg.name!r} died: the job's membership, step and data cursor died with "
                f"it and its workers stop; {where}")

    def _call(self, ref, timeout: float = 60.0):
        if self._coord is None:
            raise RuntimeError("the ElasticTrainer is not running: call start() first")
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayActorError:
            raise ElasticCoordinatorLost(self._lost_message()) from None

    def _wait(self, predicate: Callable[[dict], bool], timeout_s: Optional[float], what: str) -> dict:
        deadline = None if timeout_s is None else time.time() + timeout_s
        while True:
            if self._failure is not None:
                raise self._failure
            st = self.status()
            if st["lost"]:
                raise AllReplicasLostError(st["lost"])
            if predicate(st):
                return st
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"gave up waiting for {what} after {timeout_s} s; status: "
                                   f"{ {k: st[k] for k in ('step', 'workers', 'generation', 'errors')} }")
            time.sleep(0.02)

    def _spawn(self) -> None:
        cfg = self.config
        wid = f"w{self._next_id}"
        self._next_id += 1
        # Two threads: serve() in one, state() (fetch_state, while paused) in the other.
        options: Dict[str, Any] = {"num_cpus": 0, "max_concurrency": 2}
        if cfg.backend == "nccl":
            options["num_gpus"] = 1
        if cfg.huge_pages:  # read once, when torch's CPU allocator starts: it must be in the process's env
            options["runtime_env"] = {"env_vars": {"THP_MEM_ALLOC_ENABLE": "1"}}
        actor = _WorkerActor.options(**options).remote(
            wid, cfg.name, self.make_model, self.make_optimizer, self.loss_fn, self.stream, asdict(cfg), time.time(),
            self.stores, self.table_ids)
        with self._lock:
            self._workers[wid] = actor
            self._refs[actor.serve.remote()] = wid

    def _supervise(self) -> None:
        cfg = self.config
        while not self._stop.wait(0.05):
            try:
                with self._lock:
                    refs = list(self._refs)
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
                for ref in ready:
                    wid = self._refs.pop(ref)
                    actor = self._workers.pop(wid)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        if self._coord_alive():
                            ray.get(self._coord.mark_dead.remote(wid, ""))
                        else:
                            raise ElasticCoordinatorLost(self._lost_message()) from exc
                    except Exception as exc:  # the user's code raised in the worker: stop the job
                        ray.kill(actor)
                        ray.get(self._coord.mark_dead.remote(wid, f"{type(exc).__name__}: {exc}"))
                        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                        self._failure = ElasticWorkerError(f"worker {wid} failed; fix the error and restart "
                                                           f"(training is paused): {cause}")
                        ray.get(self._coord.pause.remote())
                        return
                    else:
                        ray.kill(actor)  # stopped (scaled down): free its process
                info = ray.get(self._coord.tick.remote(), timeout=30)
                for wid in info["hung"]:
                    # Declared dead (with the reason) before the kill: the kill closes its peer
                    # links, and a peer's report of that must not be the only record.
                    ray.get(self._coord.mark_dead.remote(wid, "no heartbeat"))
                    actor = self._workers.get(wid)
                    if actor is not None:
                        ray.kill(actor)  # a hung process ends; its peers' collectives then fail
                if info["lost"]:
                    continue
                target = info["target"]
                if cfg.backlog_samples_per_worker:
                    want = desired_workers(self.stream.backlog(info["cursor"]), cfg.backlog_samples_per_worker,
                                           cfg.min_workers, cfg.max_workers)
                    if want != target:
                        ray.get(self._coord.set_target.remote(want))
                        target = want
                for _ in range(target - len(self._workers)):
                    self._spawn()
            except ray.exceptions.RayActorError:
                self._failure = ElasticCoordinatorLost(self._lost_message())
                return
            except ElasticCoordinatorLost as exc:
                self._failure = exc
                return

    def _coord_alive(self) -> bool:
        try:
            ray.get(self._coord.pid.remote(), timeout=5)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False
