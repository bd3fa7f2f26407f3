"""Fused Triton HSTU attention vs the reference (:mod:`gauss_plugins.hstu.attention`).

Without CUDA the kernels run under the Triton interpreter: a module-scoped fixture sets
``TRITON_INTERPRET=1`` and (re)imports the kernel module, which ``triton.jit`` decorates
according to that variable, then restores both afterwards, so other test modules are not
affected. Shapes are tiny and fp32 there. With CUDA the same checks run compiled, and the
``gpu`` tests add bf16/fp16/fp32 up to N=4096, head dims 32-256, every mask mode and every
tuning candidate against an fp32 reference. Inputs are fresh random jagged batches every
run (the seed is printed on failure); every tensor the kernels write starts as NaN, so
unwritten elements fail.
"""
from __future__ import annotations

import math
import os
import random
import sys

import pytest
import torch

pytest.importorskip("triton")

from gauss_kernels.hstu import triton_attention as ta  # noqa: E402  (imports no kernels yet)
from gauss_plugins.hstu.attention import (  # noqa: E402
    AttentionBackend,
    hstu_attention_reference,
    hstu_attention_reference_backward,
)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


_KERNELS = "gauss_kernels.hstu.triton_kernels"


@pytest.fixture(scope="module", autouse=True)
def _interpreter_without_cuda():
    """Without CUDA: kernels decorated (imported) with TRITON_INTERPRET=1 for this module."""
    if ON_GPU:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop(_KERNELS, None)
    ta._kernels = None
    try:
        yield
    finally:
        sys.modules.pop(_KERNELS, None)
        ta._kernels = None
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output starts as NaN."""

    def nan_output(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(ta, "_new_output", nan_output)


@pytest.fixture
def rng():
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _jagged(rng, lengths, H, d_qk, d_v, dtype, scale=1.0):
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths_t, 0)
    T = int(offsets[-1])
    q = torch.randn(T, H, d_qk, generator=rng) * scale
    k = torch.randn(T, H, d_qk, generator=rng) * scale
    v = torch.randn(T, H, d_v, generator=rng)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [offsets.to(DEVICE)]


def _rel(x, ref):
    ref = ref.double()
    denom = ref.norm()
    err = (x.double() - ref).norm()
    return float(err / denom) if denom > 0 else float(err)


def _bias_tables(rng, lengths, n, position, time_buckets, table_dtype=torch.float32):
    """Random tables (position: L - max_seq_len extra, or None; time: num_buckets or None)
    and jagged increasing timestamps with gaps from 0 to ~1e4 (many buckets, ties too)."""
    tables = {}
    if position is not None:
        size = 2 * (n + position) - 1
        tables["position_bias"] = torch.randn(size, generator=rng).to(DEVICE, table_dtype)
    if time_buckets is not None:
        tables["time_bias"] = torch.randn(time_buckets + 1, generator=rng).to(DEVICE, table_dtype)
        gaps = (torch.rand(sum(lengths), generator=rng) ** 4 * 1e4).to(torch.int64)
        times = torch.cat([torch.cumsum(g, 0) + 1_700_000_000 for g in torch.split(gaps, list(lengths))])
        tables["timestamps"] = times.to(DEVICE)
    return tables


def _check(rng, lengths, *, H=1, d_qk=16, d_v=16, dtype=torch.float32, tol=1e-5, max_seq_len=None,
           num_targets=None, rab=None, rab_grad=True, position=None, time_buckets=None, table_grads=True,
           **options):
    """Forward and every gradient of the backend vs the fp32 reference on the same values.
    ``position`` / ``time_buckets``: relative-bias tables (see _bias_tables)."""
    q, k, v, offsets = _jagged(rng, lengths, H, d_qk, d_v, dtype)
    n = max_seq_len or max(max(lengths), 1)
    nt = None
    if num_targets is not None:
        nt = torch.tensor([min(t, length) for t, length in zip(num_targets, lengths)], device=DEVICE)
    rab_t = None
    if rab is not None:
        rab_t = torch.randn(rab[0], rab[1], n, n, generator=rng).to(DEVICE)
    tables = _bias_tables(rng, lengths, n, position, time_buckets)
    opts = dict(max_seq_len=n, alpha=options.pop("alpha", 1.0 / math.sqrt(d_qk)), num_targets=nt,
                rab=rab_t, **tables, **options)
    backend = ta.hstu_attention_triton()
    out = backend.forward(q, k, v, offsets, **opts)
    grad_out = torch.randn(out.shape, generator=rng).to(DEVICE, dtype)
    compute_drab = rab_t is not None and rab_grad
    flags = dict(compute_drab=compute_drab, compute_dposition_bias=table_grads, compute_dtime_bias=table_grads)
    dq, dk, dv, drab, dpos, dtime = backend.backward(grad_out, q, k, v, offsets, **flags, **opts)

    f = (q.float(), k.float(), v.float())
    ref = hstu_attention_reference(*f, offsets, **opts)
    rdq, rdk, rdv, rdrab, rdpos, rdtime = hstu_attention_reference_backward(grad_out.float(), *f, offsets,
                                                                            **flags, **opts)
    got = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    want = {"out": ref, "dq": rdq, "dk": rdk, "dv": rdv}
    if compute_drab:
        assert drab.shape == rab_t.shape and drab.dtype == rab_t.dtype
        got["drab"], want["drab"] = drab, rdrab
    else:
        assert drab is None
    for name, grad, ref_grad in (("position_bias", dpos, rdpos), ("time_bias", dtime, rdtime)):
        if name in tables and table_grads:
            assert grad.shape == tables[name].shape and grad.dtype == tables[name].dtype
            got["d" + name], want["d" + name] = grad, ref_grad
        else:
            assert grad is None
    errors = {}
    for name in got:
        assert got[name].shape == want[name].shape, name
        assert torch.isfinite(got[name]).all(), f"{name} has NaN/inf (unwritten or overflowed elements)"
        errors[name] = _rel(got[name], want[name])
    assert max(errors.values()) <= tol, f"relative errors {errors} above {tol} ({lengths=}, {options=})"
    return errors


# ---------------------------------------------------------------- every mask mode (CPU: interpreter)
MASK_MODES = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "targets": dict(num_targets=[3, 5, 0]),
    "contextual": dict(contextual_len=3),
    "window": dict(max_attn_len=5),
    "targets+contextual+window": dict(num_targets=[4, 2, 1], contextual_len=4, max_attn_len=6),
    "bidirectional+targets+contextual+window": dict(causal=False, num_targets=[4, 2, 1], contextual_len=2,
                                                    max_attn_len=7),
    "normalizer=seq_len": dict(normalizer="seq_len", num_targets=[2, 2, 2]),
}


@pytest.mark.parametrize("mode", list(MASK_MODES))
def test_mask_modes_match_reference(rng, mode):
    lengths = [int(x) for x in torch.randint(1, 40, (3,), generator=rng)]
    _check(rng, lengths, **MASK_MODES[mode])


@pytest.mark.parametrize("rab", [(3, 2), (1, 2), (3, 1)], ids=["per-sequence", "broadcast-batch", "broadcast-heads"])
def test_relative_bias_and_its_gradient(rng, rab):
    lengths = [int(x) for x in torch.randint(1, 30, (3,), generator=rng)]
    # max_seq_len above every length: rab is padded, its unused rows/columns get zero grad
    _check(rng, lengths, H=2, rab=rab, max_seq_len=max(lengths) + 3, num_targets=[2, 1, 3])


TABLE_MODES = {
    "position": dict(position=0),
    "position, L > max_seq_len": dict(position=5, num_targets=[2, 0, 3]),
    "time": dict(time_buckets=40),
    "position+time, targets": dict(position=2, time_buckets=12, num_targets=[3, 1, 4]),
    "position+time, contextual+window": dict(position=0, time_buckets=30, contextual_len=3, max_attn_len=6),
    "position+time, everything, bidirectional": dict(position=1, time_buckets=30, causal=False,
                                                     num_targets=[4, 2, 1], contextual_len=2, max_attn_len=7),
    "position+time + rab, seq_len normaliser": dict(position=0, time_buckets=20, rab=(1, 2),
                                                    normalizer="seq_len", num_targets=[2, 2, 2]),
}


@pytest.mark.parametrize("mode", list(TABLE_MODES))
def test_relative_bias_tables_and_their_gradients(rng, mode):
    """Bias from the tables built per tile, table gradients reduced in the dK/dV kernel."""
    lengths = [int(x) for x in torch.randint(1, 36, (3,), generator=rng)]
    _check(rng, lengths, H=2, **TABLE_MODES[mode])


def test_relative_bias_tables_without_gradients(rng):
    _check(rng, [21, 6], H=2, position=0, time_buckets=16, table_grads=False, num_targets=[3, 1])


def test_relative_bias_tables_with_unequal_tiles(rng, monkeypatch):
    if ON_GPU:
        pytest.skip("tile override applies to the interpreter")
    monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "fwd", ta._Config(32, 16, 1, 1))
    monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "dq", ta._Config(32, 16, 1, 1))
    monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "dkdv", ta._Config(16, 32, 1, 1))
    _check(rng, [45, 20], position=3, time_buckets=25, num_targets=[5, 2], contextual_len=2)
    _check(rng, [45, 20], position=0)  # pure causal: the unmasked interior blocks
    monkeypatch.setattr(ta, "_diagonal_position_grads", False)  # per-pair atomics on the same case
    _check(rng, [45, 20], position=0, max_attn_len=9)


@pytest.mark.parametrize("strips,prefetch", [(True, True), (True, False), (False, False)],
                         ids=["strips-prefetched", "strips", "gathers"])
def test_position_bias_from_strips_or_gathers(rng, monkeypatch, strips, prefetch):
    """Every way the kernels read the position bias when ids are positions (unit-stride
    strips, each block's tile loaded one block ahead or in place; per-element gathers from
    the table) matches the reference, including rows and columns past a sequence's end and
    a window, with unequal tiles."""
    monkeypatch.setattr(ta, "_position_strips", strips)
    monkeypatch.setattr(ta, "_strip_prefetch", prefetch)
    if not ON_GPU:
        monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "fwd", ta._Config(32, 16, 1, 1))
        monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "dkdv", ta._Config(16, 32, 1, 1))
    _check(rng, [37, 20, 1], H=2, position=0)
    _check(rng, [37, 20], position=0, max_attn_len=7, normalizer="seq_len")


@pytest.mark.parametrize("table_dtype,like_dtype,strip_dtype",
                         [(torch.float32, torch.bfloat16, torch.float16), (torch.bfloat16, torch.float16, torch.float16),
                          (torch.float32, torch.float32, torch.float32), (torch.float64, torch.float64, torch.float64)])
def test_position_strips_kernel_matches_their_definition(rng, table_dtype, like_dtype, strip_dtype):
    """The strips kernel writes, for every row and column, half the clamped table entry the
    kernels expect: forward ``table[c + x - shift - r]``, reversed ``table[c + r - x + shift]``."""
    n = 37
    q, k, v, offsets = _jagged(rng, [n, 5], 1, 16, 16, like_dtype)
    table = torch.randn(2 * n - 1, generator=rng).to(DEVICE, table_dtype)
    p = ta._plan(q, k, v, offsets, n, 0.25, True, None, 0, 0, None, "max_seq_len", position_bias=table)
    assert p.strip_shift > 0
    center, shift = n - 1, p.strip_shift
    strips = ta._build_position_strips(table, p, 2, q)
    assert strips.dtype == strip_dtype and strips.shape == (2, ta.STRIP_ROWS, 2 * shift + ta.STRIP_MARGIN)
    r = torch.arange(ta.STRIP_ROWS, device=DEVICE).view(-1, 1)
    x = torch.arange(strips.shape[2], device=DEVICE).view(1, -1)
    for z, index in enumerate((center + x - shift - r, center + r - x + shift)):
        want = (table[index.clamp(0, 2 * center)] * 0.5).to(strip_dtype)
        assert torch.equal(strips[z], want), z
    assert torch.equal(ta._build_position_strips(table, p, 1, q)[0], strips[0])


@pytest.mark.parametrize("rotation", ["carried", "columns", "rows"])
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16), (16, 16), (16, 64)],
                         ids=["keys-wider", "queries-wider", "square", "keys-4x"])
def test_diagonal_position_gradients_every_way(rng, monkeypatch, rotation, tiles):
    """The per-tile diagonal sums of the position gradient, rotating key rows or query
    columns, with tiles wider either way (several wraps: carried to the next query block
    with up to three, sent at once with five), match the reference: pure causal (three
    loops: diagonal blocks, unmasked blocks, the last partial block, the carry crossing
    both boundaries), lengths that are not a multiple of either tile, a window and no
    causality (one loop), a single block, and beside the time table's per-pair atomics."""
    monkeypatch.setattr(ta, "_diagonal_rotation", rotation)
    if not ON_GPU:
        monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "dkdv", ta._Config(*tiles, 1, 1))
    _check(rng, [45, 20, 3, 64], position=0)
    _check(rng, [37, 9], position=1, max_attn_len=11)
    _check(rng, [29, 50], position=0, causal=False)
    _check(rng, [33, 18], H=2, position=0, time_buckets=9)


