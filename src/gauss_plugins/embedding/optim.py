"""Fused sparse optimizers whose state lives in the table, next to each row.

A dynamic table's rows are not ``nn.Parameter``s: a training loop uses a dense torch
optimizer for the dense parameters and :class:`SparseOptimizer` for the tables::

    dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)      # tables hold no Parameters
    sparse_opt = SparseOptimizer(model, "rowwise_adagrad", lr=0.05)
    loss.backward()
    dense_opt.step(); sparse_opt.step()
    dense_opt.zero_grad(); sparse_opt.zero_grad()

The backward pass of a lookup records (rows, gradient source) on the table; :meth:`step`
sums the gradients of repeated ids (in batch order, so the result does not depend on the
thread count), checks them for NaN/inf in every table before touching any, then updates the
touched rows and their state in one pass (a C++ kernel on CPU when the table's index
provides one, vectorized torch otherwise).

Small tables on CUDA step without a device-to-host sync (``DynamicEmbeddingTable.sync_free_step``):
the NaN/inf check is then a flag on the device that gates the update of every row, and a bad
step is reported by a later call (see :meth:`SparseOptimizer.step`).

The rules themselves (``sgd``, ``adagrad``, ``rowwise_adagrad``, ``adam``) and
:class:`OptimizerConfig` live in :mod:`gauss_plugins.embedding.sparse_rules`, which the table
imports too; they are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

from gauss_plugins.embedding.sparse_rules import (  # noqa: F401  (re-exported; plugin.py names create_*)
    OptimizerConfig,
    SparseAdagrad,
    SparseAdam,
    SparseRowWiseAdagrad,
    SparseRule,
    SparseSGD,
    create_adagrad,
    create_adam,
    create_rowwise_adagrad,
    create_sgd,
    make_rule,
)
from gauss_plugins.embedding.table import DynamicEmbeddingTable

__all__ = [
    "OptimizerConfig",
    "SparseRule",
    "SparseSGD",
    "SparseAdagrad",
    "SparseRowWiseAdagrad",
    "SparseAdam",
    "SparseOptimizer",
    "make_rule",
]


@dataclass
class _FiniteCheck:
    """The device-side NaN/inf check of one sync-free step, held by every table it stepped
    (``table._finite_checks``) until a SparseOptimizer call reads it."""

    names: List[str]                # the tables of the step, in the order of ``flags``
    flags: torch.Tensor             # bool per table: host memory (pinned copy on CUDA)
    event: Optional[object] = None  # CUDA event after the copy; None: readable now
    read: bool = False


class SparseOptimizer:
    """Steps every :class:`DynamicEmbeddingTable` of a module (or a list of tables).

    ``config`` (an :class:`OptimizerConfig`, a rule name with keyword options, or None to
    keep each table's own configured optimizer) is applied to every table; changing a
    table's rule resets its optimizer state.
    """

    def __init__(self, tables_or_module, config: Union[OptimizerConfig, str, None] = None, **options) -> None:
        if isinstance(tables_or_module, DynamicEmbeddingTable):
            tables = [tables_or_module]
        elif isinstance(tables_or_module, torch.nn.Module):
            tables = [m for m in tables_or_module.modules() if isinstance(m, DynamicEmbeddingTable)]
        elif isinstance(tables_or_module, (list, tuple)):
            tables = list(tables_or_module)
        else:
            raise TypeError(f"SparseOptimizer takes a DynamicEmbeddingTable, a list of them or a module holding them, "
                            f"got {type(tables_or_module).__name__}")
        bad = [t for t in tables if not isinstance(t, DynamicEmbeddingTable)]
        if bad:
            raise TypeError(f"SparseOptimizer takes DynamicEmbeddingTables or a module holding them, got {type(bad[0]).__name__}")
        if not tables:
            raise ValueError("SparseOptimizer found no DynamicEmbeddingTable to optimize")
        tables = list({id(t): t for t in tables}.values())  # a table listed twice is stepped once
        # Resolve every table's rule before changing any, so that a bad option (or a table
        # without an optimizer to override) leaves all tables as they were.
        rules = []
        for table in tables:
            base = config if config is not None else table.config.optimizer
            if base is None:
                if options:
                    raise ValueError(f"table {table.name!r} has no optimizer for the options {sorted(options)} to "
                                     f"override: pass a rule too, e.g. SparseOptimizer(model, 'rowwise_adagrad', lr=0.05)")
                raise ValueError(f"table {table.name!r} has no optimizer: set DynamicTableConfig.optimizer or pass one "
                                 f"here, e.g. SparseOptimizer(model, 'rowwise_adagrad', lr=0.05)")
            rules.append(make_rule(base, **options) if (config is not None or options) else None)
        for table, rule in zip(tables, rules):
            if rule is not None:
                # Same rule name: only the hyperparameters change and the per-row state stays.
                table.set_optimizer(rule.config)
        self.tables: List[DynamicEmbeddingTable] = tables

    @property
    def lr(self) -> float:
        return self.tables[0].rule.config.lr

    @lr.setter
    def lr(self, value: float) -> None:
        OptimizerConfig(lr=value)  # the same check as a config's, before any table changes
        for table in self.tables:
            table.rule.config.lr = float(value)

    @torch.no_grad()
    def step(self) -> None:
        """Apply the recorded gradients of every table. On NaN/inf in any table nothing is
        changed anywhere, the recorded gradients are dropped, and FloatingPointError is raised.

        Sync-free steps (small tables on CUDA, ``table.sync_free_step``) check on the device:
        a bad step changes no row of any table (optimizer state included) and drops its
        gradients like any other, but its FloatingPointError comes from a later call: the
        first ``step()`` (of this or any SparseOptimizer over one of its tables: the check is
        kept on the tables) that finds the device done with the bad step, usually the next
        one, or :meth:`check_finite`, which waits for it. The call that raises changes nothing
        and drops the gradients recorded for it too."""
        self._raise_if_skipped(wait=False)
        prepared = [(table, table._prepare_gradients()) for table in self.tables]
        bad = [table.name for table, prep in prepared if prep is not None and not prep.finite]
        if bad:
            self._raise_non_finite(bad, earlier=False)
        flagged = [(table, prep) for table, prep in prepared if prep is not None and prep.device_finite is not None]
        all_finite = None
        if flagged:
            all_finite = flagged[0][1].device_finite
            for _, prep in flagged[1:]:
                if prep.device_finite.device == all_finite.device:
                    all_finite = all_finite & prep.device_finite
            mixed = len(flagged) < sum(prep is not None for _, prep in prepared)
            if mixed or len({p.device_finite.device for _, p in flagged}) > 1:
                # Tables checked on the host (they step unmasked), or flags on several
                # devices: read the flags now (a sync), so that a bad sum in any table still
                # leaves every table unchanged.
                if not all(bool(p.device_finite) for _, p in flagged):
                    self._raise_non_finite([t.name for t, p in flagged if not bool(p.device_finite)], earlier=False)
                all_finite, flagged = None, []
        for table, prep in prepared:
            if prep is not None:
                table._apply_gradients(prep, all_finite)
        if flagged:
            flags = [p.device_finite for _, p in flagged]
            self._watch([t for t, _ in flagged], torch.stack(flags) if len(flags) > 1 else flags[0].reshape(1))

    def check_finite(self) -> None:
        """Wait for the device-side NaN/inf checks of earlier sync-free steps and raise
        FloatingPointError if one found any (that step changed nothing). A host sync: call it
        where one costs nothing, e.g. at the end of an epoch or before a checkpoint."""
        self._raise_if_skipped(wait=True)

    def _watch(self, tables: List[DynamicEmbeddingTable], flags: torch.Tensor) -> None:
        """Keep the device flags of a sync-free step on its tables, for a later call to read
        without a sync."""
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(flags.device))
            check = _FiniteCheck([t.name for t in tables], host, event)
        else:
            check = _FiniteCheck([t.name for t in tables], flags)
        for table in tables:
            table._finite_checks.append(check)

    def _raise_if_skipped(self, wait: bool) -> None:
        """Read the finished checks of earlier sync-free steps of these tables (all of them,
        waiting, if ``wait``); raise FloatingPointError if one found NaN/inf."""
        bad: List[str] = []
        for table in self.tables:
            pending = table._finite_checks
            while pending:
                check = pending[0]
                if not check.read:
                    if check.event is not None and not check.event.query():
                        if not wait:
                            break  # the device has not got there yet: a later call reads it
                        check.event.synchronize()
                    check.read = True
                    ok = check.flags.tolist()  # host memory by now (the pinned copy on CUDA): no sync
                    bad += [n for n, good in zip(check.names, ok) if not good and n not in bad]
                pending.pop(0)
        if bad:
            for table in self.tables:  # reported once: later steps' checks go with it
                for check in table._finite_checks:
                    check.read = True
                table._finite_checks.clear()
            self._raise_non_finite(bad, earlier=True)

    def _raise_non_finite(self, bad: List[str], earlier: bool) -> None:
        for table in self.tables:
            table.zero_grad()
        if earlier:
            raise FloatingPointError(
                f"NaN or inf in the gradients of dynamic table(s) {bad} at an earlier sync-free step (checked on "
                f"the device, reported now): that step updated no row of any table, and this call dropped its "
                f"recorded gradients without updating anything. Check the loss (e.g. torch.autograd.detect_anomaly) "
                f"or clip gradients before step(); SparseOptimizer.check_finite() reports such a step right away")
        raise FloatingPointError(
            f"NaN or inf in the gradients of dynamic table(s) {bad}; no row was updated and the "
            f"recorded gradients were dropped. Check the loss (e.g. torch.autograd.detect_anomaly) "
            f"or clip gradients before step()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for table in self.tables:
            table.zero_grad()

    def state_dict(self) -> Dict[str, object]:
        """Hyperparameters only: the per-row state is saved with the tables' checkpoints."""
        return {table.name: table.rule.config.to_dict() for table in self.tables}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Set each named table's hyperparameters (a different rule name resets its state)."""
        # Parse every entry first: a bad one then changes no table.
        configs = {table.name: OptimizerConfig.from_dict(dict(state[table.name]))
                   for table in self.tables if table.name in state}
        for table in self.tables:
            if table.name in configs:
                table.set_optimizer(configs[table.name])
