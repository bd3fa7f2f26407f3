"""The ``cuda`` HSTU attention backend (CUDA C++ kernels, sm_90) vs the reference.

On CPU: which calls the kernels take and why not (``unsupported_reason``), that every other
call runs on the triton backend with its reason logged once, and the registration. On an
sm_90 GPU (``gpu`` tests): fresh random jagged inputs every run (the seed is printed on
failure), every kernel output starts as NaN, and the output and every gradient (dq, dk, dv,
the position table's) are compared with the fp32 reference: bf16/fp16 relative error
<= 4e-3 at N in {200, 1024, 2048, 4096}, every supported mask, both head dims. The input
helpers are the triton tests' own (imported from that module, not copied).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import random

import pytest
import torch

from gauss_kernels.hstu import cuda_attention as ca
from gauss_plugins.hstu.attention import (
    AttentionBackend,
    hstu_attention_reference,
    hstu_attention_reference_backward,
)

ON_GPU = torch.cuda.is_available()
ON_SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
gpu = pytest.mark.gpu
needs_sm90 = pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 (Hopper) CUDA device")


def _triton_test_module():
    """The triton backend's test module, for its input helpers (_jagged, _bias_tables,
    _rel). Loaded under its own name; its fixtures apply to its own tests only."""
    pytest.importorskip("triton")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_hstu_triton.py")
    spec = importlib.util.spec_from_file_location("_gauss_test_hstu_triton_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helpers():
    return _triton_test_module()


@pytest.fixture
def rng():
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every tensor the CUDA kernels write starts as NaN: an element no CTA wrote fails."""

    def nan_output(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(ca, "_new_output", nan_output)


# ---------------------------------------------------------------- CPU: what runs where, and why
def _qkv(dtype=torch.bfloat16, d=64, d_v=None, device="cpu"):
    q = torch.zeros(6, 2, d, dtype=dtype, device=device)
    v = torch.zeros(6, 2, d_v or d, dtype=dtype, device=device)
    return q, q.clone(), v


UNSUPPORTED = {
    "fp32": (dict(dtype=torch.float32), {}, "dtype torch.float32"),
    "fp64": (dict(dtype=torch.float64), {}, "dtype torch.float64"),
    "head dim 32": (dict(d=32), {}, "head dims d_qk=32"),
    "head dim 256": (dict(d=256), {}, "head dims d_qk=256"),
    "d_qk != d_v": (dict(d=64, d_v=128), {}, "d_v=128"),
    "bidirectional": ({}, dict(causal=False), "bidirectional"),
    "contextual": ({}, dict(contextual_len=2), "contextual prefix"),
    "window": ({}, dict(max_attn_len=3), "attention window"),
    "rab": ({}, dict(rab=torch.zeros(1, 1, 6, 6)), "dense relative attention bias"),
    "time bias": ({}, dict(time_bias=torch.zeros(9)), "time-bias table"),
    "integer position table": ({}, dict(position_bias=torch.zeros(11, dtype=torch.int64)), "position_bias table"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_calls_say_why(name):
    tensors, options, reason = UNSUPPORTED[name]
    got = ca.CudaAttentionBackend.unsupported_reason(*_qkv(**tensors), check_device=False, **options)
    assert got is not None and reason in got, got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_supported_options(dtype, d):
    q, k, v = _qkv(dtype=dtype, d=d)
    for options in ({}, dict(num_targets=torch.tensor([1])), dict(position_bias=torch.zeros(11)),
                    dict(normalizer="seq_len", position_bias=torch.zeros(11, dtype=torch.bfloat16))):
        assert ca.CudaAttentionBackend.unsupported_reason(q, k, v, check_device=False, **options) is None
    if not ON_GPU:
        assert "tensors on cpu" in ca.CudaAttentionBackend.unsupported_reason(q, k, v)


class _RecordingBackend:
    """Stands in for the triton backend: records what the fallback hands over."""

    def __init__(self):
        self.calls = []

    def forward(self, q, k, v, offsets, **options):
        self.calls.append(("forward", q, options))
        return torch.ones(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)

    def backward(self, grad_out, q, k, v, offsets, **options):
        self.calls.append(("backward", q, options))
        return (torch.ones_like(q),) * 3 + (None, None, None)


def test_fallback_runs_on_triton_and_logs_each_reason_once(monkeypatch, caplog):
    recorder = _RecordingBackend()
    monkeypatch.setattr(ca, "_triton", lambda: recorder)
    monkeypatch.setattr(ca, "_logged_reasons", set())
    backend = ca.hstu_attention_cuda()
    assert isinstance(backend, AttentionBackend)
    q, k, v = _qkv(dtype=torch.float32)
    offsets = torch.tensor([0, 6])
    opts = dict(max_seq_len=6, alpha=0.5, num_targets=torch.tensor([2]))
    with caplog.at_level(logging.WARNING, logger=ca.__name__):
        out = backend.forward(q, k, v, offsets, **opts)
        backend.forward(q, k, v, offsets, **opts)
        grads = backend.backward(torch.zeros_like(v), q, k, v, offsets, compute_drab=False, **opts)
        backend.forward(*_qkv(), offsets, causal=False, max_seq_len=6, alpha=0.5)  # bf16: another reason
    assert torch.equal(out, torch.ones_like(out)) and torch.equal(grads[0], torch.ones_like(q))
    assert [c[0] for c in recorder.calls] == ["forward", "forward", "backward", "forward"]
    first = recorder.calls[0][2]
    assert first["alpha"] == 0.5 and first["num_targets"] is opts["num_targets"] and first["causal"] is True
    assert recorder.calls[2][2]["compute_drab"] is False and recorder.calls[2][2]["compute_dposition_bias"] is True
    messages = [r.getMessage() for r in caplog.records if r.name == ca.__name__]
    assert len(messages) == 2, messages  # fp32 once for three calls, then the bidirectional call
    assert "dtype torch.float32" in messages[0] and "triton" in messages[0]
    assert "bidirectional" in messages[1]


def test_registered_below_triton_and_available_only_with_cuda(fresh_registry):
    from gauss_plugins.plugins import get_registry

    registry = get_registry()
    cuda = registry.get("attention_backend", "cuda")
    triton = registry.get("attention_backend", "triton")
    assert cuda.priority < triton.priority
    available = registry.availability("attention_backend", "cuda")
    if not ON_GPU:
        assert not available and "CUDA" in available.reason


def test_kernel_sources_build_without_torch_and_ship():
    """The .cu files include no torch header (CI compiles them with nvcc alone; see
    test_cuda_compile.py), and pyproject ships every source kind of the folder."""
    names = sorted(os.listdir(ca.SOURCE_DIR))
    for name in ca.KERNEL_SOURCES + ("hstu_api.h", "hstu_common.cuh", "hstu_binding.cpp"):
        assert name in names
    for name in names:
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(ca.SOURCE_DIR, name)) as f:
                assert "torch" not in "".join(line for line in f if line.startswith("#include")), name
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml")) as f:
        pyproject = f.read()
    for pattern in ('"**/*.cu"', '"**/*.cuh"', '"**/*.h"', '"**/*.cpp"'):
        assert pattern in pyproject


# ---------------------------------------------------------------- GPU: against the fp32 reference
def _check(helpers, rng, lengths, *, H=2, d=128, dtype=torch.bfloat16, tol=4e-3, max_seq_len=None,
           num_targets=None, position=None, table_grads=True, **options):
    """Forward and every gradient of the cuda backend vs the fp32 reference, on inputs that
    the kernels take (no fallback: asserted)."""
    q, k, v, offsets = helpers._jagged(rng, lengths, H, d, d, dtype)
    n = max_seq_len or max(max(lengths), 1)
    nt = None
    if num_targets is not None:
        nt = torch.tensor([min(t, length) for t, length in zip(num_targets, lengths)], device="cuda")
    tables = helpers._bias_tables(rng, lengths, n, position, None)
    opts = dict(max_seq_len=n, alpha=options.pop("alpha", 1.0 / math.sqrt(d)), num_targets=nt, **tables, **options)
    backend = ca.hstu_attention_cuda()
    assert backend.unsupported_reason(q, k, v, **opts) is None
    out = backend.forward(q, k, v, offsets, **opts)
    grad_out = torch.randn(out.shape, generator=rng).to("cuda", dtype)
    flags = dict(compute_drab=False, compute_dposition_bias=table_grads, compute_dtime_bias=False)
    dq, dk, dv, drab, dpos, dtime = backend.backward(grad_out, q, k, v, offsets, **flags, **opts)
    f = (q.float(), k.float(), v.float())
    ref = hstu_attention_reference(*f, offsets, **opts)
    rdq, rdk, rdv, _, rdpos, _ = hstu_attention_reference_backward(grad_out.float(), *f, offsets, **flags, **opts)
    got = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    want = {"out": ref, "dq": rdq, "dk": rdk, "dv": rdv}
    assert drab is None and dtime is None
    if "position_bias" in tables and table_grads:
        assert dpos.shape == tables["position_bias"].shape and dpos.dtype == tables["position_bias"].dtype
        got["dposition_bias"], want["dposition_bias"] = dpos, rdpos
    else:
        assert dpos is None
    errors = {}
    for name in got:
        assert got[name].dtype == want[name].dtype or name != "dposition_bias"
        assert torch.isfinite(got[name]).all(), f"{name} has NaN/inf (unwritten or overflowed elements)"
        errors[name] = helpers._rel(got[name], want[name])
    assert max(errors.values()) <= tol, f"relative errors {errors} above {tol} ({lengths=}, {options=})"
    return errors


def _lengths(rng, B, N):
    """B lengths in [N/2, N], one of them exactly N, one short and unaligned."""
    lengths = [int(x) for x in torch.randint(max(1, N // 2), N + 1, (B,), generator=rng)]
    lengths[0] = N
    if B > 2:
        lengths[-1] = max(1, N // 3 + 5)
    return lengths


@gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N", [200, 1024, 2048, 4096])
@pytest.mark.parametrize("position", [False, True], ids=["no-bias", "position-bias"])
def test_gpu_precision_by_length(helpers, rng, dtype, N, position):
    B = max(2, min(6, 8192 // N))
    _check(helpers, rng, _lengths(rng, B, N), H=2, d=128, dtype=dtype, position=0 if position else None)


MASK_MODES = {
    "causal": dict(),
    "targets": dict(num_targets=[3, 70, 0, 129]),
    "normalizer=seq_len": dict(normalizer="seq_len", num_targets=[2, 2, 2, 2]),
    "position": dict(position=0),
    "position + targets": dict(position=0, num_targets=[5, 64, 1, 200]),
    "position, L > max_seq_len, max_seq_len > lengths": dict(position=37, max_seq_len=333, num_targets=[4, 0, 9, 1]),
    "position without its gradient": dict(position=0, table_grads=False),
}


@gpu
@needs_sm90
@pytest.mark.parametrize("mode", list(MASK_MODES))
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_mask_modes(helpers, rng, mode, d):
    _check(helpers, rng, [300, 129, 77, 256], H=3, d=d, **dict(MASK_MODES[mode]))


@gpu
@needs_sm90
def test_gpu_tiny_and_empty_sequences(helpers, rng):
    _check(helpers, rng, [1, 0, 17, 64, 65, 2], H=1, d=64, num_targets=[1, 0, 3, 64, 2, 2], position=0)


@gpu
@needs_sm90
def test_gpu_backward_is_deterministic(helpers, rng):
    q, k, v, offsets = helpers._jagged(rng, [700, 513], 2, 128, 128, torch.bfloat16)
    backend = ca.hstu_attention_cuda()
    opts = dict(max_seq_len=700, alpha=0.1)
    go = torch.randn(v.shape, generator=rng).to("cuda", v.dtype)
    first = backend.backward(go, q, k, v, offsets, **opts)[:3]
    second = backend.backward(go, q, k, v, offsets, **opts)[:3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@gpu
@needs_sm90
def test_gpu_unsupported_call_matches_triton(helpers, rng, caplog):
    """A call the kernels do not take (a contextual prefix) gives the triton backend's result."""
    from gauss_kernels.hstu.triton_attention import hstu_attention_triton

    q, k, v, offsets = helpers._jagged(rng, [90, 40], 2, 64, 64, torch.bfloat16)
    opts = dict(max_seq_len=90, alpha=0.125, contextual_len=3)
    with caplog.at_level(logging.WARNING, logger=ca.__name__):
        out = ca.hstu_attention_cuda().forward(q, k, v, offsets, **opts)
    assert torch.equal(out, hstu_attention_triton().forward(q, k, v, offsets, **opts))


@gpu
@needs_sm90
def test_gpu_public_op_with_backend_cuda(helpers, rng, fresh_registry):
    from gauss_plugins.hstu import hstu_attention

    q, k, v, offsets = helpers._jagged(rng, [300, 129, 77], 2, 64, 64, torch.bfloat16)
    nt = torch.tensor([5, 3, 0], device="cuda")
    table = torch.randn(2 * 300 - 1, generator=rng).to("cuda").requires_grad_(True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    opts = dict(max_seq_len=300, alpha=0.125, num_targets=nt)
    out = hstu_attention(*leaves, offsets, position_bias=table, backend="cuda", **opts)
    go = torch.randn_like(out)
    out.backward(go)
    f = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    table_ref = table.detach().clone().requires_grad_(True)
    ref = hstu_attention_reference(*f, offsets, position_bias=table_ref, **opts)
    ref.backward(go.float())
    assert helpers._rel(out, ref) <= 4e-3
    for got, want in zip(leaves + [table], f + [table_ref]):
        assert helpers._rel(got.grad, want.grad) <= 4e-3
