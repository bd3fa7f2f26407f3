"""``CpuHashIndex``: the dynamic table's hash index as a compiled C++ op, plus fused CPU kernels.

The C++ source (``cpu_hash_index.cpp`` beside this file) is compiled on first use with the
system C++ compiler into a shared library of ``torch.ops.gauss_hash`` ops, cached under
``$GAUSS_PLUGINS_CACHE`` (default ``$XDG_CACHE_HOME/gauss_plugins`` or
``~/.cache/gauss_plugins``) in a folder named by a hash of the source, the flags, the
compiler and torch, so a change to any of them rebuilds and nothing stale is ever loaded.
A build takes about 20 s (announced once on stderr); loading a cached one a few
milliseconds. ``gauss build`` (:func:`build`) does it ahead of time, e.g. at install or in CI.

The build calls the compiler directly with the include and library paths of
``torch.utils.cpp_extension`` (no ninja needed) and writes the library under a temporary
name before renaming it, so concurrent first uses (pytest-xdist, DDP ranks) are safe.

:func:`available` says whether the ops can be loaded here (and caches why not); the table
falls back to its pure-torch paths when they cannot.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Optional, Tuple

import torch

from gauss_plugins.embedding.memory import alloc
from gauss_plugins.embedding.index import (
    HashIndex,
    IndexFullError,
    _validate_state,
    check_keys,
    slots_for_capacity,
)

__all__ = ["CpuHashIndex", "available", "build", "load_ops", "ExtensionBuildError"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_hash_index.cpp")
_lock = threading.Lock()
_ops = None
_error: Optional[str] = None
_library: Optional[str] = None          # the loaded library's path
_build_seconds: Optional[float] = None  # how long this process spent compiling it (None: it came from the cache)


class ExtensionBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded here."""


def _cache_root() -> str:
    from gauss_plugins._cachedir import cache_root

    return cache_root("cpu_ext")


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_flags() -> list:
    """-mavx2 -mfma where the CPU has them (kept portable otherwise; part of the cache key)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def _build_command(cxx: str, out: str) -> list:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dirs = cpp_extension.library_paths()
    return [
        cxx, _SOURCE, "-o", out, "-shared", "-fPIC", "-std=c++17", "-O3", "-fopenmp",
        # a*b+c must round like torch's separate ops (deterministic init, optimizer math)
        "-ffp-contract=off",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *_cpu_flags(), *includes,
        *[f"-L{d}" for d in lib_dirs], *[f"-Wl,-rpath,{d}" for d in lib_dirs],
        "-lc10", "-ltorch_cpu", "-ltorch",
    ]


def _library_path(cxx: str) -> str:
    with open(_SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in (source, " ".join(_build_command(cxx, "X")).encode(), version.encode(),
                 torch.__version__.encode(), sys.version.encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return os.path.join(_cache_root(), key.hexdigest()[:20], "gauss_hash_ops.so")


def load_ops():
    """``torch.ops.gauss_hash``, building the library on first use; raises
    :class:`ExtensionBuildError` with the compiler's message if that fails."""
    global _ops, _error
    with _lock:
        if _ops is not None:
            return _ops
        if _error is not None:
            raise ExtensionBuildError(_error)
        try:
            _ops = _load()
        except Exception as exc:
            _error = str(exc)
            raise ExtensionBuildError(_error) from exc
        return _ops


