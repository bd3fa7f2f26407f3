"""The ``triton`` HSTU attention backend: fused forward and backward (all mask modes).

:func:`hstu_attention_triton` is the backend factory registered in
:mod:`gauss_kernels.plugin`; it returns a :class:`TritonAttentionBackend`, whose
``forward`` / ``backward`` follow :class:`gauss_plugins.hstu.attention.AttentionBackend`
(same arguments and semantics as :func:`gauss_plugins.hstu.attention.hstu_attention_reference`).
:func:`hstu_attention_fused` is a differentiable function over the same kernels for callers
that want the kernels without the custom op.

The launch path is kept short because small HSTU layers are host-bound: no host-device
synchronisation (no ``.item()``; ``max_seq_len`` sizes the grid and programs past a
sequence's end return at once), block configurations looked up in a dict, and autotuning
only on the first call for a shape class (never during CUDA graph capture).

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

__all__ = ["TritonAttentionBackend", "hstu_attention_triton", "hstu_attention_fused"]

_NORMALIZERS = ("max_seq_len", "seq_len")


class _Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """Allocates every tensor the kernels write (out, dq, dk, dv). Uninitialised on
    purpose: each element is written by exactly one program. Tests replace this with a
    NaN-filling allocator so that an element no program wrote shows up."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2_at_least(d: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (int(d) - 1).bit_length())


# Candidate block configurations per kernel, by the padded head dim (the larger of d_qk and
# d_v). First entry = the default (used untuned, e.g. in graph capture or with autotuning
# off). Hopper: BLOCK_M 64/128 matches warpgroup MMA tiles; the fp32 accumulators of
# [BLOCK, D] tiles bound the block sizes as D grows.
_CANDIDATES: Dict[str, Dict[int, List[_Config]]] = {
    "fwd": {
        64: [_Config(64, 64, 4, 3), _Config(128, 64, 4, 3), _Config(128, 128, 8, 3), _Config(64, 32, 4, 3),
             _Config(64, 128, 4, 2), _Config(128, 64, 8, 3)],
        128: [_Config(64, 64, 4, 3), _Config(64, 32, 4, 3), _Config(64, 64, 4, 2), _Config(64, 128, 4, 2),
              _Config(128, 64, 8, 3), _Config(128, 128, 8, 2), _Config(128, 32, 8, 4)],
        256: [_Config(64, 64, 4, 2), _Config(128, 64, 8, 2), _Config(64, 32, 4, 3), _Config(128, 32, 8, 2)],
    },
    "dkdv": {
        64: [_Config(32, 64, 4, 4), _Config(64, 128, 8, 3), _Config(32, 128, 4, 3), _Config(64, 64, 4, 3),
             _Config(32, 32, 4, 4)],
        128: [_Config(32, 64, 4, 3), _Config(64, 64, 4, 2), _Config(32, 64, 4, 4), _Config(64, 64, 4, 3),
              _Config(32, 128, 8, 3), _Config(64, 128, 8, 2), _Config(32, 32, 4, 4)],
        256: [_Config(32, 64, 4, 2), _Config(64, 64, 8, 2), _Config(32, 128, 8, 2), _Config(16, 64, 4, 2)],
    },
    "dq": {
        64: [_Config(64, 64, 4, 3), _Config(128, 64, 8, 3), _Config(128, 64, 4, 3), _Config(64, 32, 4, 3),
             _Config(128, 128, 8, 2)],
        128: [_Config(128, 64, 8, 3), _Config(64, 32, 4, 3), _Config(64, 64, 4, 3), _Config(64, 64, 4, 2),
              _Config(128, 64, 8, 2), _Config(128, 32, 8, 3)],
        256: [_Config(64, 32, 4, 2), _Config(64, 64, 8, 2), _Config(128, 32, 8, 2), _Config(32, 32, 4, 2)],
    },
}
# tiny tiles under the interpreter (it runs program by program); tests may set other
# (BLOCK_M, BLOCK_N) pairs here to exercise the block-range logic
_INTERPRETER_CONFIGS: Dict[str, _Config] = {kind: _Config(16, 16, 1, 1) for kind in ("fwd", "dkdv", "dq")}

