"""The HSTU Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter (what the CPU tests run) executes the kernels as Python: it does not check
what only the compiler checks, e.g. a ``@triton.jit`` helper returning a tensor on one
constexpr branch and a pointer on the other, which compiles under the interpreter and fails
at the first launch on a GPU. Here every kernel goes through triton's own front end, its
optimisation passes and ``ptxas`` for ``GPUTarget("cuda", 90, 32)``, for the constexpr
combinations the wrapper can pick (bias read from strips, with and without prefetch, or
gathered; time bias; dense rab; targets; each way of reducing the position gradient, the
carried diagonal sums for each number of wraps).
"""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.slow  # ~1 minute of compiling on the 2-core CI machine
if os.environ.get("TRITON_INTERPRET") == "1":
    # triton decorated its own standard library for the interpreter when it was imported
    pytest.skip("TRITON_INTERPRET=1 for the whole process: the compiler cannot run in it", allow_module_level=True)

_KERNELS = "gauss_kernels.hstu.triton_kernels"


@pytest.fixture(scope="module")
def kernels(triton_modules):
    """The kernel module decorated for compiling (not for the interpreter), dropped after."""
    from gauss_kernels.hstu import triton_attention

    with triton_modules((_KERNELS,), interpret=False) as modules:
        yield modules[0]
    triton_attention._kernels = None  # the launcher's cached module: re-imported on next use


def _compile(fn, dtype: str, constexprs: dict, strip_dtype: str = "fp16"):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    io = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "RAB"}
    fp32 = {"POS", "TB", "DRAB", "DPOS", "DTB"}
    i64 = {"TS", "seq_offsets", "num_targets"}
    floats = {"half_alpha", "scale", "inv_scale"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in io:
            signature[name] = "*" + dtype
        elif name in fp32:
            signature[name] = "*fp32"
        elif name in i64:
            signature[name] = "*i64"
        elif name == "PS":
            signature[name] = "*" + strip_dtype
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    missing = [n for n in fn.arg_names if n not in signature]
    assert not missing, missing
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    assert compiled.asm.get("cubin"), "no cubin produced"
    return compiled


_BASE = dict(D_QK=64, D_V=64, BLOCK_DQ=64, BLOCK_DV=64, CAUSAL=True, HAS_TARGETS=False, HAS_CONTEXT=False,
             HAS_WINDOW=False, HAS_RAB=False, HAS_POS=True, HAS_TIME=False, POS_STRIP=True, STRIP_PREFETCH=False,
             SCALE_BY_SEQ_LEN=False, FAST_SILU=True, PRECISION="tf32", ACC=tl.float32, USE_TMA=False)
# (label, input dtype, strip dtype, changes to _BASE, position-gradient reduction of dK/dV)
_CASES = [
    ("bf16 strips", "bf16", "fp16", {}, 1),
    ("fp32 strips prefetched", "fp32", "fp32", dict(STRIP_PREFETCH=True, FAST_SILU=False, PRECISION="ieee"), 1),
    ("bf16 strips, rows rotation", "bf16", "fp16", {}, 2),
    ("bf16 strips, carried wraps", "bf16", "fp16", {}, 3),
    ("fp32 strips prefetched, carried wraps", "fp32", "fp32", dict(STRIP_PREFETCH=True, FAST_SILU=False,
                                                                   PRECISION="ieee"), 3),
    ("bf16 gathers, pairs", "bf16", "fp16", dict(POS_STRIP=False), 0),
    ("bf16 targets + time + rab + window", "bf16", "fp16",
     dict(POS_STRIP=False, HAS_TARGETS=True, HAS_TIME=True, HAS_RAB=True, HAS_WINDOW=True), 1),
]


@pytest.mark.parametrize("label,dtype,strip_dtype,changes,diagonal", _CASES, ids=[c[0] for c in _CASES])
def test_kernels_compile_for_hopper(kernels, label, dtype, strip_dtype, changes, diagonal):
    c = dict(_BASE, **changes)
    _compile(kernels.hstu_fwd_kernel, dtype, dict(c, BLOCK_M=64, BLOCK_N=64, WARP_SPEC=False), strip_dtype)
    _compile(kernels.hstu_bwd_dq_kernel, dtype, dict(c, BLOCK_M=64, BLOCK_N=64), strip_dtype)
    _compile(kernels.hstu_bwd_dkdv_kernel, dtype,
             dict(c, BLOCK_M=32, BLOCK_N=64, RAB_GRAD=c["HAS_RAB"], RAB_GRAD_ATOMIC=False, POS_GRAD=True,
                  TIME_GRAD=c["HAS_TIME"], POS_GRAD_DIAGONAL=diagonal, NUM_WARPS=4), strip_dtype)


@pytest.mark.parametrize("block_m,block_n", [(64, 64), (32, 128), (16, 16)], ids=["one-carry", "no-carry", "small"])
def test_carried_position_gradients_compile_for_each_wrap_count(kernels, block_m, block_n):
    """The carried diagonal sums take a different branch for one, two or more than two wraps
    (tiles as wide, twice or four times as wide in keys as in queries); the two-wrap branch
    is compiled above."""
    _compile(kernels.hstu_bwd_dkdv_kernel, "bf16",
             dict(_BASE, BLOCK_M=block_m, BLOCK_N=block_n, RAB_GRAD=False, RAB_GRAD_ATOMIC=False, POS_GRAD=True,
                  TIME_GRAD=False, POS_GRAD_DIAGONAL=3, NUM_WARPS=4))


@pytest.mark.parametrize("table,strip", [("fp32", "fp16"), ("bf16", "fp16"), ("fp64", "fp64")])
def test_position_strips_kernel_compiles(kernels, table, strip):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernels.hstu_position_strips_kernel
    signature = {"POS": "*" + table, "OUT": "*" + strip, "pos_center": "i32", "shift": "i32", "cols": "i32",
                 "ROWS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_X": "constexpr"}
    constexprs = {(fn.arg_names.index(k),): v for k, v in dict(ROWS=128, BLOCK_R=16, BLOCK_X=256).items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm.get("cubin"), "no cubin produced"


def test_a_front_end_error_fails_here(kernels):
    """The check above can fail: a helper with mismatched branch return types (the bug the
    interpreter let through on 2026-11-29) does not compile."""

    @triton.jit
    def bad_helper(P, ON: tl.constexpr):
        if ON:
            return P + tl.arange(0, 16)
        return P

    @triton.jit
    def kernel(P, ON: tl.constexpr):
        ptrs = bad_helper(P, ON)
        tl.store(ptrs, 1.0)

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    assert isinstance(kernel, JITFunction), type(kernel)
    src = ASTSource(fn=kernel, signature={"P": "*fp32", "ON": "constexpr"}, constexprs={(1,): True})
    with pytest.raises(Exception) as info:
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
    assert "return types" in repr(info.value.__cause__), repr(info.value)
