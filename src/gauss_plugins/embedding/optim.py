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

Rules (kind ``sparse_optimizer``), with torch's conventions:

* ``sgd``: ``w -= lr * g``
* ``adagrad``: ``s += g*g; w -= lr * g / (sqrt(s) + eps)`` (state D floats a row)
* ``rowwise_adagrad``: ``s += mean(g*g); w -= lr * g / (sqrt(s) + eps)`` (1 float a row;
  FBGEMM's EXACT_ROWWISE_ADAGRAD)
* ``adam``: torch.optim.Adam's update with a per-row step count: rows not touched in a step
  keep their moments and step (lazy Adam, like ``torch.optim.SparseAdam`` but per row).

``weight_decay`` adds ``weight_decay * w`` to the gradient of touched rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Tuple, Union

import torch

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
class OptimizerConfig:
    """Which sparse optimizer a table uses, and its hyperparameters."""

    name: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-10
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "OptimizerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown optimizer options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class SparseRule:
    """One optimizer algorithm: its per-row state and its update of the touched rows."""

    name = "rule"
    kind = -1  # id of the fused C++ update (cpu kernels), -1 = none

    def __init__(self, config: OptimizerConfig) -> None:
        self.config = config

    def state_fields(self, dim: int) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype, float]]:
        """name -> (shape of one row's state, dtype, initial value)."""
        return {}

    def hyperparams(self) -> List[float]:
        c = self.config
        return [float(c.lr), float(c.eps), float(c.beta1), float(c.beta2), float(c.weight_decay)]

    def update(self, weight: torch.Tensor, state: Dict[str, torch.Tensor], rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Vectorized torch update of ``rows`` (distinct) with summed float32 ``grads``."""
        raise NotImplementedError

    # shared pieces of the torch updates; operation order mirrors the C++ kernel
    def _params_and_grads(self, weight, rows, grads):
        w = weight[rows].to(torch.float32)
        g = grads if self.config.weight_decay == 0 else grads + self.config.weight_decay * w
        return w, g


class SparseSGD(SparseRule):
    name, kind = "sgd", 0

    def update(self, weight, state, rows, grads):
        w, g = self._params_and_grads(weight, rows, grads)
        weight[rows] = (w - self.config.lr * g).to(weight.dtype)


class SparseAdagrad(SparseRule):
    name, kind = "adagrad", 1

    def state_fields(self, dim):
        return {"sum": ((dim,), torch.float32, self.config.initial_accumulator_value)}

    def update(self, weight, state, rows, grads):
        w, g = self._params_and_grads(weight, rows, grads)
        s = state["sum"][rows] + g * g
        state["sum"][rows] = s
        weight[rows] = (w - self.config.lr * (g / (s.sqrt() + self.config.eps))).to(weight.dtype)


class SparseRowWiseAdagrad(SparseRule):
    name, kind = "rowwise_adagrad", 2

    def state_fields(self, dim):
        return {"sum": ((), torch.float32, self.config.initial_accumulator_value)}

    def update(self, weight, state, rows, grads):
        w, g = self._params_and_grads(weight, rows, grads)
        s = state["sum"][rows] + (g * g).sum(dim=1) / g.shape[1]
        state["sum"][rows] = s
        mult = self.config.lr / (s.sqrt() + self.config.eps)
        weight[rows] = (w - mult[:, None] * g).to(weight.dtype)


class SparseAdam(SparseRule):
    name, kind = "adam", 3

    def state_fields(self, dim):
        return {"exp_avg": ((dim,), torch.float32, 0.0), "exp_avg_sq": ((dim,), torch.float32, 0.0),
                "step": ((), torch.int64, 0)}

    def update(self, weight, state, rows, grads):
        c = self.config
        w, g = self._params_and_grads(weight, rows, grads)
        t = state["step"][rows] + 1
        state["step"][rows] = t
        td = t.to(torch.float64)
        bc1 = 1.0 - torch.pow(torch.tensor(c.beta1, dtype=torch.float64), td)
        bc2 = 1.0 - torch.pow(torch.tensor(c.beta2, dtype=torch.float64), td)
        step_size = (c.lr / bc1).to(torch.float32)[:, None]
        bc2_sqrt = bc2.sqrt().to(torch.float32)[:, None]
        # as torch.optim.Adam: exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
        w1, w2 = (torch.tensor(1.0 - x, dtype=torch.float64).to(torch.float32) for x in (c.beta1, c.beta2))
        b2 = torch.tensor(c.beta2, dtype=torch.float64).to(torch.float32)
        m0 = state["exp_avg"][rows]
        m = m0 + w1 * (g - m0)
        v = state["exp_avg_sq"][rows] * b2 + w2 * (g * g)
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        den = v.sqrt() / bc2_sqrt + c.eps
        weight[rows] = (w - step_size * (m / den)).to(weight.dtype)


_RULES = {cls.name: cls for cls in (SparseSGD, SparseAdagrad, SparseRowWiseAdagrad, SparseAdam)}


def make_rule(config: Union[OptimizerConfig, str, Dict[str, object]], **options) -> SparseRule:
    """A rule from a config, a name (resolved through the plugin registry) or a dict."""
    if isinstance(config, str):
        config = OptimizerConfig(name=config, **options)
    elif isinstance(config, dict):
        config = OptimizerConfig.from_dict({**config, **options})
    elif options:
        raise TypeError("pass options either in the OptimizerConfig or as keywords, not both")
    from gauss_plugins.plugins import get_registry

    return get_registry().create("sparse_optimizer", config.name, config)


def _rule_factory(cls):
    def create(config: Optional[OptimizerConfig] = None, **options) -> SparseRule:
        if config is None:
            config = OptimizerConfig(name=cls.name, **options)
        elif options:
            raise TypeError("pass options either in the OptimizerConfig or as keywords, not both")
        if config.name != cls.name:
            config = OptimizerConfig(**{**config.to_dict(), "name": cls.name})
        return cls(config)

    create.__name__ = f"create_{cls.name}"
    return create


create_sgd = _rule_factory(SparseSGD)
create_adagrad = _rule_factory(SparseAdagrad)
create_rowwise_adagrad = _rule_factory(SparseRowWiseAdagrad)
create_adam = _rule_factory(SparseAdam)


class SparseOptimizer:
    """Steps every :class:`DynamicEmbeddingTable` of a module (or a list of tables).

    ``config`` (an :class:`OptimizerConfig`, a rule name with keyword options, or None to
    keep each table's own configured optimizer) is applied to every table; changing a
    table's rule resets its optimizer state.
    """

    def __init__(self, tables_or_module, config: Union[OptimizerConfig, str, None] = None, **options) -> None:
        from gauss_plugins.embedding.table import DynamicEmbeddingTable

        if isinstance(tables_or_module, DynamicEmbeddingTable):
            tables = [tables_or_module]
        elif isinstance(tables_or_module, torch.nn.Module):
            tables = [m for m in tables_or_module.modules() if isinstance(m, DynamicEmbeddingTable)]
        else:
            tables = list(tables_or_module)
        bad = [t for t in tables if not isinstance(t, DynamicEmbeddingTable)]
        if bad:
            raise TypeError(f"SparseOptimizer takes DynamicEmbeddingTables or a module holding them, got {type(bad[0]).__name__}")
        if not tables:
            raise ValueError("SparseOptimizer found no DynamicEmbeddingTable to optimize")
        self.tables: List[DynamicEmbeddingTable] = tables
        if config is not None or options:
            for table in tables:
                table.set_optimizer(config if config is not None else table.config.optimizer, **options)
        missing = [t.name for t in tables if t.rule is None]
        if missing:
            raise ValueError(f"tables {missing} have no optimizer: set DynamicTableConfig.optimizer or pass one here, "
                             f"e.g. SparseOptimizer(model, 'rowwise_adagrad', lr=0.05)")

    @property
    def lr(self) -> float:
        return self.tables[0].rule.config.lr

    @lr.setter
    def lr(self, value: float) -> None:
        for table in self.tables:
            table.rule.config.lr = float(value)

    @torch.no_grad()
    def step(self) -> None:
        """Apply the recorded gradients of every table. On NaN/inf in any table nothing is
        changed anywhere, the recorded gradients are dropped, and FloatingPointError is raised."""
        prepared = [(table, table._prepare_gradients()) for table in self.tables]
        bad = [table.name for table, prep in prepared if prep is not None and not prep.finite]
        if bad:
            for table in self.tables:
                table.zero_grad()
            raise FloatingPointError(
                f"NaN or inf in the gradients of dynamic table(s) {bad}; no row was updated and the "
                f"recorded gradients were dropped. Check the loss (e.g. torch.autograd.detect_anomaly) "
                f"or clip gradients before step()")
        for table, prep in prepared:
            if prep is not None:
                table._apply_gradients(prep)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for table in self.tables:
            table.zero_grad()

    def state_dict(self) -> Dict[str, object]:
        """Hyperparameters only: the per-row state is saved with the tables' checkpoints."""
        return {table.name: table.rule.config.to_dict() for table in self.tables}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for table in self.tables:
            if table.name in state:
                cfg = OptimizerConfig.from_dict(dict(state[table.name]))
                if cfg.name != table.rule.name:
                    table.set_optimizer(cfg)
                else:
                    table.rule.config = cfg
