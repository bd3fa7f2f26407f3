"""Small, importable pieces for elastic training tests, examples and benchmarks.

Ray workers unpickle callables by reference when their module is importable, so the model
factory, optimizer factory, loss and stream that tests hand to the launcher live here rather
than in test files (which Ray workers cannot import).
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

__all__ = ["make_mlp", "make_slow_mlp", "Pause", "make_adam", "mse_loss", "SlowLoss", "SyntheticRegressionStream",
           "TableRegressionModel", "table_mse_loss", "table_batch_ids", "SyntheticIdStream"]


def make_mlp(dim: int = 16, hidden: int = 32, depth: int = 2, seed: Optional[int] = None) -> nn.Module:
    """An MLP ``dim -> hidden x depth -> 1``; ``seed`` fixes its initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    width = dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class Pause(nn.Module):
    """Identity after a sleep of ``delay_s``: a model built with these spends its step in its
    forward, between modules (where a test's kill lands mid-forward)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return x


def make_slow_mlp(dim: int = 16, hidden: int = 32, pauses: int = 10, delay_s: float = 0.1) -> nn.Module:
    """:func:`make_mlp` (seeded) behind ``pauses`` :class:`Pause` modules: a forward of about
    ``pauses * delay_s`` seconds."""
    return nn.Sequential(*[Pause(delay_s) for _ in range(pauses)], make_mlp(dim, hidden, seed=0))


def make_adam(params: Iterable[torch.nn.Parameter], lr: float = 1e-2, fused: bool = False) -> torch.optim.Optimizer:
    """Adam; ``fused=True`` updates every parameter in one kernel (on CPU ~4x faster than the
    default per-tensor loop at a 1.8 GB state, which matters when a step's cost is measured)."""
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def mse_loss(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


class SlowLoss:
    """:func:`mse_loss` after a sleep of ``delay_s``: most of a step's time is then "mid-step",
    where a test's kill lands."""

    def __init__(self, delay_s: float = 0.02):
        self.delay_s = delay_s

    def __call__(self, model: nn.Module, batch):
        time.sleep(self.delay_s)
        return mse_loss(model, batch)


class SyntheticRegressionStream:
    """An unbounded stream addressable by global sample index: sample ``i`` is ``(x_i, y_i)`` with
    ``x_i`` a function of ``(seed, i)`` only and ``y_i = <x_i, w> + 0.1 sin(i)`` for a fixed ``w``,
    so any worker builds any sample, and a loss that falls means the replicas learn ``w``.

    ``arrived`` (None: unbounded) is how many samples the stream holds so far, or ``arrived_file``
    names a file holding that count (an external feed's arrival counter, re-read on each call);
    ``backlog(cursor)`` is what the scaling policy reads.
    """

    def __init__(self, dim: int = 16, seed: int = 0, arrived: Optional[int] = None,
                 arrived_file: Optional[str] = None):
        self.dim, self.seed, self.arrived, self.arrived_file = dim, seed, arrived, arrived_file
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, generator=g)
        # Per-sample features from a counter-based mix: deterministic in (seed, i) and cheap.
        self._freq = torch.rand(dim, generator=g) * 3.0 + 0.5
        self._phase = torch.rand(dim, generator=g) * 6.283

    def batch(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        i = indices.to(torch.float64).unsqueeze(1)
        x = torch.sin(i * self._freq.double() * 0.7548776662 + self._phase.double() + i * i * 1e-7).float()
        y = x @ self.w + 0.1 * torch.sin(indices.to(torch.float64)).float()
        return x, y

    def backlog(self, cursor: int) -> int:
        arrived = self.arrived
        if self.arrived_file is not None:
            with open(self.arrived_file) as f:
                arrived = int(f.read().strip() or 0)
        return 0 if arrived is None else max(arrived - cursor, 0)


class TableRegressionModel(nn.Module):
    """A dynamic table (``rowwise_adagrad``, its state in the row) and a linear head: the
    prediction of a sample is ``head(sum of its ids' rows)``. For the elastic row tests."""

    def __init__(self, dim: int = 8, lr: float = 0.2, seed: int = 0, device: str = "cpu") -> None:
        super().__init__()
        from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig

        # ``device="cuda"`` for NCCL workers: a table is not moved by ``module.to``.
        self.table = DynamicEmbeddingTable(DynamicTableConfig(
            name="items", dim=dim, seed=seed, initial_capacity=256, device=device,
            optimizer=OptimizerConfig(name="rowwise_adagrad", lr=lr)))
        g = torch.Generator().manual_seed(seed)  # every replica starts with the same head
        self.head = nn.Linear(dim, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, dim, generator=g) * 0.3)
            self.head.bias.zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).sum(1)).squeeze(1)


def table_mse_loss(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, y = batch
    return torch.nn.functional.mse_loss(model(ids), y)


def table_batch_ids(batch: Tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The ids a :class:`TableRegressionModel` step looks up, by table name."""
    return {"items": batch[0].reshape(-1)}


class SyntheticIdStream:
    """Sample ``i``: ``ids_per_sample`` ids drawn from ``num_ids`` by a hash of ``(seed, i)``, and
    a target that is a fixed per-id score summed over them, so the rows can learn it."""

    def __init__(self, num_ids: int = 64, ids_per_sample: int = 3, seed: int = 0) -> None:
        self.num_ids, self.k, self.seed = num_ids, ids_per_sample, seed
        self.score = torch.randn(num_ids, generator=torch.Generator().manual_seed(seed))

    def batch(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        i = indices.to(torch.int64).unsqueeze(1) * self.k + torch.arange(self.k)
        ids = (i * 2654435761 + self.seed * 97 + 12345) % self.num_ids
        return ids, self.score[ids].sum(1)
