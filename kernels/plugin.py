"""Registers the kernels of this package as backends (entry point ``kernels``).

Factories are import paths so that listing them never imports triton; availability says
why a kernel cannot run here (triton missing, no CUDA device, no C++ compiler).
"""
from __future__ import annotations

import os
import shutil

from gauss_plugins.components import Availability, AVAILABLE, Component, all_of, requires_cuda, requires_modules
from gauss_plugins.plugins import hookimpl

_triton = requires_modules("triton", extra="triton")


def _on_cuda(**context) -> bool:
    tensors = [v for v in context.values() if hasattr(v, "device")]
    device = context.get("device")
    if device is not None:
        return str(device).startswith("cuda")
    return bool(tensors) and all(t.device.type == "cuda" for t in tensors)


def _on_cpu(**context) -> bool:
    device = context.get("device")
    return device is None or str(device) == "cpu" or str(device).startswith("cpu")


def _nvcc() -> Availability:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") or os.path.exists(os.path.join(home, "bin", "nvcc")):
        return AVAILABLE
    return Availability(False, "no nvcc (the CUDA toolkit) to build the kernels: install it or set CUDA_HOME")


def _cxx_compiler() -> Availability:
    if shutil.which("c++") or shutil.which("g++"):
        return AVAILABLE
    return Availability(False, "no C++ compiler on PATH (install g++)")


@hookimpl
def gauss_register_attention_backends():
    return [
        Component(
            kind="attention_backend",
            name="triton",
            factory="gauss_kernels.hstu.triton_attention:hstu_attention_triton",
            description="fused HSTU attention, forward and backward, all masks (Triton)",
            check=all_of(_triton, requires_cuda),
            supports=_on_cuda,
            priority=100,
        ),
        Component(
            kind="attention_backend",
            name="cuda",
            factory="gauss_kernels.hstu.cuda_attention:hstu_attention_cuda",
            description="HSTU attention in CUDA C++ for sm_90 (bf16/fp16, D 64/128, causal + targets, position "
                        "bias); other calls run on triton",
            # triton: the calls these kernels do not take run there
            check=all_of(_triton, requires_cuda, _nvcc),
            supports=_on_cuda,
            # below triton until it measures faster (benchmarks/hstu_attention.py); by name: backend="cuda"
            priority=90,
        ),
    ]


@hookimpl
def gauss_register_table_backends():
    return [
        Component(
            kind="table_backend",
            name="triton",
            factory="gauss_kernels.hash_table.triton_index:TritonHashIndex",
            description="open-addressing hash index with fused probe/insert kernels (Triton, CUDA)",
            check=all_of(_triton, requires_cuda),
            supports=_on_cuda,
            priority=100,
        ),
        Component(
            kind="table_backend",
            name="cpu_ext",
            factory="gauss_kernels.hash_table.cpu_ext:CpuHashIndex",
            description="open-addressing hash index as a compiled C++ op (built on first use, cached)",
            check=_cxx_compiler,
            supports=_on_cpu,
            priority=50,
        ),
    ]


@hookimpl
def gauss_build_extensions():
    from gauss_kernels.hash_table import cpu_ext

    results = [cpu_ext.build()]
    if requires_cuda() and _nvcc():
        from gauss_kernels.hstu import cuda_attention

        results.append(cuda_attention.build())
    return results