_tuned: Dict[tuple, _Config] = {}
_tune_lock = threading.Lock()


def _autotune_enabled() -> bool:
    return os.environ.get("GAUSS_HSTU_AUTOTUNE", "1") != "0"


def _seq_bucket(max_seq_len: int) -> int:
    # one tuning per power of two of the padded length
    return 1 << max(0, (max_seq_len - 1).bit_length())


def _pick(kind: str, key: tuple, block_d: int, launch: Callable[[_Config], None], may_tune: bool) -> _Config:
    """The block config for ``kind``: cached, tuned on first use when allowed, else the
    default. ``launch(cfg)`` runs the kernel once with ``cfg`` (outputs overwritten)."""
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    if _interpreting():
        return _INTERPRETER_CONFIGS[kind]
    candidates = _CANDIDATES[kind][min(256, max(64, block_d))]
    if not (may_tune and _autotune_enabled()) or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench

    with _tune_lock:
        if key in _tuned:
            return _tuned[key]
        best, best_ms = candidates[0], float("inf")
        for cfg in candidates:
            try:
                ms = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
            except Exception as exc:  # out of shared memory / registers on this GPU: skip it
                if "resources" not in str(exc).lower() and "shared memory" not in str(exc).lower():
                    raise
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _tuned[key] = best
        return best


# ---------------------------------------------------------------- argument handling
class _Call(NamedTuple):
    """Everything the three kernels share, computed once per call."""

    B: int
    H: int
    d_qk: int
    d_v: int
    block_dq: int
    block_dv: int
    max_seq_len: int
    half_alpha: float  # the kernels work with s / 2 (see triton_kernels)
    scale: float
    contextual_len: int
    max_attn_len: int
    flags: dict
    num_targets: torch.Tensor
    rab: Optional[torch.Tensor]
    rab_strides: Tuple[int, int, int]
    key: tuple


