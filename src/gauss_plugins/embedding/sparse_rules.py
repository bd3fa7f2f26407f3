"""Sparse optimizer rules and their configuration: what a table's optimizer state looks
like per row, and how the touched rows are updated.

Both the table (which allocates and checkpoints the per-row state) and
:class:`~gauss_plugins.embedding.optim.SparseOptimizer` (which steps tables) need these, so
they live here, below both: ``table.py`` imports this module, ``optim.py`` imports
``table.py`` and this module, and nothing imports back up.

Rules (kind ``sparse_optimizer``), with torch's conventions:

* ``sgd``: ``w -= lr * g``
* ``adagrad``: ``s += g*g; w -= lr * g / (sqrt(s) + eps)`` (state D floats a row)
* ``rowwise_adagrad``: ``s += mean(g*g); w -= lr * g / (sqrt(s) + eps)`` (1 float a row;
  FBGEMM's EXACT_ROWWISE_ADAGRAD)
* ``adam``: torch.optim.Adam's update with a per-row step count: rows not touched in a step
  keep their moments and step (lazy Adam, like ``torch.optim.SparseAdam`` but per row).

``weight_decay`` adds ``weight_decay * w`` to the gradient of touched rows.

Each rule has two entry points over one computation (:meth:`SparseRule.step_rows`, a pure
function of a block of rows, their state and their summed gradients): :meth:`~SparseRule.update`
gathers the touched rows, steps them and scatters them back; :meth:`~SparseRule.masked_update`
steps every row of a small table and keeps the new values only where a bool mask says so (no
list of touched rows, so on CUDA no device-to-host sync to build one). Rows outside the mask
keep their values and their state bit for bit.
"""
from __future__ import annotations

