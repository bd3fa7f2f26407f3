"""Dynamic embedding rows under elastic training: replicated tables, one shared store.

Every replica holds the whole of each dynamic table (a dense replica's copy of it) and applies
the same sparse update each step: the row gradients are averaged over the group for the global
batch's ids (:func:`gather_ids`, then the table's records are replaced by the average, as
``reduce_row_gradients`` does under ``GaussStrategy``). Each table is backed by ONE store shared by
the whole job (a :class:`~gauss_plugins.stores.tierps.TierPS` behind a Ray actor, the
``ShardedTierPS``), which lives in its own processes and so outlives every trainer.

**The write-after-next-commit rule** (:class:`RowCommitLog`). Rank 0 snapshots the rows step
``s`` changed right after applying it, and writes that snapshot to the store only after step
``s + 1``'s all-reduce completed on it. That all-reduce completing means every member of the
group finished step ``s``, so ``s`` is committed and no write belongs to a step that is later
abandoned (whose samples are re-assigned and would be applied twice). A row update counts as
**acknowledged** when the store's ``put`` of the snapshot holding it returned. An acknowledged
update lives in the store's processes: a trainer's death (SIGKILL included) cannot lose it, and
later writes only replace it with a newer committed value. Updates of the newest committed
step are not yet acknowledged while training runs; they are written when the next group forms
(its rank 0 writes every resident row of the step it starts from, which a survivor finished),
or by :meth:`RowCommitLog.write_pending` while training is paused.

Supported tables: ``admission="always"``, no eviction and ``default="zeros"`` (:func:`check_table`),
so every replica holds the same ids and the store's copy of an id is written only while the id is
resident everywhere; an id that enters the tables reads its stored row when the store has one
(a job restarted on the same store continues from it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from gauss_plugins.embedding.backing import pack_state

__all__ = ["RowCommitLog", "RowSnapshot", "check_table", "gather_ids", "install_ids", "tables_of"]


def check_table(table: Any) -> None:
    """Refuse a table whose replicas could hold different ids (see the module docstring)."""
    cfg = table.config
    problems = []
    if cfg.eviction is not None:
        problems.append(f"eviction={cfg.eviction!r} (use eviction=None and a max_capacity that holds the ids)")
    if cfg.admission not in ("always", None):
        problems.append(f"admission={cfg.admission!r} (use admission='always': each replica sees other ids, so "
                        "counting admission would admit different rows on each)")
    if cfg.default != "zeros":
        problems.append(f"default={cfg.default!r} (the shared default row has no id to store; use default='zeros')")
    if not isinstance(cfg.initializer, str):
        problems.append("a callable initializer (replicas must create the same initial row for an id: use a "
                        "built-in initializer name)")
    if problems:
        raise ValueError(f"dynamic table {table.name!r} cannot train elastically: " + "; ".join(problems))


def gather_ids(local: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """The ascending distinct ids every member looked up this step (a collective: all members call it)."""
    import torch.distributed as dist

    local = torch.unique(local.reshape(-1).to(device))
    rank = dist.get_rank()
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[rank] = local.numel()
    dist.all_reduce(counts)
    width = int(counts.max())
    # An all-reduce of zero-padded rows is an all-gather of variable lengths (gloo and NCCL).
    buf = torch.zeros(world, width, dtype=torch.int64, device=device)
    buf[rank, :local.numel()] = local
    dist.all_reduce(buf)
    parts = [buf[r, :int(c)] for r, c in enumerate(counts.tolist())]
    return torch.unique(torch.cat(parts))


@torch.no_grad()
def install_ids(table: Any, ids: torch.Tensor) -> int:
    """Insert the ids of ``ids`` the table lacks (another member looked them up this step): the
    store's row where it holds one, the initializer's otherwise, exactly as that member's
    lookup did. Returns how many were inserted."""
    absent = ids[table.find(ids) < 0]
    if absent.numel():
        got = table.backing.store.lookup(absent.cpu())
        table.backing.install(table, absent, got)
    return int(absent.numel())


@dataclass
class RowSnapshot:
    """One table's rows as a step left them (CPU float32, the store's layout)."""

    ids: torch.Tensor
    values: torch.Tensor
    state: Optional[torch.Tensor]


def snapshot_rows(table: Any, ids: torch.Tensor) -> RowSnapshot:
    rows = table.find(ids)
    if bool((rows < 0).any()):
        raise RuntimeError(f"table {table.name!r} lost rows of this step's ids: {ids[rows < 0][:5].tolist()}")
    return RowSnapshot(ids.cpu(), table.weight.index_select(0, rows).to(torch.float32).cpu(), pack_state(table, rows))


class RowCommitLog:
    """Rank 0's pending row writes and the write-after-next-commit rule (module docstring).

    ``tables``: name -> table; each table's store is ``table.backing.store``. Call
    :meth:`applied` after a step's update, :meth:`committed_through` once a later step's
    all-reduce completed, :meth:`discard` when a group ends (an unfinished step's snapshot
    must never be written). ``acked_step`` is the newest step whose rows the store confirmed.
    """

    def __init__(self, tables: Dict[str, Any]) -> None:
        self.tables = tables
        self.pending: Dict[int, Dict[str, RowSnapshot]] = {}
        self.acked_step = 0
        self.acked_rows = 0

    def applied(self, step: int, ids: Dict[str, torch.Tensor]) -> None:
        """Step ``step`` changed the rows of ``ids`` (name -> ids): snapshot them now (the next
        step changes them again before the snapshot may be written)."""
        if self.pending and step <= max(self.pending):
            raise ValueError(f"step {step} applied after step {max(self.pending)}: steps apply in order")
        self.pending[step] = {name: snapshot_rows(self.tables[name], i) for name, i in ids.items()}

    def committed_through(self, step: int) -> int:
        """Every member finished ``step``: write the snapshots of steps <= ``step`` in step order.
        Returns the rows written; :attr:`acked_step` advances as each ``put`` returns."""
        written = 0
        for s in sorted(k for k in self.pending if k <= step):
            for name, snap in self.pending[s].items():
                if snap.ids.numel():
                    self.tables[name].backing.write(snap.ids, snap.values, snap.state)
                    written += snap.ids.numel()
                    self.acked_rows += snap.ids.numel()
            del self.pending[s]
            self.acked_step = s
        return written

    def write_pending(self) -> int:
        """Write every snapshot (only while training is paused at a committed step)."""
        return self.committed_through(max(self.pending)) if self.pending else 0

    def discard(self) -> None:
        """The group ended: drop the snapshots (a finished step's rows are rewritten by the next
        group's rank 0 from its resident rows, :meth:`write_all`)."""
        self.pending.clear()

    def write_all(self, step: int) -> int:
        """Write every resident row of every table: the state after ``step``, which a member of
        the new group finished (so it is committed). Returns the rows written."""
        self.pending.clear()
        written = 0
        for table in self.tables.values():
            ids, _ = table.index.keys_and_rows()
            ids = ids.sort().values
            if ids.numel():
                snap = snapshot_rows(table, ids)
                table.backing.write(snap.ids, snap.values, snap.state)
                written += ids.numel()
        self.acked_step = max(self.acked_step, step)
        self.acked_rows += written
        return written


def tables_of(model: torch.nn.Module) -> Dict[str, Any]:
    """name -> DynamicEmbeddingTable of ``model`` (table names must be distinct)."""
    from gauss_plugins.embedding import DynamicEmbeddingTable

    out: Dict[str, Any] = {}
    for m in model.modules():
        if isinstance(m, DynamicEmbeddingTable):
            if m.name in out:
                raise ValueError(f"two dynamic tables are named {m.name!r}: elastic row sync keys stores by name")
            out[m.name] = m
    return out
