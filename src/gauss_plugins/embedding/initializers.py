"""Deterministic initial values of new rows, a pure function of (table seed, id, column).

Every replica that creates the row of id ``k`` gets the same bits, whatever the batch, the
order of insertion, the row number or the thread count: values come from a counter-based
hash (murmur3's fmix64) instead of a random generator's stream.

* ``"uniform"``: ``low + (high - low) * u``, ``u = b / 2**24`` with ``b`` 24 bits of
  ``h = fmix64(fmix64(id ^ s) + (j // 2 + 1) * G)`` (``s = fmix64(seed + G)``, ``G`` the
  golden-ratio constant): bits 40..63 for even columns ``j``, 16..39 for odd ones; computed
  in float32 as ``u * span`` then ``+ low``. The compiled CPU kernel produces the very
  same bits.
* ``"normal"``: Box-Muller on two such uniforms (float64, then rounded).
* ``"zeros"``.
* a callable ``fn(ids int64[N], dim, seed) -> Tensor[N, dim]`` (must be deterministic).
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch

from gauss_plugins.embedding.index import _lshr, hash_keys

__all__ = ["deterministic_uniform", "deterministic_normal", "initial_values", "Initializer"]

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
Initializer = Union[str, Callable[[torch.Tensor, int, int], torch.Tensor]]


def _seed_mix(seed: int, device) -> torch.Tensor:
    value = (int(seed) + 0x9E3779B97F4A7C15) % 2**64
    value = value - 2**64 if value >= 2**63 else value
    return hash_keys(torch.tensor([value], dtype=torch.int64, device=device))


def _uniform_bits(ids: torch.Tensor, dim: int, seed: int, salt: int = 0) -> torch.Tensor:
    """int64[N, dim] of 24-bit uniform integers; one 64-bit hash serves two columns."""
    base = hash_keys(ids ^ _seed_mix(seed + salt, ids.device))
    pairs = (dim + 1) // 2
    cols = torch.arange(1, pairs + 1, dtype=torch.int64, device=ids.device) * _GOLDEN
    h = hash_keys(base[:, None] + cols[None, :])
    bits = torch.stack([_lshr(h, 40), _lshr(h, 16) & 0xFFFFFF], dim=2).reshape(ids.numel(), 2 * pairs)
    return bits[:, :dim]


def deterministic_uniform(ids: torch.Tensor, dim: int, seed: int, low: float, high: float) -> torch.Tensor:
    """float32[N, dim] uniform in [low, high), bit-identical to the C++ ``init_uniform``."""
    u = _uniform_bits(ids, dim, seed).to(torch.float32) * (1.0 / 16777216.0)
    span = torch.tensor(float(high) - float(low), dtype=torch.float64).to(torch.float32)
    lo = torch.tensor(float(low), dtype=torch.float32)
    return (u * span) + lo


def deterministic_normal(ids: torch.Tensor, dim: int, seed: int, mean: float, std: float) -> torch.Tensor:
    """float32[N, dim] normal(mean, std) by Box-Muller on two hash-derived uniforms."""
    u1 = (_uniform_bits(ids, dim, seed, salt=1).to(torch.float64) + 0.5) / 16777216.0
    u2 = _uniform_bits(ids, dim, seed, salt=2).to(torch.float64) / 16777216.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (mean + std * z).to(torch.float32)


def initial_values(initializer: Initializer, ids: torch.Tensor, dim: int, seed: int,
                   init_min: float, init_max: float, init_std: float) -> torch.Tensor:
    """float32[N, dim] initial values of the rows of ``ids`` (torch path, any device)."""
    if callable(initializer):
        out = initializer(ids, dim, seed)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (ids.numel(), dim):
            raise ValueError(f"initializer must return a tensor of shape ({ids.numel()}, {dim})")
        return out.to(device=ids.device, dtype=torch.float32)
    if initializer == "uniform":
        return deterministic_uniform(ids, dim, seed, init_min, init_max)
    if initializer == "normal":
        return deterministic_normal(ids, dim, seed, 0.0, init_std)
    if initializer == "zeros":
        return torch.zeros(ids.numel(), dim, dtype=torch.float32, device=ids.device)
    raise ValueError(f"unknown initializer {initializer!r}; use 'uniform', 'normal', 'zeros' or a callable")