def test_relative_bias_without_gradient(rng):
    _check(rng, [17, 9], H=2, rab=(2, 2), rab_grad=False, contextual_len=2)


def test_uneven_head_dims_and_empty_sequence(rng):
    # head dims that are not powers of two use masked tiles; an empty sequence writes nothing
    _check(rng, [23, 0, 11], d_qk=24, d_v=40, num_targets=[1, 0, 2])


@pytest.mark.parametrize("blocks", [((32, 16), (16, 32)), ((64, 16), (32, 16))], ids=["BM>BN", "BN>BM"])
def test_block_ranges_with_unequal_tiles(rng, monkeypatch, blocks):
    """The loop bounds each program derives from the mask must hold for any tile shapes."""
    if ON_GPU:
        pytest.skip("tile override applies to the interpreter")
    (fm, fn), (km, kn) = blocks
    monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "fwd", ta._Config(fm, fn, 1, 1))
    monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "dq", ta._Config(fm, fn, 1, 1))
    monkeypatch.setitem(ta._INTERPRETER_CONFIGS, "dkdv", ta._Config(km, kn, 1, 1))
    lengths = [int(x) for x in torch.randint(20, 70, (2,), generator=rng)]
    _check(rng, lengths, num_targets=[5, 3], contextual_len=3, max_attn_len=9)
    _check(rng, lengths)


