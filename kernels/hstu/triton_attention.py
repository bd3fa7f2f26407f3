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
    tma: bool = False  # streamed tiles (K/V, or Q/dO for dK/dV) through host tensor descriptors (TMA)
    ws: bool = False  # forward only: warp-specialized main loop
    maxnreg: Optional[int] = None  # cap on registers per thread (ptxas), to fit one more program per SM


def _experimental(cfg: _Config) -> bool:
    return cfg.tma or cfg.ws


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
# [BLOCK, D] tiles bound the block sizes as D grows. A register cap (maxnreg) trades a few
# registers for occupancy: the forward's 64x32 tiles at D=128 need 167 registers without the
# position strip and 175 with it (sm_90, triton 3.7), which is 3 versus 2 programs of 4 warps
# per SM; at 168 the strip version still fits without spilling.
_CANDIDATES: Dict[str, Dict[int, List[_Config]]] = {
    "fwd": {
        64: [_Config(64, 64, 4, 3), _Config(128, 64, 4, 3), _Config(128, 128, 8, 3), _Config(64, 32, 4, 3),
             _Config(128, 64, 8, 3), _Config(64, 64, 4, 3, tma=True),
             _Config(128, 64, 8, 3, tma=True), _Config(128, 64, 8, 2, tma=True, ws=True)],
        128: [_Config(64, 64, 4, 3), _Config(64, 32, 4, 3, maxnreg=168), _Config(64, 32, 4, 3), _Config(64, 64, 4, 2),
              _Config(128, 64, 8, 3),
              _Config(128, 128, 8, 2), _Config(128, 32, 8, 4),
              _Config(64, 64, 4, 3, tma=True), _Config(128, 64, 8, 3, tma=True), _Config(128, 128, 8, 2, tma=True),
              _Config(64, 64, 4, 3, tma=True, ws=True), _Config(128, 64, 8, 2, tma=True, ws=True),
              _Config(128, 128, 8, 2, tma=True, ws=True), _Config(64, 64, 4, 3, ws=True)],
        256: [_Config(64, 64, 4, 2), _Config(128, 64, 8, 2), _Config(64, 32, 4, 3), _Config(128, 32, 8, 2)],
    },
    "dkdv": {
        64: [_Config(32, 64, 4, 4), _Config(64, 128, 8, 3), _Config(32, 128, 4, 3), _Config(64, 64, 4, 3),
             _Config(32, 32, 4, 4)],
        128: [_Config(32, 64, 4, 3), _Config(64, 64, 4, 2), _Config(32, 64, 4, 4), _Config(64, 64, 4, 3),
              _Config(32, 128, 8, 3), _Config(64, 128, 8, 2), _Config(32, 32, 4, 4),
              _Config(32, 64, 4, 3, tma=True), _Config(32, 64, 4, 4, tma=True), _Config(64, 64, 4, 2, tma=True),
              _Config(32, 128, 8, 3, tma=True)],
        256: [_Config(32, 64, 4, 2), _Config(64, 64, 8, 2), _Config(32, 128, 8, 2), _Config(16, 64, 4, 2)],
    },
    "dq": {
        64: [_Config(64, 64, 4, 3), _Config(128, 64, 8, 3), _Config(128, 64, 4, 3), _Config(64, 32, 4, 3),
             _Config(128, 128, 8, 2)],
        128: [_Config(128, 64, 8, 3), _Config(64, 32, 4, 3), _Config(64, 64, 4, 3), _Config(64, 64, 4, 2),
              _Config(128, 64, 8, 2), _Config(128, 32, 8, 3), _Config(128, 64, 8, 3, tma=True),
              _Config(64, 64, 4, 3, tma=True), _Config(64, 32, 4, 3, tma=True), _Config(128, 32, 8, 3, tma=True)],
        256: [_Config(64, 32, 4, 2), _Config(64, 64, 8, 2), _Config(128, 32, 8, 2), _Config(32, 32, 4, 2)],
    },
}
# fp32 / fp64 inputs (correctness paths, exact dots): smaller tiles fit their bytes
_WIDE_CANDIDATES: Dict[str, Dict[int, List[_Config]]] = {
    "fwd": {64: [_Config(64, 32, 4, 2), _Config(32, 32, 4, 2)], 128: [_Config(32, 32, 4, 2), _Config(16, 16, 4, 1)],
            256: [_Config(16, 16, 4, 1)]},
    "dkdv": {64: [_Config(32, 32, 4, 2), _Config(16, 32, 4, 2)], 128: [_Config(16, 32, 4, 2), _Config(16, 16, 4, 1)],
             256: [_Config(16, 16, 4, 1)]},
    "dq": {64: [_Config(64, 32, 4, 2), _Config(32, 32, 4, 2)], 128: [_Config(32, 32, 4, 2), _Config(16, 16, 4, 1)],
           256: [_Config(16, 16, 4, 1)]},
}

