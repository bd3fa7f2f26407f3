"""The ``cuda`` HSTU attention backend: hand-written CUDA C++ kernels for Hopper (sm_90).

The kernels live in ``kernels/cuda/`` (``hstu_fwd.cu``, ``hstu_bwd_dq.cu``,
``hstu_bwd_dkdv.cu``: mma.sync m16n8k16 tensor-core tiles fed by ldmatrix from swizzled
shared memory and a two-stage cp.async pipeline; ``hstu_binding.cpp`` adapts torch
tensors). They are compiled on first use with nvcc through ``torch.utils.cpp_extension``
into ``$GAUSS_PLUGINS_CACHE/cuda_attention/<hash of sources, flags, torch>`` (announced once
on stderr, about a minute; ``gauss build`` does it ahead of time), so a changed source or
torch rebuilds and nothing stale is loaded. Importing this module compiles nothing, and
the package works without CUDA or nvcc.

What the kernels take (semantics identical to the ``triton`` backend and the reference):
bf16 or fp16, head dim 64 or 128 (``d_qk == d_v``), causal masking with optional
``num_targets``, the relative position-bias table fused in the forward and both backward
kernels (its gradient reduced per tile in shared memory), and either normaliser. Anything
else (fp32/fp64, other head dims, bidirectional, contextual prefix, attention window,
dense ``rab``, the time-bias table, a GPU other than sm_90, a failed build) runs on the
``triton`` backend instead; each distinct reason is logged once
(:meth:`CudaAttentionBackend.unsupported_reason` says why for a given call).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, Optional

import torch

__all__ = ["CudaAttentionBackend", "hstu_attention_cuda", "build", "load_extension", "ExtensionBuildError",
           "SOURCE_DIR", "KERNEL_SOURCES"]

logger = logging.getLogger(__name__)

SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda")
KERNEL_SOURCES = ("hstu_fwd.cu", "hstu_bwd_dq.cu", "hstu_bwd_dkdv.cu")
_BINDING = "hstu_binding.cpp"
_HEADERS = ("hstu_api.h", "hstu_common.cuh")
# Tensor-core mma.sync runs on sm_80 and later; the build targets this machine's Hopper
# (sm_90) only, and the backend declines other GPUs (a kernel image missing for the device
# would fail at launch instead).
_ARCH = "9.0"
_CUDA_FLAGS = ["-O3", "-lineinfo"]  # torch adds its C++ standard
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
_SUPPORTED_DIMS = (64, 128)


class ExtensionBuildError(RuntimeError):
    """The CUDA kernels could not be built or loaded here."""


_lock = threading.Lock()
_ext = None
_error: Optional[str] = None
_build_seconds: Optional[float] = None
_build_dir: Optional[str] = None


def _source_hash() -> str:
    key = hashlib.sha256()
    for name in (*KERNEL_SOURCES, _BINDING, *_HEADERS):
        with open(os.path.join(SOURCE_DIR, name), "rb") as f:
            key.update(name.encode() + b"\0" + f.read() + b"\0")
    key.update(" ".join(_CUDA_FLAGS + [_ARCH, torch.__version__, str(torch.version.cuda), sys.version]).encode())
    return key.hexdigest()[:20]


def load_extension():
    """The compiled module (``forward`` / ``backward``), built on first use; raises
    :class:`ExtensionBuildError` with the compiler's message when that fails (the failure
    is remembered: the build is not retried in this process)."""
    global _ext, _error, _build_seconds, _build_dir
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:
            raise ExtensionBuildError(_error)
        try:
            from torch.utils import cpp_extension

            from gauss_plugins._cachedir import cache_root

            digest = _source_hash()
            _build_dir = cache_root("cuda_attention", digest)
            os.makedirs(_build_dir, exist_ok=True)
            name = f"gauss_hstu_cuda_{digest}"
            cached = any(f.startswith(name) and f.endswith(".so") for f in os.listdir(_build_dir))
            if not cached:
                print(f"gauss_kernels: compiling the CUDA HSTU attention kernels into {_build_dir} "
                      "(once; about a minute)", file=sys.stderr, flush=True)
            # the arch list decides the -gencode flags; set only for this build
            saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
            os.environ["TORCH_CUDA_ARCH_LIST"] = _ARCH
            t0 = time.perf_counter()
            try:
                ext = cpp_extension.load(
                    name=name, sources=[os.path.join(SOURCE_DIR, s) for s in (_BINDING, *KERNEL_SOURCES)],
                    extra_include_paths=[SOURCE_DIR], extra_cflags=["-O3"], extra_cuda_cflags=_CUDA_FLAGS,
                    build_directory=_build_dir, verbose=False)
            finally:
                if saved is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = saved
            if not cached:
                _build_seconds = time.perf_counter() - t0
            _ext = ext
        except Exception as exc:  # noqa: BLE001 - any build/load failure is reported, and kept
            _error = f"{type(exc).__name__}: {exc}"[-4000:]
            raise ExtensionBuildError(_error) from exc
    return _ext


def build() -> Dict[str, Any]:
    """Compile the kernels now unless the cache has them (``gauss build``)."""
    load_extension()
    return {"name": "CUDA HSTU attention kernels (kernels/cuda)", "path": _build_dir or "",
            "built": _build_seconds is not None, "seconds": round(_build_seconds or 0.0, 1)}


def _new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """Allocates every tensor the kernels write (out, dq, dk, dv): uninitialised, each element
    is written by exactly one CTA. Tests replace it with a NaN-filling allocator."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