def test_fused_function_autograd_matches_reference(rng):
    """hstu_attention_fused (autograd.Function over the kernels, no custom op)."""
    q, k, v, offsets = _jagged(rng, [19, 7], 2, 16, 16, torch.float32)
    nt = torch.tensor([2, 1], device=DEVICE)
    rab = torch.randn(1, 2, 19, 19, generator=rng).to(DEVICE)
    opts = dict(max_seq_len=19, alpha=0.25, num_targets=nt, contextual_len=2)
    results = []
    for fn in (ta.hstu_attention_fused, hstu_attention_reference):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rab)]
        out = fn(*leaves[:3], offsets, rab=leaves[3], **opts)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert _rel(got.detach(), want.detach()) <= 1e-5


def test_fused_function_with_tables_matches_reference(rng):
    """hstu_attention_fused with the bias tables: gradients reach both tables."""
    q, k, v, offsets = _jagged(rng, [19, 7], 2, 16, 16, torch.float32)
    tables = _bias_tables(rng, [19, 7], 19, 1, 10)
    opts = dict(max_seq_len=19, alpha=0.25, num_targets=torch.tensor([2, 1], device=DEVICE),
                timestamps=tables["timestamps"])
    results = []
    for fn in (ta.hstu_attention_fused, hstu_attention_reference):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, tables["position_bias"], tables["time_bias"])]
        out = fn(*leaves[:3], offsets, position_bias=leaves[3], time_bias=leaves[4], **opts)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert _rel(got.detach(), want.detach()) <= 1e-5