def _load():
    global _library, _build_seconds
    if hasattr(torch.ops, "gauss_hash") and hasattr(torch.ops.gauss_hash, "find"):
        return torch.ops.gauss_hash
    cxx = _compiler()
    if cxx is None:
        raise ExtensionBuildError("no C++ compiler on PATH (install g++ or set CXX); using the torch fallback")
    lib = _library_path(cxx)
    if not os.path.exists(lib):
        # Without a word the first table would seem to hang for ~20 s.
        print(f"building the gauss C++ hash index (one time, ~20 s; `gauss build` does it ahead) into "
              f"{os.path.dirname(lib)} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        os.makedirs(os.path.dirname(lib), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(lib))
        os.close(fd)
        try:
            proc = subprocess.run(_build_command(cxx, tmp), capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise ExtensionBuildError(f"building {os.path.basename(_SOURCE)} with {cxx} failed (exit "
                                          f"{proc.returncode}):\n{_first_errors(proc.stderr)}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _build_seconds = time.perf_counter() - started
    torch.ops.load_library(lib)
    _library = lib
    return torch.ops.gauss_hash


def build() -> Dict[str, Any]:
    """Compile the library now unless the cache has it (what ``gauss build`` runs).

    Returns ``{"name", "path", "built", "seconds"}``: where the library is cached, whether
    this call compiled it, and how long that took. Raises :class:`ExtensionBuildError` with
    the compiler's message when it cannot be built.
    """
    load_ops()
    return {"name": "C++ hash index (cpu_hash_index.cpp)", "path": _library or "(already loaded in this process)",
            "built": _build_seconds is not None, "seconds": round(_build_seconds or 0.0, 1)}


def available() -> bool:
    """Whether the compiled ops can be used here (builds them on the first call)."""
    try:
        load_ops()
        return True
    except ExtensionBuildError:
        return False


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True or was not asked yet)."""
    return _error or ""


class CpuHashIndex(HashIndex):
    """Open addressing with linear probing in C++ (see ``cpu_hash_index.cpp``).

    State is four tensors: ``slots`` (uint8, 12 bytes a slot: int64 key + int32 row, row -1
    = empty), ``meta`` (int64[4]: size, next_row, free_count, capacity) and ``free_buf``
    (int32 stack of freed rows). ``find`` runs on all threads with software prefetching;
    ``insert`` finds in parallel, then places the missing keys sequentially (new keys take
    rows in order of first occurrence); ``remove`` shifts entries back (no tombstones), so
    probes stay short under churn. 16 bytes per live key at the 0.75 load factor.
    """

    def __init__(self, capacity: int, device=None) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cpu":
            raise ValueError(f"CpuHashIndex runs on CPU only, got device {device}; use the 'triton' or "
                             f"'torch' table_backend for CUDA")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._ops = load_ops()
        self.fused = CpuFusedKernels(self._ops)
        self.device = device
        self._init_state(int(capacity))

    def _init_state(self, capacity: int) -> None:
        n = slots_for_capacity(capacity)
        if n >= 2**31 or capacity >= 2**31:
            raise ValueError(f"capacity {capacity} is too large for one index (rows are int32); shard the table")
        self.slots = alloc((n * 3,), torch.int32, "cpu", -1).view(torch.uint8)  # 2 MiB pages when large
        self.slots.view(torch.int32).view(n, 3)[:, 2] = -1
        self.meta = torch.tensor([0, 0, 0, capacity], dtype=torch.int64)
        self.free_buf = torch.empty(0, dtype=torch.int32)

    @property
    def capacity(self) -> int:  # type: ignore[override]
        return int(self.meta[3])

    @property
    def num_slots(self) -> int:
        return self.slots.numel() // 12

    def __len__(self) -> int:
        return int(self.meta[0])

    def memory_bytes(self) -> int:
        return self.slots.numel() + self.free_buf.numel() * 4 + self.meta.numel() * 8

    def find(self, keys: torch.Tensor, default: int = -1) -> torch.Tensor:
        check_keys(keys, self.device)
        return self._ops.find(self.slots, keys, int(default))

    def insert(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        check_keys(keys, self.device)
        rows, is_new, ok = self._ops.insert(self.slots, keys, self.meta, self.free_buf)
        if not ok:
            raise IndexFullError(f"hash index full: {len(self)} keys, capacity {self.capacity}, "
                                 f"and this call brings more new keys than the {self.capacity - len(self)} free rows")
        return rows, is_new

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        check_keys(keys, self.device)
        need = int(self.meta[2]) + keys.numel()
        if self.free_buf.numel() < need:
            grown = torch.empty(min(max(need, 2 * self.free_buf.numel()), max(self.capacity, need)), dtype=torch.int32)
            grown[: self.free_buf.numel()] = self.free_buf
            self.free_buf = grown
        return self._ops.remove(self.slots, keys, self.meta, self.free_buf)

    def keys_and_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._ops.keys_and_rows(self.slots, len(self))

    def rehash(self, new_capacity: int) -> None:
        if new_capacity < self.capacity:
            raise ValueError(f"rehash can only grow: {new_capacity} < capacity {self.capacity}")
        keys, rows = self.keys_and_rows()
        meta, free_buf = self.meta.clone(), self.free_buf
        self._init_state(int(new_capacity))
        self.meta[:3] = meta[:3]
        self.free_buf = free_buf
        self._ops.place(self.slots, keys, rows)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        keys, rows = self.keys_and_rows()
        keys, order = keys.sort()
        free = self.free_buf[: int(self.meta[2])].to(torch.int64).flip(0)  # popped from the end
        return {
            "capacity": torch.tensor(self.capacity, dtype=torch.int64),
            "keys": keys,
            "rows": rows[order],
            "free_rows": free,
            "next_row": self.meta[1].clone(),
        }

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        capacity, keys, rows, free_rows, next_row = _validate_state(state)
        self._init_state(capacity)
        self.meta[0] = keys.numel()
        self.meta[1] = next_row
        self.meta[2] = free_rows.numel()
        self.free_buf = free_rows.flip(0).to(torch.int32).contiguous()
        self._ops.place(self.slots, keys, rows)



class CpuFusedKernels:
    """The :class:`~gauss_plugins.embedding.index.FusedKernels` of the C++ library."""

    def __init__(self, ops) -> None:
        self._ops = ops

    def lookup_pool(self, index, ids, offsets, weight, per_sample_weights, mode, default_row):
        return self._ops.lookup_pool(index.slots, ids, offsets, weight, per_sample_weights, int(mode), int(default_row))

    def stamp_rows(self, rows, stamp, stamp_value, policy_array, policy_mode, policy_value, skip_row):
        self._ops.stamp_rows(rows, stamp, int(stamp_value), policy_array, int(policy_mode), int(policy_value),
                             int(skip_row))

    def select_victims(self, index, stamp, scores, protect, limit, k):
        return self._ops.select_victims(index.slots, stamp, scores, protect, int(limit), int(k))

    def sample_victims(self, stamp, scores, row_ids, protect, rng_state, limit, k, m):
        return self._ops.sample_victims(stamp, scores, row_ids, protect, rng_state, int(limit), int(k), int(m))

    def sweep_victims(self, stamp, scores, row_ids, protect, rng_state, hand, limit, k, probe, quantile_div, max_scan):
        return self._ops.sweep_victims(stamp, scores, row_ids, protect, rng_state, hand, int(limit), int(k),
                                       int(probe), int(quantile_div), int(max_scan))

    def sample_candidates(self, stamp, scores, row_ids, rng_state, limit, k, m):
        return self._ops.sample_candidates(stamp, scores, row_ids, rng_state, int(limit), int(k), int(m))

    def take_victims(self, stamp, scores, row_ids, cand_rows, cand_stamps, cand_scores, cand_by_key, protect, k):
        return self._ops.take_victims(stamp, scores, row_ids, cand_rows, cand_stamps, cand_scores, cand_by_key,
                                      protect, int(k))

    def gather_changed(self, chunks, chunk_rel, exact, version_rel, stamp, row_ids, weight, default_row):
        return self._ops.gather_changed(chunks, [int(c) for c in chunk_rel], [int(bool(e)) for e in exact],
                                        int(version_rel), stamp, row_ids, weight, int(default_row))

    def rows_not_in(self, rows, chunks, num_rows):
        return self._ops.rows_not_in(rows, chunks, int(num_rows))

    def pool_rows(self, weight, rows, offsets, per_sample_weights, mode, stamp=None, stamp_value=0,
                  policy_array=None, policy_mode=0, policy_value=0, skip_row=-1):
        return self._ops.pool_rows(weight, rows, offsets, per_sample_weights, int(mode), stamp, int(stamp_value),
                                   policy_array, int(policy_mode), int(policy_value), int(skip_row))

    def bag_index(self, offsets):
        return self._ops.bag_index(offsets)

    def accumulate_grads(self, rows, src, src_idx, scale):
        return self._ops.accumulate_grads(rows, src, src_idx, scale)

    def accumulate_update(self, kind, weight, state1, state2, steps, hyperparams, rows, src, src_idx, scale, skip_row,
                          stamp, stamp_value):
        return self._ops.accumulate_update(int(kind), weight, state1, state2, steps, [float(h) for h in hyperparams],
                                           rows, src, src_idx, scale, int(skip_row), stamp, int(stamp_value))

    def sparse_update(self, kind, weight, rows, grads, state1, state2, steps, hyperparams):
        self._ops.sparse_update(int(kind), weight, rows, grads, state1, state2, steps, [float(h) for h in hyperparams])

    def init_uniform(self, weight, rows, ids, seed, low, high):
        self._ops.init_uniform(weight, rows, ids, int(seed), float(low), float(high))


def _first_errors(stderr: str, limit: int = 40) -> str:
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if "error" in line), 0)
    return "\n".join(lines[first:first + limit])