# the forward and dQ kernels split causal rows at a BLOCK_M boundary into whole BLOCK_N blocks
for _kind in ("fwd", "dq"):
    for _configs in list(_CANDIDATES[_kind].values()) + list(_WIDE_CANDIDATES[_kind].values()):
        for _cfg in _configs:
            if _cfg.block_m % _cfg.block_n:
                raise AssertionError(f"{_kind} config {_cfg}: BLOCK_N must divide BLOCK_M")

# tiny tiles under the interpreter (it runs program by program); tests may set other
# (BLOCK_M, BLOCK_N) pairs here to exercise the block-range logic
_INTERPRETER_CONFIGS: Dict[str, _Config] = {kind: _Config(16, 16, 1, 1) for kind in ("fwd", "dkdv", "dq")}

# How the dK/dV kernel reduces the position-bias gradient when ids are positions (no targets,
# no contextual prefix): True, per tile diagonal sums (a register gather, BLOCK_M atomics per
# wrap); False, one atomic per (query, key) pair, as with targets or a prefix. Read at each
# backward call; the benchmark times both.
_diagonal_position_grads = os.environ.get("GAUSS_HSTU_DIAGONAL_POSITION_GRADS", "1") != "0"
# ... and how a tile's diagonal sums are taken: "carried" (each key row rotated along the
# queries, summed within each thread, wraps carried to the next query block: one set of
# atomics per block, no reduction across warps), "columns" (rotated the same way, one full
# column sum and set of atomics per wrap) or "rows" (each query column rotated along the keys,
# sums along the queries, within a warp). Read at each backward call.
_DIAGONAL_MODES = {"columns": 1, "rows": 2, "carried": 3}
_diagonal_rotation = os.environ.get("GAUSS_HSTU_DIAGONAL_ROTATION", "carried")

# Where the kernels read the position bias when ids are positions (no targets, no contextual
# prefix): True, from strips (``_build_position_strips``: one unit-stride load per tile); False, by
# gathering from the table with the index computed per element. Read when a plan is made;
# the benchmark times both.
_position_strips = os.environ.get("GAUSS_HSTU_POSITION_STRIPS", "1") != "0"
# ... and whether each block loads the next block's strip tile before its dots (a software
# prefetch: the tile's latency overlaps the dots) instead of after them; fp32 / fp64 inputs
# only (see _plan).
_strip_prefetch = os.environ.get("GAUSS_HSTU_STRIP_PREFETCH", "1") != "0"
STRIP_ROWS = 128  # >= every BLOCK_M of the forward / dQ configs and every BLOCK_N of dK/dV
STRIP_MARGIN = 256  # columns past 2 * shift: the last block's tile and a prefetch one block further

_tuned: Dict[tuple, _Config] = {}
_tune_lock = threading.Lock()


def _autotune_enabled() -> bool:
    return os.environ.get("GAUSS_HSTU_AUTOTUNE", "1") != "0"


def _seq_bucket(max_seq_len: int) -> int:
    # one tuning per power of two of the padded length
    return 1 << max(0, (max_seq_len - 1).bit_length())


_tune_failures: Dict[tuple, str] = {}  # (key, config) -> why an experimental config was skipped