def test_backend_follows_the_protocol_and_rejects_bad_input():
    backend = ta.hstu_attention_triton()
    assert isinstance(backend, AttentionBackend)
    x = torch.zeros(4, 1, 300, device=DEVICE)
    offsets = torch.tensor([0, 4], device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        backend.forward(x, x, x, offsets, max_seq_len=4, alpha=1.0)
    y = torch.zeros(4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="normalizer"):
        backend.forward(y, y, y, offsets, max_seq_len=4, alpha=1.0, normalizer="rows")
    with pytest.raises(ValueError, match="time_bias and timestamps go together"):
        backend.forward(y, y, y, offsets, max_seq_len=4, alpha=1.0, time_bias=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="position_bias needs 2L - 1 >= 7"):
        backend.forward(y, y, y, offsets, max_seq_len=4, alpha=1.0, position_bias=torch.zeros(5, device=DEVICE))


# ---------------------------------------------------------------- GPU: precision, sizes, head dims
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-3), (torch.float16, 4e-3), (torch.float32, 1e-4)],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("N", [256, 1024, 4096])
def test_gpu_precision_by_length(rng, dtype, tol, N):
    B = 2 if N == 4096 else 4
    lengths = [int(x) for x in torch.randint(N // 2, N + 1, (B,), generator=rng)]
    lengths[0] = N
    _check(rng, lengths, H=2, d_qk=128, d_v=128, dtype=dtype, tol=tol, max_seq_len=N)


@gpu
@needs_cuda
@pytest.mark.parametrize("d_qk,d_v", [(32, 32), (64, 64), (96, 80), (128, 64), (256, 256)])
def test_gpu_head_dims(rng, d_qk, d_v):
    lengths = [int(x) for x in torch.randint(256, 769, (3,), generator=rng)]
    _check(rng, lengths, H=2, d_qk=d_qk, d_v=d_v, dtype=torch.bfloat16, tol=4e-3, max_seq_len=768)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", list(MASK_MODES) + ["rab"])
def test_gpu_mask_modes_bf16(rng, mode):
    options = dict(MASK_MODES.get(mode, {}))
    if "num_targets" in options:
        options["num_targets"] = [t * 40 for t in options["num_targets"]]
    if "contextual_len" in options:
        options["contextual_len"] *= 16
    if "max_attn_len" in options:
        options["max_attn_len"] *= 60
    if mode == "rab":
        options.update(rab=(1, 2), num_targets=[30, 10, 50])
    lengths = [int(x) for x in torch.randint(400, 1025, (3,), generator=rng)]
    _check(rng, lengths, H=2, d_qk=64, d_v=64, dtype=torch.bfloat16, tol=4e-3, max_seq_len=1024, **options)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-3), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("N", [1024, 4096])
@pytest.mark.parametrize("tables", [dict(position=0), dict(position=0, time_buckets=128)], ids=["pos", "pos+time"])
def test_gpu_tables_precision_by_length(rng, dtype, tol, N, tables):
    B = 2 if N == 4096 else 3
    lengths = [int(x) for x in torch.randint(N // 2, N + 1, (B,), generator=rng)]
    lengths[0] = N
    _check(rng, lengths, H=2, d_qk=128, d_v=128, dtype=dtype, tol=tol, max_seq_len=N, **tables)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", list(TABLE_MODES))
def test_gpu_tables_mask_modes_bf16(rng, mode):
    options = dict(TABLE_MODES[mode])
    if "num_targets" in options:
        options["num_targets"] = [t * 40 for t in options["num_targets"]]
    if "contextual_len" in options:
        options["contextual_len"] *= 16
    if "max_attn_len" in options:
        options["max_attn_len"] *= 60
    lengths = [int(x) for x in torch.randint(400, 1025, (3,), generator=rng)]
    _check(rng, lengths, H=2, d_qk=64, d_v=64, dtype=torch.bfloat16, tol=4e-3, max_seq_len=1024, **options)


@gpu
@needs_cuda
def test_gpu_tables_through_the_public_op(rng, fresh_registry):
    from gauss_plugins.hstu import hstu_attention

    q, k, v, offsets = _jagged(rng, [200, 57, 133], 1, 64, 64, torch.bfloat16)
    tables = _bias_tables(rng, [200, 57, 133], 200, 0, 128)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    pos, time = (tables[n].detach().clone().requires_grad_(True) for n in ("position_bias", "time_bias"))
    opts = dict(max_seq_len=200, alpha=1.0)
    out = hstu_attention(*leaves, offsets, position_bias=pos, time_bias=time, timestamps=tables["timestamps"], **opts)
    go = torch.randn_like(out)
    out.backward(go)
    f = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    rpos, rtime = (t.detach().clone().requires_grad_(True) for t in (pos, time))
    ref = hstu_attention_reference(*f, offsets, position_bias=rpos, time_bias=rtime,
                                   timestamps=tables["timestamps"], **opts)
    ref.backward(go.float())
    assert _rel(out, ref) <= 4e-3
    for got, want in zip(leaves + [pos, time], f + [rpos, rtime]):
        assert _rel(got.grad, want.grad) <= 4e-3


@gpu
@needs_cuda
def test_gpu_backward_is_deterministic(rng):
    q, k, v, offsets = _jagged(rng, [1000, 700], 2, 64, 64, torch.bfloat16)
    go = torch.randn_like(v)
    backend = ta.hstu_attention_triton()
    opts = dict(max_seq_len=1000, alpha=0.125, compute_drab=False)
    first = backend.backward(go, q, k, v, offsets, **opts)
    second = backend.backward(go, q, k, v, offsets, **opts)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


@gpu
@needs_cuda
def test_gpu_public_op_dispatches_to_triton_with_autograd(rng, fresh_registry):
    from gauss_plugins.hstu import hstu_attention
    from gauss_plugins.plugins import get_registry

    assert get_registry().select("attention_backend", "auto", q=torch.zeros(1, device="cuda")).name == "triton"
    q, k, v, offsets = _jagged(rng, [300, 129, 77], 2, 64, 64, torch.bfloat16)
    nt = torch.tensor([5, 3, 0], device="cuda")
    rab = torch.randn(1, 2, 300, 300, device="cuda", requires_grad=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    opts = dict(max_seq_len=300, alpha=0.125, num_targets=nt, contextual_len=4)
    out = hstu_attention(*leaves, offsets, rab=rab, **opts)
    go = torch.randn_like(out)
    out.backward(go)
    f = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    rab_ref = rab.detach().clone().requires_grad_(True)
    ref = hstu_attention_reference(*f, offsets, rab=rab_ref, **opts)
    ref.backward(go.float())
    assert _rel(out, ref) <= 4e-3
    for got, want in zip(leaves + [rab], f + [rab_ref]):
        assert _rel(got.grad, want.grad) <= 4e-3


@gpu
@needs_cuda
def test_gpu_fp64(rng):
    # scalars (alpha, 1/normaliser) reach the kernels as fp32: fp64 is exact to ~1e-7
    _check(rng, [200, 77], H=2, d_qk=32, d_v=32, dtype=torch.float64, tol=1e-6, num_targets=[3, 1],
           contextual_len=2)


_VARIANTS = [(kind, i) for kind in ("fwd", "dkdv", "dq") for i in range(len(ta._CANDIDATES[kind][128]))]


@gpu
@needs_cuda
@pytest.mark.parametrize("kind,index", _VARIANTS, ids=[f"{k}-{i}" for k, i in _VARIANTS])
@pytest.mark.parametrize("mode", ["causal", "targets+contextual+window", "tables", "tables+targets"])
def test_gpu_every_kernel_variant(rng, monkeypatch, kind, index, mode):
    """Each config the autotuner may pick for each kernel (tiles, TMA descriptors, warp
    specialization) computes the same function. A variant this triton cannot build is
    skipped, as the tuner skips it."""
    cfg = ta._CANDIDATES[kind][128][index]
    monkeypatch.setitem(ta._CANDIDATES[kind], 128, [cfg])
    monkeypatch.setenv("GAUSS_HSTU_AUTOTUNE", "0")
    monkeypatch.setattr(ta, "_tuned", {})
    options = {
        "causal": {},
        "targets+contextual+window": dict(num_targets=[40, 7, 90], contextual_len=5, max_attn_len=300),
        "tables": dict(position=0, time_buckets=128),  # per-diagonal position gradients
        "tables+targets": dict(position=0, time_buckets=128, num_targets=[40, 7, 90]),  # per-pair
    }[mode]
    lengths = [int(x) for x in torch.randint(300, 1025, (3,), generator=rng)]
    try:
        _check(rng, lengths, H=2, d_qk=128, d_v=128, dtype=torch.bfloat16, tol=4e-3, max_seq_len=1024, **options)
    except Exception as exc:
        if ta._experimental(cfg) and type(exc).__name__ in ("CompilationError", "OutOfResources", "RuntimeError"):
            pytest.skip(f"{cfg} not buildable here: {type(exc).__name__}")
        raise
