"""Large CPU arrays backed by transparent huge pages.

A table's value arena and hash slots are read at random: with 4 KiB pages nearly every row
access also misses the TLB. On Linux, where transparent huge pages are in ``madvise``
mode (the common default), :func:`alloc` asks for 2 MiB pages (``madvise(MADV_HUGEPAGE)``
on a 2 MiB-aligned region, before the memory is first touched). Measured on the 2-core
CPU machine: random dim-64 row gathers from a 2M-row array ran up to ~2x faster. Anywhere
else (other OS, CUDA, small arrays, a failing call) it is a plain ``torch.full``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Sequence

import torch

__all__ = ["alloc"]

_HUGE = 1 << 21
_MIN_BYTES = 4 * _HUGE
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


def alloc(shape: Sequence[int], dtype: torch.dtype, device, fill=0) -> torch.Tensor:
    """``torch.full(shape, fill, dtype=dtype, device=device)``, on huge pages where possible."""
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    madvise = _madvise() if device.type == "cpu" else None
    if madvise is None or numel * itemsize < _MIN_BYTES:
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    slack = _HUGE // itemsize
    base = torch.empty(numel + slack, dtype=dtype)
    start = -(-base.data_ptr() // _HUGE) * _HUGE
    offset = (start - base.data_ptr()) // itemsize
    out = base[offset: offset + numel]
    length = (numel * itemsize) // _HUGE * _HUGE
    madvise(start, length, _MADV_HUGEPAGE)  # best effort: failure leaves normal pages
    out.fill_(fill)
    return out.view(tuple(shape))