def _launch_tuned(kind: str, key: tuple, block_d: int, launch: Callable[[_Config], None], may_tune: bool,
                  allow_tma: bool = False, wide: bool = False) -> None:
    """Launch ``kind`` with its block config for ``key``: cached; else, when tuning is
    allowed (not in graph capture, GAUSS_HSTU_AUTOTUNE != 0), the fastest candidate (each is
    run, outputs are simply overwritten); else the first candidate that fits on this GPU."""
    cfg = _tuned.get(key)
    if cfg is not None:
        launch(cfg)
        return
    if _interpreting():
        launch(_INTERPRETER_CONFIGS[kind])
        return
    from triton.runtime.errors import OutOfResources

    table = _WIDE_CANDIDATES if wide else _CANDIDATES
    candidates = [c for c in table[kind][min(256, max(64, block_d))] if allow_tma or not c.tma]
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing or not (may_tune and _autotune_enabled()):
        for cfg in candidates:
            try:
                launch(cfg)  # a config too large fails while loading, before anything runs
            except OutOfResources:
                continue
            if not capturing:  # a later eager call may still tune
                _tuned[key] = cfg
            return
        raise RuntimeError(f"no {kind} block config fits this GPU (tried {candidates})")
    from triton.testing import do_bench

    with _tune_lock:
        best, best_ms = None, float("inf")
        for cfg in candidates:
            try:
                ms = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
            except Exception as exc:
                # out of shared memory / registers on this GPU, or an experimental variant
                # (TMA, warp specialization) this triton cannot build: skip it, say why
                if not (_experimental(cfg) or isinstance(exc, OutOfResources)):
                    raise
                _tune_failures[(key, cfg)] = f"{type(exc).__name__}: {str(exc)[-300:]}"
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"no {kind} block config fits this GPU (tried {candidates})")
        _tuned[key] = best
    launch(best)


# ---------------------------------------------------------------- launching
_kernels = None


def _kernel_module():
    """The @triton.jit kernels, imported on first use (so importing this module, e.g. to
    list backends, does not compile or decorate anything)."""
    global _kernels
    if _kernels is None:
        from gauss_kernels.hstu import triton_kernels

        _kernels = triton_kernels
    return _kernels


class _Launcher:
    """Launches one ``@triton.jit`` kernel, keeping the host cost of a launch small.

    The first launch for a specialization goes through triton (``kernel[grid](...)``, which
    compiles and caches). Later launches with the same constexprs and the same argument
    properties triton specializes on (16-byte alignment of pointers; integers equal to 1
    or divisible by 16) call the compiled kernel's launcher directly, skipping triton's
    per-call binding and specialization: that is most of the host time of a small layer.
    If this triton's compiled-kernel interface differs, the direct path turns itself off
    and every launch goes through triton (same kernel, more host time).
    """

    direct_enabled = os.environ.get("GAUSS_HSTU_DIRECT_LAUNCH", "1") != "0"

    def __init__(self, name: str) -> None:
        self.name = name
        self._compiled: Dict[tuple, tuple] = {}

    def __call__(self, grid, tensors: tuple, scalars: tuple, constexprs: dict, cfg: _Config, static_key):
        """``static_key`` must identify ``constexprs`` apart from the tile config ``cfg``."""
        # tensor descriptors (TMA configs) are expanded by triton's own launch path: no direct launch
        direct = self.direct_enabled and not cfg.tma and not _interpreting()
        spec = entry = None
        if direct:
            spec = (static_key, cfg, tuple(t.data_ptr() & 15 == 0 for t in tensors),
                    tuple((x == 1, x & 15 == 0, -(1 << 31) <= x < (1 << 31)) for x in scalars if type(x) is int))
            entry = self._compiled.get(spec)
        if entry is not None:
            compiled, tail = entry
            device = tensors[0].device.index
            try:
                compiled.run(grid[0], grid[1], 1, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                             compiled.packed_metadata, None, None, None, *tensors, *scalars, *tail)
                return
            except TypeError:  # another triton version's launcher signature
                _Launcher.direct_enabled = False
        kernel = getattr(_kernel_module(), self.name)
        options = {} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}
        compiled = kernel[grid](*tensors, *scalars, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                **options, **constexprs)
        if direct and hasattr(compiled, "packed_metadata"):
            # the launcher takes every parameter, constexprs included, in signature order
            names = list(kernel.signature.parameters)[len(tensors) + len(scalars):]
            self._compiled[spec] = (compiled, tuple(constexprs[n] for n in names))


_fwd_launcher = _Launcher("hstu_fwd_kernel")
_dkdv_launcher = _Launcher("hstu_bwd_dkdv_kernel")
_dq_launcher = _Launcher("hstu_bwd_dq_kernel")