import math
import numbers
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

    def __post_init__(self) -> None:
        # Checked here so that a bad value fails where it is given, not inside a fused
        # kernel mid-step (after some tables were already updated).
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"OptimizerConfig.name must be a rule name such as 'rowwise_adagrad', got {self.name!r}")
        for key in ("lr", "eps", "beta1", "beta2", "weight_decay", "initial_accumulator_value"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"OptimizerConfig.{key} must be a finite number, got {value!r}")
            setattr(self, key, float(value))
        if self.lr < 0 or self.weight_decay < 0 or self.initial_accumulator_value < 0:
            raise ValueError(f"OptimizerConfig: lr ({self.lr}), weight_decay ({self.weight_decay}) and "
                             f"initial_accumulator_value ({self.initial_accumulator_value}) must be >= 0")
        if self.eps <= 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0, got {self.eps}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"OptimizerConfig: beta1 ({self.beta1}) and beta2 ({self.beta2}) must be in [0, 1)")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "OptimizerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown optimizer options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def with_options(self, **options: object) -> "OptimizerConfig":
        """A copy with ``options`` (field names) overriding this config's values."""
        return OptimizerConfig.from_dict({**self.to_dict(), **options})


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

    def step_rows(self, w: torch.Tensor, g: torch.Tensor,
                  state: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One step of a block of rows: float32 values ``w``, summed float32 gradients ``g``
        and the rows' ``state`` (one entry per :meth:`state_fields`) -> new float32 values
        and new state. Pure: the inputs are not modified."""
        raise NotImplementedError

    def update(self, weight: torch.Tensor, state: Dict[str, torch.Tensor], rows: torch.Tensor, grads: torch.Tensor) -> None:
        """Vectorized torch update of ``rows`` (distinct) with summed float32 ``grads``."""
        new_w, new_state = self.step_rows(weight[rows].to(torch.float32), grads,
                                          {k: v[rows] for k, v in state.items()})
        for k, v in new_state.items():
            state[k][rows] = v
        weight[rows] = new_w.to(weight.dtype)

    def masked_update(self, weight: torch.Tensor, state: Dict[str, torch.Tensor], grads: torch.Tensor,
                      apply: torch.Tensor) -> None:
        """Step every row of ``weight`` with ``grads`` (float32, the weight's shape; any value
        where ``apply`` is False) and keep the result only where ``apply`` (bool, one per row)
        is True: the other rows keep their values and state exactly (Adam's step count
        included). Element for element the same arithmetic as :meth:`update`."""
        new_w, new_state = self.step_rows(weight.to(torch.float32), grads, state)
        for k, v in new_state.items():
            mask = apply.view(-1, *([1] * (v.dim() - 1)))
            state[k].copy_(torch.where(mask, v, state[k]))
        weight.copy_(torch.where(apply[:, None], new_w.to(weight.dtype), weight))

    # shared pieces of the torch updates; operation order mirrors the C++ kernel
    def _with_decay(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g if self.config.weight_decay == 0 else g + self.config.weight_decay * w


class SparseSGD(SparseRule):
    name, kind = "sgd", 0

    def step_rows(self, w, g, state):
        return w - self.config.lr * self._with_decay(w, g), {}


class SparseAdagrad(SparseRule):
    name, kind = "adagrad", 1

    def state_fields(self, dim):
        return {"sum": ((dim,), torch.float32, self.config.initial_accumulator_value)}

    def step_rows(self, w, g, state):
        g = self._with_decay(w, g)
        s = state["sum"] + g * g
        return w - self.config.lr * (g / (s.sqrt() + self.config.eps)), {"sum": s}


class SparseRowWiseAdagrad(SparseRule):
    name, kind = "rowwise_adagrad", 2

    def state_fields(self, dim):
        return {"sum": ((), torch.float32, self.config.initial_accumulator_value)}

    def step_rows(self, w, g, state):
        g = self._with_decay(w, g)
        s = state["sum"] + (g * g).sum(dim=1) / g.shape[1]
        mult = self.config.lr / (s.sqrt() + self.config.eps)
        return w - mult[:, None] * g, {"sum": s}


class SparseAdam(SparseRule):
    name, kind = "adam", 3

    def state_fields(self, dim):
        return {"exp_avg": ((dim,), torch.float32, 0.0), "exp_avg_sq": ((dim,), torch.float32, 0.0),
                "step": ((), torch.int64, 0)}

    def step_rows(self, w, g, state):
        c = self.config
        g = self._with_decay(w, g)
        t = state["step"] + 1
        td = t.to(torch.float64)
        bc1 = 1.0 - torch.pow(torch.tensor(c.beta1, dtype=torch.float64), td)
        bc2 = 1.0 - torch.pow(torch.tensor(c.beta2, dtype=torch.float64), td)
        step_size = (c.lr / bc1).to(torch.float32)[:, None]
        bc2_sqrt = bc2.sqrt().to(torch.float32)[:, None]
        # as torch.optim.Adam: exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
        w1, w2 = (torch.tensor(1.0 - x, dtype=torch.float64).to(torch.float32) for x in (c.beta1, c.beta2))
        b2 = torch.tensor(c.beta2, dtype=torch.float64).to(torch.float32)
        m0 = state["exp_avg"]
        m = m0 + w1 * (g - m0)
        v = state["exp_avg_sq"] * b2 + w2 * (g * g)
        den = v.sqrt() / bc2_sqrt + c.eps
        return w - step_size * (m / den), {"exp_avg": m, "exp_avg_sq": v, "step": t}


def make_rule(config: Union[OptimizerConfig, str, Dict[str, object]], **options) -> SparseRule:
    """A rule from a config, a name or a dict (resolved through the plugin registry);
    keyword ``options`` override the config's values (the config itself is not changed)."""
    if isinstance(config, str):
        config = OptimizerConfig.from_dict({"name": config, **options})
    elif isinstance(config, dict):
        config = OptimizerConfig.from_dict({**config, **options})
    elif isinstance(config, OptimizerConfig):
        config = config.with_options(**options)
    else:
        raise TypeError(f"an optimizer is an OptimizerConfig, a rule name or a dict of OptimizerConfig fields, "
                        f"got {type(config).__name__}")
    from gauss_plugins.plugins import get_registry

    return get_registry().create("sparse_optimizer", config.name, config)


def _rule_factory(cls):
    def create(config: Optional[OptimizerConfig] = None, **options) -> SparseRule:
        if config is None:
            config = OptimizerConfig.from_dict({"name": cls.name, **options})
        else:
            config = config.with_options(**options)
        if config.name != cls.name:
            config = config.with_options(name=cls.name)
        return cls(config)

    create.__name__ = f"create_{cls.name}"
    return create


create_sgd = _rule_factory(SparseSGD)
create_adagrad = _rule_factory(SparseAdagrad)
create_rowwise_adagrad = _rule_factory(SparseRowWiseAdagrad)
create_adam = _rule_factory(SparseAdam)
