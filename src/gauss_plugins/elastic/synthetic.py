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

__all__ = ["make_mlp", "make_slow_mlp", "Pause", "make_adam", "mse_loss", "SlowLoss", "SyntheticRegressionStream"]


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