_logged_reasons: set = set()


def _log_fallback(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("cuda HSTU attention: running this call on the triton backend: %s", reason)


def _triton():
    from gauss_kernels.hstu.triton_attention import hstu_attention_triton

    return hstu_attention_triton()


class CudaAttentionBackend:
    """HSTU attention backend on the CUDA C++ kernels (see the module docstring).

    ``forward`` / ``backward`` follow :class:`gauss_plugins.hstu.attention.AttentionBackend`;
    a call the kernels do not take runs on the ``triton`` backend (reason logged once).
    """

    @staticmethod
    def unsupported_reason(q, k, v, *, causal: bool = True, contextual_len: int = 0, max_attn_len: int = 0,
                           rab=None, time_bias=None, position_bias=None, check_device: bool = True,
                           **_ignored) -> Optional[str]:
        """Why the CUDA kernels cannot run this call (None when they can). The options are
        checked first, then (``check_device``) the device and the build."""
        if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            return f"dtype {q.dtype} (the CUDA kernels take bf16 and fp16)"
        d_qk, d_v = q.shape[-1], v.shape[-1]
        if d_qk != d_v or d_qk not in _SUPPORTED_DIMS:
            return f"head dims d_qk={d_qk}, d_v={d_v} (the CUDA kernels take d_qk == d_v in {_SUPPORTED_DIMS})"
        if not causal:
            return "bidirectional attention (causal=False)"
        if contextual_len:
            return "a contextual prefix (contextual_len > 0)"
        if max_attn_len:
            return "an attention window (max_attn_len > 0)"
        if rab is not None:
            return "a dense relative attention bias (rab)"
        if time_bias is not None:
            return "the time-bias table"
        if position_bias is not None and not position_bias.dtype.is_floating_point:
            return f"a {position_bias.dtype} position_bias table"
        if not check_device:
            return None
        if q.device.type != "cuda":
            return f"tensors on {q.device} (the CUDA kernels need a CUDA device)"
        capability = torch.cuda.get_device_capability(q.device)
        if capability != (9, 0):
            return f"GPU sm_{capability[0]}{capability[1]} (the CUDA kernels are built for sm_90, Hopper)"
        try:
            load_extension()
        except ExtensionBuildError as exc:
            return f"the CUDA kernels did not build here ({str(exc)[-300:]}); `gauss build` shows the whole error"
        return None

    def forward(self, q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
                rab: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                time_bias: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                time_bucket_scale: float = 0.301, normalizer: str = "max_seq_len") -> torch.Tensor:
        options = dict(max_seq_len=max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
                       contextual_len=contextual_len, max_attn_len=max_attn_len, rab=rab,
                       position_bias=position_bias, time_bias=time_bias, timestamps=timestamps,
                       time_bucket_scale=time_bucket_scale, normalizer=normalizer)
        reason = self.unsupported_reason(q, k, v, **options)
        if reason is not None:
            _log_fallback(reason)
            return _triton().forward(q, k, v, offsets, **options)
        q, k, v, offsets, num_targets, table = _prepare(q, k, v, offsets, num_targets, position_bias, max_seq_len,
                                                        normalizer)
        out = _new_output(v.shape, q)
        with _on_device(q):
            load_extension().forward(q, k, v, offsets, num_targets, table, int(max_seq_len), float(alpha),
                                     normalizer == "seq_len", out, torch.cuda.current_stream(q.device).cuda_stream)
        return out

    def backward(self, grad_out, q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                 num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
                 rab: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                 time_bias: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                 time_bucket_scale: float = 0.301, normalizer: str = "max_seq_len",
                 compute_drab: bool = True, compute_dposition_bias: bool = True, compute_dtime_bias: bool = True):
        options = dict(max_seq_len=max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
                       contextual_len=contextual_len, max_attn_len=max_attn_len, rab=rab,
                       position_bias=position_bias, time_bias=time_bias, timestamps=timestamps,
                       time_bucket_scale=time_bucket_scale, normalizer=normalizer)
        reason = self.unsupported_reason(q, k, v, **options)
        if reason is not None:
            _log_fallback(reason)
            return _triton().backward(grad_out, q, k, v, offsets, compute_drab=compute_drab,
                                      compute_dposition_bias=compute_dposition_bias,
                                      compute_dtime_bias=compute_dtime_bias, **options)
        if tuple(grad_out.shape) != tuple(v.shape):
            raise ValueError(f"grad_out must have shape {tuple(v.shape)}, got {tuple(grad_out.shape)}")
        grad_out = grad_out.to(q.dtype).contiguous()
        q, k, v, offsets, num_targets, table = _prepare(q, k, v, offsets, num_targets, position_bias, max_seq_len,
                                                        normalizer)
        dq, dk, dv = _new_output(q.shape, q), _new_output(k.shape, k), _new_output(v.shape, v)
        rows = None
        if table is not None and compute_dposition_bias:
            # one fp32 row per (sequence, head): CTAs of one (sequence, head) rarely add to the
            # same entry at once; summed over the rows below
            rows = torch.zeros((offsets.shape[0] - 1) * q.shape[1], table.shape[0], dtype=torch.float32,
                               device=q.device)
        with _on_device(q):
            load_extension().backward(grad_out, q, k, v, offsets, num_targets, table, int(max_seq_len), float(alpha),
                                      normalizer == "seq_len", dq, dk, dv, rows,
                                      torch.cuda.current_stream(q.device).cuda_stream)
        dpos = None
        if rows is not None:
            dpos = rows.sum(0).to(position_bias.dtype)
        return dq, dk, dv, None, dpos, None


class _on_device:
    """Runs the launch under the tensors' device (the binding uses the current stream of
    the device the caller names); a no-op when it already is the current one."""

    def __init__(self, t: torch.Tensor) -> None:
        self.index = t.device.index
        self.ctx = None

    def __enter__(self):
        if self.index is not None and self.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(self.index)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _prepare(q, k, v, offsets, num_targets, position_bias, max_seq_len, normalizer):
    if normalizer not in ("max_seq_len", "seq_len"):
        raise ValueError(f"normalizer must be 'max_seq_len' or 'seq_len', got {normalizer!r}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [T, H, D] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    table = None
    if position_bias is not None:
        if position_bias.dim() != 1 or position_bias.shape[0] < 2 * max_seq_len - 1:
            raise ValueError(f"position_bias needs 2L - 1 >= {2 * max_seq_len - 1} entries (L >= max_seq_len), "
                             f"got shape {tuple(position_bias.shape)}")
        # the kernels read the table in fp32, as the triton backend converts each entry
        table = position_bias.to(torch.float32).contiguous()
    if num_targets is not None:
        num_targets = num_targets.to(torch.int64).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    return q.contiguous(), k.contiguous(), v.contiguous(), offsets, num_targets, table


_backend = CudaAttentionBackend()


def hstu_attention_cuda() -> CudaAttentionBackend:
    """Factory of the ``cuda`` attention backend (stateless; one is shared)."""
    return _backend