# ---------------------------------------------------------------- argument handling
class _Plan(NamedTuple):
    """What the three kernels need besides the tensors; cached per layout and options."""

    B: int
    H: int
    half_alpha: float  # the kernels work with s / 2 (see triton_kernels)
    scale: float
    contextual_len: int
    max_attn_len: int
    max_seq_len: int
    constexprs: dict
    block_d: int
    rab_strides: Tuple[int, int, int]
    table_scalars: Tuple[int, float, int]  # (pos_center = L - 1, 1 / time_bucket_scale, num_buckets)
    strip_shift: int  # > 0: the kernels read the position bias from strips with this column shift
    key: tuple
    launch_key: int
    tma_ok: bool  # 16-bit, power-of-two head dims, Hopper or newer, long rows: TMA configs may be tried
    wide: bool  # fp32 / fp64: twice or four times the bytes per tile


_plans: Dict[tuple, _Plan] = {}
_launch_keys: Dict[tuple, int] = {}


def _plan(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len, rab,
          normalizer, position_bias=None, time_bias=None, time_bucket_scale=0.301) -> _Plan:
    interpreting = _interpreting()
    rab_layout = None if rab is None else (tuple(rab.shape), rab.stride(), rab.dtype)
    tables = tuple(None if t is None else (t.shape[0], t.dtype) for t in (position_bias, time_bias))
    # T (the total length) is left out: it changes every batch and the plan does not use it
    cache_key = (q.shape[1:], k.shape[1:], v.shape[1:], q.dtype, k.dtype, v.dtype, q.device, offsets.shape,
                 max_seq_len, alpha, causal, num_targets is None, contextual_len, max_attn_len, rab_layout,
                 normalizer, interpreting, tables, time_bucket_scale if time_bias is not None else None,
                 _position_strips, _strip_prefetch)
    plan = _plans.get(cache_key)
    if plan is not None:
        return plan
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
    rab_strides = (0, 0, 0)
    if rab is not None:
        # broadcast dimensions read with stride 0; the last dimension must be dense
        rab_strides = (0 if rab.shape[0] == 1 else rab.stride(0), 0 if rab.shape[1] == 1 else rab.stride(1),
                       rab.stride(2))
    for name, table in (("position_bias", position_bias), ("time_bias", time_bias)):
        if table is not None and (table.dim() != 1 or table.shape[0] < 1):
            raise ValueError(f"{name} must be a non-empty 1-D table, got shape {tuple(table.shape)}")
    if position_bias is not None and position_bias.shape[0] < 2 * max_seq_len - 1:
        raise ValueError(f"position_bias needs 2L - 1 >= {2 * max_seq_len - 1} entries (L >= max_seq_len), "
                         f"got {position_bias.shape[0]}")
    if time_bias is not None and not time_bucket_scale > 0:
        raise ValueError(f"time_bucket_scale must be positive, got {time_bucket_scale!r}")
    table_scalars = (0 if position_bias is None else (position_bias.shape[0] - 1) // 2,
                     1.0 if time_bias is None else 1.0 / float(time_bucket_scale),
                     0 if time_bias is None else time_bias.shape[0] - 1)
    import triton.language as tl

    wide = q.dtype in (torch.float32, torch.float64)
    # strips need ids = positions; max_seq_len rounded up to 16 keeps their rows aligned
    strip = position_bias is not None and num_targets is None and contextual_len == 0 and _position_strips
    strip_shift = -(-max_seq_len // 16) * 16 if strip else 0
    constexprs = dict(
        D_QK=d_qk, D_V=d_v, BLOCK_DQ=_pow2_at_least(d_qk), BLOCK_DV=_pow2_at_least(d_v),
        CAUSAL=bool(causal),
        HAS_TARGETS=num_targets is not None,
        HAS_CONTEXT=contextual_len > 0,
        HAS_WINDOW=max_attn_len > 0,
        HAS_RAB=rab is not None,
        HAS_POS=position_bias is not None,
        HAS_TIME=time_bias is not None,
        POS_STRIP=strip,
        # measured on the H200 (benchmarks/results/hstu_bias_breakdown_h200*.json): the prefetch
        # pays for fp32 tiles (ML-1M shape, fwd+bwd with the bias 1.41x -> 1.29x the unbiased
        # time) and costs for 16-bit ones (N=4096: 1.55x -> 1.64x, registers), so it is on for
        # fp32 / fp64 inputs only
        STRIP_PREFETCH=strip and _strip_prefetch and wide,
        SCALE_BY_SEQ_LEN=normalizer == "seq_len",
        # tanh.approx is PTX: not under the interpreter, and not precise enough for fp32
        FAST_SILU=not wide and not interpreting,
        PRECISION="ieee" if wide else "tf32",
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
    )
    block_d = max(constexprs["BLOCK_DQ"], constexprs["BLOCK_DV"])
    pure_causal = causal and num_targets is None and contextual_len == 0 and max_attn_len == 0
    # tuning key: configs are shared by calls that differ only in lengths and mask details
    key = (constexprs["BLOCK_DQ"], constexprs["BLOCK_DV"], q.dtype, _seq_bucket(max_seq_len), pure_causal,
           rab is not None, position_bias is not None, time_bias is not None, strip, constexprs["STRIP_PREFETCH"],
           q.device.index)
    # launch key: one small int per distinct set of constexprs (what a compiled kernel fixes)
    # (tensor dtypes too: they are part of a compiled kernel's signature)
    signature = tuple(sorted((name, str(value)) for name, value in constexprs.items())) + (
        str(q.dtype), None if rab is None else str(rab.dtype), *(None if t is None else str(t[1]) for t in tables))
    launch_key = _launch_keys.setdefault(signature, len(_launch_keys))
    # TMA descriptors are built per call and bypass the direct launch: worth it only where
    # the kernel, not the host, takes the time
    tma_ok = (not interpreting and not wide and d_qk == constexprs["BLOCK_DQ"] and d_v == constexprs["BLOCK_DV"]
              and max_seq_len >= 1024 and torch.cuda.get_device_capability(q.device)[0] >= 9)
    plan = _Plan(B, H, 0.5 * float(alpha), 1.0 / max_seq_len, int(contextual_len), int(max_attn_len), max_seq_len,
                 constexprs, block_d, rab_strides, table_scalars, strip_shift, key, launch_key, tma_ok, wide)
    _plans[cache_key] = plan
    return plan


def _build_position_strips(table: torch.Tensor, p: _Plan, count: int, like: torch.Tensor) -> torch.Tensor:
    """``[count, STRIP_ROWS, 2 * shift + STRIP_MARGIN]`` halves of the position table laid
    out so that a tile's bias is a plain 2-D load (see ``triton_kernels._strip_pointers``):
    ``strip[r, x] = table[c + x - shift - r] / 2`` (forward, dQ) or ``table[c + r - x + shift] /
    2`` (dK/dV, reverse), indices clamped to the table as the per-element gather clamps them
    (only masked pairs ever read a clamped entry). A few hundred KB at length 200, 2-4 MB at
    4096. One kernel launch builds the forward strip (count 1) or both (count 2): when each
    strip took three torch kernels (gather, halve, convert), the work outside the attention
    kernels added 0.06 ms to a 1.04 ms forward + backward at N=4096 on the H200 (2026-11-30)."""
    center, shift = p.table_scalars[0], p.strip_shift
    cols = 2 * shift + STRIP_MARGIN
    # 16-bit inputs: fp16 halves (2^-11 relative, finer than the bf16 / fp16 rounding of the
    # scores' inputs) halve the strip bytes a tile reads from L2, which bounded the forward at
    # N=4096 on the H200 with fp32 strips; fp32 / fp64 inputs get their own precision
    dtype = {torch.float64: torch.float64, torch.float32: torch.float32}.get(like.dtype, torch.float16)
    out = torch.empty((count, STRIP_ROWS, cols), dtype=dtype, device=table.device)
    block_r, block_x = (STRIP_ROWS, 64) if _interpreting() else (16, 256)  # few programs for the interpreter
    grid = (STRIP_ROWS // block_r, -(-cols // block_x), count)
    _kernel_module().hstu_position_strips_kernel[grid](table, out, center, shift, cols, ROWS=STRIP_ROWS,
                                                       BLOCK_R=block_r, BLOCK_X=block_x)
    return out


def _strip_args(tables: "_Tables", p: _Plan, like: torch.Tensor, reverse_too: bool = False) -> Tuple[tuple, int, int]:
    """(strips: forward and, with ``reverse_too``, reversed; row stride, shift) for a kernel
    launch; without strips, placeholders never read."""
    if not p.strip_shift:
        return (like, like), 0, 0
    strips = _build_position_strips(tables.position_bias, p, 2 if reverse_too else 1, like)
    return tuple(strips) + ((like,) if not reverse_too else ()), strips.stride(1), p.strip_shift


def _descriptor(x: torch.Tensor, rows: int):
    """Host TMA descriptor over [T, H * d] with [rows, d] blocks (d a power of two)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(x.view(x.shape[0], -1), [rows, x.shape[2]])


class _Tables(NamedTuple):
    """The relative-bias tables and the timestamps (each None when absent)."""

    position_bias: Optional[torch.Tensor] = None
    time_bias: Optional[torch.Tensor] = None
    timestamps: Optional[torch.Tensor] = None

    def pointers(self, like: torch.Tensor) -> tuple:
        # an absent tensor is passed as another (never read: its HAS_* constexpr is off)
        return tuple(like if t is None else t for t in self)


def _forward(q, k, v, offsets, num_targets, rab, p: _Plan, tables: _Tables = _Tables()) -> torch.Tensor:
    out = _new_output((q.shape[0], p.H, v.shape[2]), q)
    (strip, _), stride_ps, shift = _strip_args(tables, p, q)
    tensors = (q, k, v, q if rab is None else rab, *tables.pointers(q), strip, out, offsets,
               offsets if num_targets is None else num_targets)
    scalars = (*p.rab_strides, p.H, p.half_alpha, p.scale, p.contextual_len, p.max_attn_len, *p.table_scalars,
               stride_ps, shift)

    def launch(cfg: _Config) -> None:
        grid = (p.B * p.H, -(-p.max_seq_len // cfg.block_m))
        args = tensors
        if cfg.tma:
            args = (q, _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) + tensors[3:]
        _fwd_launcher(grid, args, scalars, dict(p.constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                                USE_TMA=cfg.tma, WARP_SPEC=cfg.ws), cfg, p.launch_key)

    if q.shape[0] == 0:
        return out
    _launch_tuned("fwd", ("fwd",) + p.key, p.block_d, launch, may_tune=True, allow_tma=p.tma_ok, wide=p.wide)
    return out


def _backward(grad_out, q, k, v, offsets, num_targets, rab, p: _Plan, compute_drab: bool,
              tables: _Tables = _Tables(), compute_dposition_bias: bool = False, compute_dtime_bias: bool = False):
    dq = _new_output(q.shape, q)
    dk = _new_output(k.shape, k)
    dv = _new_output(v.shape, v)
    rab_grad = compute_drab and rab is not None
    atomic = False
    drab_buf = q
    drab_strides = (0, 0, 0)
    if rab_grad:
        atomic = rab.shape[0] != p.B or rab.shape[1] != p.H
        # every (b, h, i, j) the kernel never visits (masked blocks, padding) must read 0;
        # a broadcast rab sums several programs' contributions with fp32 atomics
        drab_buf = torch.zeros(rab.shape, dtype=torch.float32 if atomic else rab.dtype, device=q.device)
        drab_strides = (0 if drab_buf.shape[0] == 1 else drab_buf.stride(0),
                        0 if drab_buf.shape[1] == 1 else drab_buf.stride(1), drab_buf.stride(2))
    rab_or_q = q if rab is None else rab
    targets = offsets if num_targets is None else num_targets
    common = (p.H, p.half_alpha, p.scale, p.contextual_len, p.max_attn_len, *p.table_scalars)
    # table gradients, fp32 (fp64 for fp64 inputs) rows that the dK/dV kernel adds dS into by
    # index, summed over the rows here: the position table gets one row per (sequence, head)
    # (its per-diagonal adds rarely collide), the small time table one per program (every
    # pair of a program adds to a few buckets: fewer programs contend for one address)
    pos_grad = compute_dposition_bias and tables.position_bias is not None
    time_grad = compute_dtime_bias and tables.time_bias is not None
    grad_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    buffers = {"pos": q, "time": q}
    if pos_grad:
        buffers["pos"] = torch.empty((p.B * p.H, tables.position_bias.shape[0]), dtype=grad_dtype, device=q.device)
    table_ptrs = tables.pointers(q)
    (strip, strip_rev), stride_ps, shift = _strip_args(tables, p, q, reverse_too=True)
    dq_tensors = (q, k, v, grad_out, rab_or_q, *table_ptrs, strip, dq, offsets, targets)
    dq_scalars = (*p.rab_strides, *common, stride_ps, shift)
    diagonal = 0
    if pos_grad and _diagonal_position_grads:
        if _diagonal_rotation not in _DIAGONAL_MODES:
            raise ValueError(f"GAUSS_HSTU_DIAGONAL_ROTATION must be one of {', '.join(_DIAGONAL_MODES)}, "
                             f"got {_diagonal_rotation!r}")
        diagonal = _DIAGONAL_MODES[_diagonal_rotation]
    dkdv_key = p.key + (rab_grad, atomic, pos_grad, time_grad, diagonal)

    def launch_dkdv(cfg: _Config) -> None:
        grid = (p.B * p.H, -(-p.max_seq_len // cfg.block_n))
        # the kernel adds into the table-gradient buffers: start them at zero on every
        # launch, so that autotuning (which runs candidates repeatedly) stays correct
        if pos_grad:
            buffers["pos"].zero_()
        if time_grad:
            buffers["time"] = torch.zeros((grid[0] * grid[1], tables.time_bias.shape[0]), dtype=grad_dtype,
                                          device=q.device)
        dpos_buf, dtb_buf = buffers["pos"], buffers["time"]
        args = (q, k, v, grad_out, rab_or_q, drab_buf, *table_ptrs, strip_rev, dpos_buf, dtb_buf, dk, dv, offsets,
                targets)
        scalars = (*p.rab_strides, *drab_strides, dpos_buf.shape[-1] if pos_grad else 0,
                   dtb_buf.shape[-1] if time_grad else 0, *common, stride_ps, shift)
        if cfg.tma:
            args = (_descriptor(q, cfg.block_m),) + args[1:3] + (_descriptor(grad_out, cfg.block_m),) + args[4:]
        _dkdv_launcher(grid, args, scalars,
                       dict(p.constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, RAB_GRAD=rab_grad,
                            RAB_GRAD_ATOMIC=atomic, POS_GRAD=pos_grad, TIME_GRAD=time_grad,
                            POS_GRAD_DIAGONAL=diagonal, USE_TMA=cfg.tma, NUM_WARPS=cfg.num_warps), cfg,
                       (p.launch_key, rab_grad, atomic, pos_grad, time_grad, diagonal))

    def launch_dq(cfg: _Config) -> None:
        grid = (p.B * p.H, -(-p.max_seq_len // cfg.block_m))
        args = dq_tensors
        if cfg.tma:
            args = (q, _descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) + args[3:]
        _dq_launcher(grid, args, dq_scalars,
                     dict(p.constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=cfg.tma), cfg, p.launch_key)

    def table_grads():
        grads = []
        for on, name, table in ((pos_grad, "pos", tables.position_bias), (time_grad, "time", tables.time_bias)):
            if not on:
                grads.append(None)
            elif q.shape[0] == 0:  # no kernel ran
                grads.append(torch.zeros_like(table))
            else:
                grads.append(buffers[name].sum(0).to(table.dtype))
        return tuple(grads)

    if q.shape[0] == 0:
        return (dq, dk, dv, (drab_buf.to(rab.dtype) if rab_grad else None)) + table_grads()
    # tuning reruns the kernel: fine for plain stores, not for atomically summed drab
    _launch_tuned("dkdv", ("dkdv",) + dkdv_key, p.block_d, launch_dkdv, may_tune=not atomic, allow_tma=p.tma_ok,
                  wide=p.wide)
    _launch_tuned("dq", ("dq",) + p.key, p.block_d, launch_dq, may_tune=True, allow_tma=p.tma_ok, wide=p.wide)
    drab = None
    if rab_grad:
        drab = drab_buf.to(rab.dtype) if atomic else drab_buf
    return (dq, dk, dv, drab) + table_grads()


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _targets(num_targets: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if num_targets is None or (num_targets.dtype == torch.int64 and num_targets.is_contiguous()):
        return num_targets
    return num_targets.to(torch.int64).contiguous()


def _rab(rab: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # the kernels read rows of rab with unit stride
    return rab if rab is None or rab.stride(-1) == 1 else rab.contiguous()


def _tables(position_bias, time_bias, timestamps) -> _Tables:
    if (time_bias is None) != (timestamps is None):
        raise ValueError("time_bias and timestamps go together: pass both (jagged [T] int64 timestamps) or neither")
    if timestamps is not None and (timestamps.dtype != torch.int64 or not timestamps.is_contiguous()):
        timestamps = timestamps.to(torch.int64).contiguous()
    return _Tables(None if position_bias is None else _contig(position_bias),
                   None if time_bias is None else _contig(time_bias), timestamps)


# ---------------------------------------------------------------- public API
class TritonAttentionBackend:
    """HSTU attention backend with fused Triton kernels (see the module docstring).

    ``forward`` and ``backward`` take the arguments of
    :func:`gauss_plugins.hstu.attention.hstu_attention_reference` (``backward`` also
    ``grad_out`` first and ``compute_drab``) and return ``out`` and ``(dq, dk, dv, drab)``.
    """

    def forward(self, q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
                rab: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                time_bias: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                time_bucket_scale: float = 0.301, normalizer: str = "max_seq_len") -> torch.Tensor:
        q, k, v = _contig(q), _contig(k), _contig(v)
        num_targets, rab = _targets(num_targets), _rab(rab)
        tables = _tables(position_bias, time_bias, timestamps)
        p = _plan(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len, rab,
                  normalizer, tables.position_bias, tables.time_bias, time_bucket_scale)
        return _forward(q, k, v, offsets, num_targets, rab, p, tables)

    def backward(self, grad_out, q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                 num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
                 rab: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                 time_bias: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                 time_bucket_scale: float = 0.301, normalizer: str = "max_seq_len",
                 compute_drab: bool = True, compute_dposition_bias: bool = True, compute_dtime_bias: bool = True):
        q, k, v, grad_out = _contig(q), _contig(k), _contig(v), _contig(grad_out)
        if tuple(grad_out.shape) != (q.shape[0], q.shape[1], v.shape[2]):
            raise ValueError(f"grad_out must have shape {(q.shape[0], q.shape[1], v.shape[2])}, "
                             f"got {tuple(grad_out.shape)}")
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        num_targets, rab = _targets(num_targets), _rab(rab)
        tables = _tables(position_bias, time_bias, timestamps)
        p = _plan(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len, rab,
                  normalizer, tables.position_bias, tables.time_bias, time_bucket_scale)
        return _backward(grad_out, q, k, v, offsets, num_targets, rab, p, compute_drab, tables,
                         compute_dposition_bias, compute_dtime_bias)


_backend = TritonAttentionBackend()


def hstu_attention_triton() -> TritonAttentionBackend:
    """Factory of the ``triton`` attention backend (the object is stateless; one is shared)."""
    return _backend


class _FusedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rab, position_bias, time_bias, offsets, num_targets, timestamps, options):
        num_targets, rab_c = _targets(num_targets), _rab(rab)
        tables = _tables(position_bias, time_bias, timestamps)
        p = _plan(q, k, v, offsets, options["max_seq_len"], options["alpha"], options["causal"], num_targets,
                  options["contextual_len"], options["max_attn_len"], rab_c, options["normalizer"],
                  tables.position_bias, tables.time_bias, options["time_bucket_scale"])
        ctx.save_for_backward(q, k, v, rab_c, offsets, num_targets, *tables)
        ctx.plan = p
        return _forward(q, k, v, offsets, num_targets, rab_c, p, tables)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rab, offsets, num_targets, position_bias, time_bias, timestamps = ctx.saved_tensors
        grad_out = _contig(grad_out).to(q.dtype)
        compute_drab = rab is not None and ctx.needs_input_grad[3]
        dq, dk, dv, drab, dpos, dtime = _backward(
            grad_out, q, k, v, offsets, num_targets, rab, ctx.plan, compute_drab,
            _Tables(position_bias, time_bias, timestamps), ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        return dq, dk, dv, drab, dpos, dtime, None, None, None, None


def hstu_attention_fused(q, k, v, offsets, *, max_seq_len: int, alpha: float, causal: bool = True,
                         num_targets: Optional[torch.Tensor] = None, contextual_len: int = 0,
                         max_attn_len: int = 0, rab: Optional[torch.Tensor] = None,
                         position_bias: Optional[torch.Tensor] = None, time_bias: Optional[torch.Tensor] = None,
                         timestamps: Optional[torch.Tensor] = None, time_bucket_scale: float = 0.301,
                         normalizer: str = "max_seq_len") -> torch.Tensor:
    """Differentiable HSTU attention on the fused kernels, without the custom op around it
    (no input validation beyond layouts: offsets, num_targets and timestamps are trusted)."""
    q, k, v = _contig(q), _contig(k), _contig(v)
    options = dict(max_seq_len=max_seq_len, alpha=alpha, causal=causal, contextual_len=contextual_len,
                   max_attn_len=max_attn_len, normalizer=normalizer, time_bucket_scale=time_bucket_scale)
    return _FusedFunction.apply(q, k, v, rab, position_bias, time_bias, offsets, num_targets, timestamps, options)