def _prepare(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len,
             rab, normalizer) -> _Call:
    interpreting = _interpreting()
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [T, H, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not interpreting:
        raise RuntimeError(
            f"the triton HSTU attention backend needs CUDA tensors (got {q.device}); use backend='torch' "
            "on CPU, or set TRITON_INTERPRET=1 before importing triton to run the kernels interpreted")
    if normalizer not in _NORMALIZERS:
        raise ValueError(f"normalizer must be one of {_NORMALIZERS}, got {normalizer!r}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    T, H, d_qk = q.shape
    d_v = v.shape[2]
    if d_qk > 256 or d_v > 256:
        raise ValueError(f"head dims up to 256 are supported, got d_qk={d_qk}, d_v={d_v}")
    B = offsets.shape[0] - 1
    has_targets = num_targets is not None
    if has_targets and num_targets.dtype != torch.int64:
        num_targets = num_targets.to(torch.int64)
    rab_strides = (0, 0, 0)
    if rab is not None:
        if rab.stride(-1) != 1:
            rab = rab.contiguous()
        rab_strides = (0 if rab.shape[0] == 1 else rab.stride(0), 0 if rab.shape[1] == 1 else rab.stride(1),
                       rab.stride(2))
    fp32 = q.dtype in (torch.float32, torch.float64)
    flags = dict(
        CAUSAL=bool(causal),
        HAS_TARGETS=has_targets,
        HAS_CONTEXT=contextual_len > 0,
        HAS_WINDOW=max_attn_len > 0,
        HAS_RAB=rab is not None,
        SCALE_BY_SEQ_LEN=normalizer == "seq_len",
        # tanh.approx is PTX: not under the interpreter, and not precise enough for fp32
        FAST_SILU=not fp32 and not interpreting,
        PRECISION="ieee" if fp32 else "tf32",
        F64=q.dtype == torch.float64,
    )
    block_dq, block_dv = _pow2_at_least(d_qk), _pow2_at_least(d_v)
    pure_causal = flags["CAUSAL"] and not (has_targets or flags["HAS_CONTEXT"] or flags["HAS_WINDOW"])
    key = (block_dq, block_dv, q.dtype, _seq_bucket(max_seq_len), pure_causal, rab is not None,
           q.device.index)
    return _Call(B, H, d_qk, d_v, block_dq, block_dv, max_seq_len, 0.5 * float(alpha), 1.0 / max_seq_len,
                 int(contextual_len), int(max_attn_len), flags,
                 num_targets if has_targets else offsets, rab, rab_strides, key)


def _forward(q, k, v, offsets, c: _Call) -> torch.Tensor:
    from gauss_kernels.hstu.triton_kernels import hstu_fwd_kernel

    out = _new_output((q.shape[0], c.H, c.d_v), q)
    rab = c.rab if c.rab is not None else q

    def launch(cfg: _Config) -> None:
        grid = (c.B * c.H, triton_cdiv(c.max_seq_len, cfg.block_m))
        hstu_fwd_kernel[grid](
            q, k, v, rab, out, offsets, c.num_targets, *c.rab_strides,
            c.H, c.half_alpha, c.scale, c.contextual_len, c.max_attn_len,
            D_QK=c.d_qk, D_V=c.d_v, BLOCK_DQ=c.block_dq, BLOCK_DV=c.block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **c.flags,
        )

    cfg = _pick("fwd", ("fwd",) + c.key, max(c.block_dq, c.block_dv), launch, may_tune=True)
    launch(cfg)
    return out


def _backward(grad_out, q, k, v, offsets, c: _Call, compute_drab: bool):
    from gauss_kernels.hstu.triton_kernels import hstu_bwd_dkdv_kernel, hstu_bwd_dq_kernel

    dq = _new_output(q.shape, q)
    dk = _new_output(k.shape, k)
    dv = _new_output(v.shape, v)
    rab = c.rab if c.rab is not None else q
    drab_out = None
    drab_buf = q
    drab_strides = (0, 0, 0)
    rab_grad = compute_drab and c.rab is not None
    atomic = False
    if rab_grad:
        atomic = c.rab.shape[0] != c.B or c.rab.shape[1] != c.H
        # every (b, h, i, j) the kernel never visits (masked blocks, padding) must read 0;
        # broadcast rab sums several programs' contributions with fp32 atomics
        drab_buf = torch.zeros(c.rab.shape, dtype=torch.float32 if atomic else c.rab.dtype, device=q.device)
        drab_strides = (0 if drab_buf.shape[0] == 1 else drab_buf.stride(0),
                        0 if drab_buf.shape[1] == 1 else drab_buf.stride(1), drab_buf.stride(2))
    flags = dict(c.flags)

    def launch_dkdv(cfg: _Config) -> None:
        grid = (c.B * c.H, triton_cdiv(c.max_seq_len, cfg.block_n))
        hstu_bwd_dkdv_kernel[grid](
            q, k, v, grad_out, rab, drab_buf, dk, dv, offsets, c.num_targets,
            *c.rab_strides, *drab_strides,
            c.H, c.half_alpha, c.scale, c.contextual_len, c.max_attn_len,
            D_QK=c.d_qk, D_V=c.d_v, BLOCK_DQ=c.block_dq, BLOCK_DV=c.block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            RAB_GRAD=rab_grad, RAB_GRAD_ATOMIC=atomic, **flags,
        )

    def launch_dq(cfg: _Config) -> None:
        grid = (c.B * c.H, triton_cdiv(c.max_seq_len, cfg.block_m))
        hstu_bwd_dq_kernel[grid](
            q, k, v, grad_out, rab, dq, offsets, c.num_targets, *c.rab_strides,
            c.H, c.half_alpha, c.scale, c.contextual_len, c.max_attn_len,
            D_QK=c.d_qk, D_V=c.d_v, BLOCK_DQ=c.block_dq, BLOCK_DV=c.block_dv,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **flags,
        )

    block_d = max(c.block_dq, c.block_dv)
    # tuning reruns the kernel: fine for plain stores, not for atomically summed drab
    cfg = _pick("dkdv", ("dkdv", rab_grad) + c.key, block_d, launch_dkdv, may_tune=not atomic)
    launch_dkdv(cfg)
    cfg = _pick("dq", ("dq",) + c.key, block_d, launch_dq, may_tune=True)
    launch_dq(cfg)
    if rab_grad:
        drab_out = drab_buf.to(c.rab.dtype) if atomic else drab_buf
    return dq, dk, dv, drab_out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


# ---------------------------------------------------------------- public API
class TritonAttentionBackend:
    """HSTU attention backend with fused Triton kernels (see the module docstring).

    ``forward`` and ``backward`` take the arguments of
    :func:`gauss_plugins.hstu.attention.hstu_attention_reference` (``backward`` also
    ``grad_out`` first and ``compute_drab``) and return ``out`` and ``(dq, dk, dv, drab)``.
    """

    def forward(self, q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
                rab: Optional[torch.Tensor] = None, normalizer: str = "max_seq_len") -> torch.Tensor:
        q, k, v = _contig(q), _contig(k), _contig(v)
        c = _prepare(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len,
                     rab, normalizer)
        return _forward(q, k, v, offsets, c)

    def backward(self, grad_out, q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                 num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
                 rab: Optional[torch.Tensor] = None, normalizer: str = "max_seq_len",
                 compute_drab: bool = True):
        q, k, v, grad_out = _contig(q), _contig(k), _contig(v), _contig(grad_out)
        if tuple(grad_out.shape) != (q.shape[0], q.shape[1], v.shape[2]):
            raise ValueError(f"grad_out must have shape {(q.shape[0], q.shape[1], v.shape[2])}, "
                             f"got {tuple(grad_out.shape)}")
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        c = _prepare(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len,
                     rab, normalizer)
        return _backward(grad_out, q, k, v, offsets, c, compute_drab)


_backend = TritonAttentionBackend()


def hstu_attention_triton() -> TritonAttentionBackend:
    """Factory of the ``triton`` attention backend (the object is stateless; one is shared)."""
    return _backend


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rab, offsets, num_targets, options):
        c = _prepare(q, k, v, offsets, options["max_seq_len"], options["alpha"], options["causal"], num_targets,
                     options["contextual_len"], options["max_attn_len"], rab, options["normalizer"])
        ctx.save_for_backward(q, k, v, rab, offsets, num_targets)
        ctx.call = c
        return _forward(q, k, v, offsets, c)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rab, offsets, num_targets = ctx.saved_tensors
        c = ctx.call
        grad_out = _contig(grad_out).to(q.dtype)
        compute_drab = rab is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drab = _backward(grad_out, q, k, v, offsets, c, compute_drab)
        return dq, dk, dv, drab, None, None, None


def hstu_attention_fused(q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                         num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0,
                         max_attn_len: int = 0, rab: Optional[torch.Tensor] = None,
                         normalizer: str = "max_seq_len") -> torch.Tensor:
    """Differentiable HSTU attention on the fused kernels, without the custom op around it
    (no input validation beyond layouts: offsets and num_targets are trusted)."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    options = dict(max_seq_len=max_seq_len, alpha=alpha, causal=causal, contextual_len=contextual_len,
                   max_attn_len=max_attn_len, normalizer=normalizer)
    return _FusedFunction.apply(q, k, v, rab, offsets, num_targets, options)
