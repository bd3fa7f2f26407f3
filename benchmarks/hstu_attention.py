"""Benchmark: fused Triton HSTU attention vs the padded PyTorch reference (bf16, causal).

Jagged lengths uniform in [N/2, N]; configs (B, N, H, D) from issue 5. FLOPs counted as
``4 * H * D * sum n(n+1)/2`` forward and 2.5x that backward. Each kernel is timed as eager
calls and as CUDA-graph replays (median of CUDA-event timings); the baseline is a padded
bf16 PyTorch implementation (dense masks, autograd backward) timed the same way in the same
run. Accuracy against the fp32 reference (:func:`hstu_attention_reference` on upcast
inputs) is recorded for every config. ``eager_fwd_us_small`` is the wall time of one eager
forward call through the public ``gauss_plugins.hstu.hstu_attention`` (backend "auto") at
(B, N, H, D) = (128, 200, 1, 64), host overhead included.

    python benchmarks/hstu_attention.py --json benchmarks/results/hstu_attention_h100.json \
        --plot benchmarks/results/hstu_attention_h100.png        # GPU
    python benchmarks/hstu_attention.py --quick                   # CPU: reference, tiny

Relative attention bias (issue 9): at N=4096 and at the training shape (128, 200, 1, 64) the
same kernels also run with the bias built per tile from a position table (``rab`` cases;
``rab_cost_ratio`` = fwd+bwd time with it / without it) and from position + time tables
(``rabt``), each with the tables' gradients; the baseline in the same run is the previous
way, a dense ``[B, 1, N, N]`` bias gathered from the table and passed as ``rab``, whose
gradient is reduced back to the table by ``index_put_(accumulate=True)`` (what autograd of
the gather does). ``rab_diag_off`` times the per-pair-atomic reduction of the position-bias
gradient instead of the per-diagonal one. On CPU, ``--quick`` also measures the reference
(``backend="torch"``) backward with the tables against the dense-rab path at (128, 200, 1, 64).

The ``cuda`` backend (CUDA C++ kernels for sm_90, issue 14) runs beside ``triton`` in the
same run on the same inputs: ``cuda_*`` columns (graph and eager timings, accuracy, the
position-bias case at N in BIAS_NS) and ``cuda_vs_triton_fwd`` / ``cuda_vs_triton_fwdbwd``
(triton time / cuda time, CUDA-graph timings; > 1: cuda is faster) at N=4096, N=2048 and the
small shape. Where the cuda backend cannot run (not sm_90, no nvcc), its keys are None and
``cuda_skipped`` says why.

``--configs 4096,200`` runs only the configs of those N; ``--tune-top K`` autotunes over the
first K candidates of each kernel only (both to fit a short device lease; recorded in the
JSON). ``--plot-only JSON --plot PNG`` redraws the plot from a saved record.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from gauss_plugins.benchmarking import parser, print_table, write_report

CONFIGS = [(32, 1024, 4, 128), (16, 2048, 4, 128), (8, 4096, 4, 128), (64, 512, 2, 64), (128, 200, 1, 64)]
BIAS_NS = (4096, 200)
TARGETS = {"rab_cost_ratio": "<= 1.15"}  # configs that also run the relative-bias cases
# (the cuda targets, CUDA_TARGETS, are added below)
NUM_TIME_BUCKETS = 128  # the paper's setting
QUICK_CONFIGS = [(4, 64, 2, 32), (2, 128, 1, 32)]


# ---------------------------------------------------------------- inputs and FLOPs
def make_inputs(B: int, N: int, H: int, D: int, device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return lengths, offsets.to(device), q, k, v


def bias_tables(lengths: torch.Tensor, N: int, device: str, seed: int) -> Dict[str, torch.Tensor]:
    """Position table [2N - 1], time table [NUM_TIME_BUCKETS + 1] (fp32, small values as a
    trained model has) and jagged increasing int64 timestamps (gaps of seconds to days)."""
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    gaps = (torch.rand(int(lengths.sum()), generator=g) ** 4 * 86400 * 3).to(torch.int64)
    times = torch.cat([torch.cumsum(part, 0) + 1_600_000_000 for part in torch.split(gaps, lengths.tolist())])
    return dict(position_bias=(0.1 * torch.randn(2 * N - 1, generator=g)).to(device),
                time_bias=(0.1 * torch.randn(NUM_TIME_BUCKETS + 1, generator=g)).to(device),
                timestamps=times.to(device))


def dense_position_index(offsets: torch.Tensor, N: int, size: int) -> torch.Tensor:
    """[B, 1, N, N] index of the position table (what the previous module gathered)."""
    from gauss_plugins.hstu.attention import _relative_bias_indices

    index, _ = _relative_bias_indices(offsets, N, position_size=size, num_buckets=None, timestamps=None,
                                      time_bucket_scale=0.301, num_targets=None, contextual_len=0)
    # one bias per sequence, materialised, as the module built it (the index is shared)
    return index.unsqueeze(1).expand(offsets.shape[0] - 1, 1, N, N).contiguous()


def fwd_flops(lengths: torch.Tensor, H: int, D: int) -> float:
    n = lengths.double()
    return float(4 * H * D * (n * (n + 1) / 2).sum())


# ---------------------------------------------------------------- the padded torch baseline
class PaddedTorchAttention:
    """Plain PyTorch HSTU attention on padded [B, H, N, N] scores, in the input dtype, with
    autograd backward. Index tensors and the causal/length mask are built once (outside the
    timings), so the timed calls never synchronise and can be captured in a graph."""

    def __init__(self, lengths: torch.Tensor, offsets: torch.Tensor, N: int, alpha: float):
        device = offsets.device
        B = lengths.shape[0]
        T = int(lengths.sum())
        self.batch_idx = torch.repeat_interleave(torch.arange(B), lengths).to(device)
        self.pos_idx = (torch.arange(T) - torch.repeat_interleave(offsets[:-1].cpu(), lengths)).to(device)
        pos = torch.arange(N, device=device)
        inside = pos.view(1, N) < lengths.to(device).view(B, 1)
        causal = pos.view(N, 1) >= pos.view(1, N)
        self.mask = (causal.view(1, N, N) & inside.view(B, N, 1) & inside.view(B, 1, N)).unsqueeze(1)
        self.B, self.N, self.alpha = B, N, alpha

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((self.B, self.N) + tuple(x.shape[1:]))
        out[self.batch_idx, self.pos_idx] = x
        return out.transpose(1, 2)  # [B, H, N, d]

    def __call__(self, q, k, v):
        qp, kp, vp = self._pad(q), self._pad(k), self._pad(v)
        s = torch.matmul(qp, kp.transpose(-1, -2)) * self.alpha
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        p = torch.where(self.mask, torch.nn.functional.silu(s) / self.N, zero)
        out = torch.matmul(p, vp).transpose(1, 2)  # [B, N, H, d]
        return out[self.batch_idx, self.pos_idx]


# ---------------------------------------------------------------- timing
def time_eager(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median seconds of one call, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_graph(fn: Callable[[], Any], repeats: int = 20) -> Optional[float]:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph (after a warm-up on
    a side stream, as graph capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_eager(graph.replay, warmup=2, repeats=repeats)


def host_call_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Wall time per call of back-to-back eager calls (launch overhead included), in µs."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


# ---------------------------------------------------------------- the cuda backend (issue 14)
_cuda_skipped: Optional[str] = None


def cuda_backend():
    """The ``cuda`` backend when its kernels run here (bf16, D=128, causal on this GPU), else
    None with the reason kept in ``_cuda_skipped``."""
    global _cuda_skipped
    try:
        from gauss_kernels.hstu.cuda_attention import hstu_attention_cuda
    except ImportError as exc:
        _cuda_skipped = f"gauss_kernels.hstu.cuda_attention: {exc}"
        return None
    backend = hstu_attention_cuda()
    x = torch.zeros(1, 1, 128, dtype=torch.bfloat16, device="cuda")
    _cuda_skipped = backend.unsupported_reason(x, x, x)
    return None if _cuda_skipped else backend


def bench_cuda(backend, q, k, v, offsets, lengths, go, opts, flops: float, seed: int) -> Dict[str, Any]:
    """Timings of the cuda backend on one config's inputs (and, at N in BIAS_NS, with the
    position table, its gradient included)."""
    row: Dict[str, Any] = {}
    cases = {"": dict(opts)}
    grads = dict(compute_drab=False, compute_dposition_bias=True, compute_dtime_bias=False)
    if opts["max_seq_len"] in BIAS_NS:
        cases["rab_"] = dict(opts, position_bias=bias_tables(lengths, opts["max_seq_len"], q.device.type,
                                                             seed)["position_bias"])
    for prefix, o in cases.items():
        def fwd(o=o):
            return backend.forward(q, k, v, offsets, **o)

        def fwdbwd(o=o):
            out = backend.forward(q, k, v, offsets, **o)
            return out, backend.backward(go, q, k, v, offsets, **grads, **o)

        fwdbwd()  # builds the extension (once) outside the timings
        torch.cuda.synchronize()
        for name, fn, fl in (("fwd", fwd, flops), ("fwdbwd", fwdbwd, 3.5 * flops)):
            if not prefix:
                t_eager = time_eager(fn)
                row[f"cuda_{name}_eager_ms"] = t_eager * 1e3
                row[f"cuda_{name}_eager_tflops"] = fl / t_eager / 1e12
            t_graph = time_graph(fn)
            row[f"cuda_{prefix}{name}_graph_ms"] = t_graph * 1e3
            row[f"cuda_{prefix}{name}_graph_tflops"] = fl / t_graph / 1e12
        if prefix:
            from gauss_plugins.hstu.attention import hstu_attention_reference, hstu_attention_reference_backward

            out = fwd()
            got = backend.backward(go, q, k, v, offsets, **grads, **o)
            qf, kf, vf = q.float(), k.float(), v.float()
            ref = hstu_attention_reference(qf, kf, vf, offsets, **o)
            want = hstu_attention_reference_backward(go.float(), qf, kf, vf, offsets, **grads, **o)
            row[f"cuda_{prefix}out_rel_err"] = rel_err(out, ref)
            for label, i in (("dq", 0), ("dk", 1), ("dv", 2), ("dpos", 4)):
                row[f"cuda_{prefix}{label}_rel_err"] = rel_err(got[i], want[i])
            del ref, want
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- one config
def bench_config(B: int, N: int, H: int, D: int, seed: int, device: str = "cuda") -> Dict[str, Any]:
    from gauss_kernels.hstu.triton_attention import hstu_attention_triton
    from gauss_plugins.hstu.attention import hstu_attention_reference, hstu_attention_reference_backward

    backend = hstu_attention_triton()
    alpha = 1.0 / math.sqrt(D)
    lengths, offsets, q, k, v = make_inputs(B, N, H, D, device, torch.bfloat16, seed)
    go = torch.randn_like(v)
    opts = dict(max_seq_len=N, alpha=alpha, causal=True)
    flops = fwd_flops(lengths, H, D)
    row: Dict[str, Any] = dict(B=B, N=N, H=H, D=D, tokens=int(lengths.sum()), fwd_gflop=flops / 1e9)

    def ours_fwd():
        return backend.forward(q, k, v, offsets, **opts)

    def ours_fwdbwd():
        out = backend.forward(q, k, v, offsets, **opts)
        return out, backend.backward(go, q, k, v, offsets, compute_drab=False, **opts)

    ours_fwdbwd()  # autotunes outside the timings and the graph capture
    torch.cuda.synchronize()
    for name, fn, fl in (("fwd", ours_fwd, flops), ("fwdbwd", ours_fwdbwd, 3.5 * flops)):
        t_eager = time_eager(fn)
        t_graph = time_graph(fn)
        row[f"ours_{name}_eager_ms"] = t_eager * 1e3
        row[f"ours_{name}_graph_ms"] = t_graph * 1e3
        row[f"ours_{name}_eager_tflops"] = fl / t_eager / 1e12
        row[f"ours_{name}_graph_tflops"] = fl / t_graph / 1e12

    if N in BIAS_NS:
        row.update(bench_bias(backend, q, k, v, offsets, lengths, go, opts, flops, seed))
    cuda = cuda_backend()
    if cuda is not None:
        row.update(bench_cuda(cuda, q, k, v, offsets, lengths, go, opts, flops, seed))

    # baseline: padded bf16 torch, autograd backward
    base = PaddedTorchAttention(lengths, offsets, N, alpha)
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def base_fwd():
        with torch.no_grad():
            return base(q, k, v)

    def base_fwdbwd():
        out = base(qr, kr, vr)
        return torch.autograd.grad(out, (qr, kr, vr), go)

    for name, fn, fl in (("fwd", base_fwd, flops), ("fwdbwd", base_fwdbwd, 3.5 * flops)):
        t_eager = time_eager(fn, warmup=2, repeats=10)
        row[f"ref_{name}_eager_ms"] = t_eager * 1e3
        row[f"ref_{name}_eager_tflops"] = fl / t_eager / 1e12
        try:
            t_graph = time_graph(fn, repeats=10)
            row[f"ref_{name}_graph_ms"] = t_graph * 1e3
            row[f"ref_{name}_graph_tflops"] = fl / t_graph / 1e12
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            row[f"ref_{name}_graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    del qr, kr, vr
    torch.cuda.empty_cache()

    # accuracy against the fp32 reference on the same (bf16-valued) inputs; outputs poisoned
    out = torch.full_like(v, float("nan"))
    out.copy_(ours_fwd())
    dq, dk, dv = backend.backward(go, q, k, v, offsets, compute_drab=False, **opts)[:3]
    qf, kf, vf, gof = q.float(), k.float(), v.float(), go.float()
    ref = hstu_attention_reference(qf, kf, vf, offsets, **opts)
    rdq, rdk, rdv = hstu_attention_reference_backward(gof, qf, kf, vf, offsets, compute_drab=False, **opts)[:3]
    for name, x, r in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        row[f"{name}_rel_err"] = rel_err(x, r)
        row[f"{name}_finite"] = bool(torch.isfinite(x).all())
    if cuda is not None:
        out = torch.full_like(v, float("nan"))
        out.copy_(cuda.forward(q, k, v, offsets, **opts))
        dq, dk, dv = cuda.backward(go, q, k, v, offsets, compute_drab=False, **opts)[:3]
        for name, x, r in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
            row[f"cuda_{name}_rel_err"] = rel_err(x, r)
            row[f"cuda_{name}_finite"] = bool(torch.isfinite(x).all())
    del ref, rdq, rdk, rdv
    torch.cuda.empty_cache()
    return row


def bench_bias(backend, q, k, v, offsets, lengths, go, opts, flops: float, seed: int) -> Dict[str, Any]:
    """The relative-bias cases of one config (see the module docstring)."""
    from gauss_kernels.hstu import triton_attention as ta
    from gauss_plugins.hstu.attention import hstu_attention_reference, hstu_attention_reference_backward

    N = opts["max_seq_len"]
    tables = bias_tables(lengths, N, q.device.type, seed)
    cases = {"rab": dict(position_bias=tables["position_bias"]), "rabt": tables}
    grads = dict(compute_drab=False, compute_dposition_bias=True, compute_dtime_bias=True)
    row: Dict[str, Any] = {}

    def timed(name: str, fwd: Callable[[], Any], fwdbwd: Callable[[], Any]) -> None:
        fwdbwd()  # autotunes outside the timings and the graph capture
        torch.cuda.synchronize()
        for part, fn, fl in (("fwd", fwd, flops), ("fwdbwd", fwdbwd, 3.5 * flops)):
            t_graph = time_graph(fn)
            row[f"{name}_{part}_graph_ms"] = t_graph * 1e3
            row[f"{name}_{part}_graph_tflops"] = fl / t_graph / 1e12

    for name, extra in cases.items():
        o = dict(opts, **extra)

        def fwd(o=o):
            return backend.forward(q, k, v, offsets, **o)

        def fwdbwd(o=o):
            out = backend.forward(q, k, v, offsets, **o)
            return out, backend.backward(go, q, k, v, offsets, **grads, **o)

        timed(name, fwd, fwdbwd)
        # accuracy against the fp32 reference, the tables' gradients included
        out = fwd()
        got = backend.backward(go, q, k, v, offsets, **grads, **o)
        qf, kf, vf = q.float(), k.float(), v.float()
        ref = hstu_attention_reference(qf, kf, vf, offsets, **o)
        want = hstu_attention_reference_backward(go.float(), qf, kf, vf, offsets, **grads, **o)
        row[f"{name}_out_rel_err"] = rel_err(out, ref)
        for label, i in (("dq", 0), ("dk", 1), ("dv", 2), ("dpos", 4), ("dtime", 5)):
            if got[i] is not None:
                row[f"{name}_{label}_rel_err"] = rel_err(got[i], want[i])
        del ref, want
        torch.cuda.empty_cache()

    # the per-pair-atomic reduction of the position-bias gradient, for comparison
    o = dict(opts, **cases["rab"])
    saved = ta._diagonal_position_grads
    ta._diagonal_position_grads = False
    try:
        timed("rab_diag_off", lambda: backend.forward(q, k, v, offsets, **o),
              lambda: (backend.forward(q, k, v, offsets, **o), backend.backward(go, q, k, v, offsets, **grads, **o)))
    finally:
        ta._diagonal_position_grads = saved

    # baseline: the dense bias gathered from the table, passed as rab, its gradient reduced
    # back to the table by index_put_(accumulate=True) (autograd's backward of the gather)
    table = tables["position_bias"]
    index = dense_position_index(offsets, N, table.shape[0])

    def dense_fwd():
        return backend.forward(q, k, v, offsets, rab=table[index], **opts)

    def dense_fwdbwd():
        rab = table[index]
        out = backend.forward(q, k, v, offsets, rab=rab, **opts)
        dq, dk, dv, drab, _, _ = backend.backward(go, q, k, v, offsets, rab=rab, compute_drab=True, **opts)
        dtable = torch.zeros_like(table).index_put_((index,), drab, accumulate=True)
        return out, dq, dk, dv, dtable

    dense_fwdbwd()
    torch.cuda.synchronize()
    for part, fn, fl in (("fwd", dense_fwd, flops), ("fwdbwd", dense_fwdbwd, 3.5 * flops)):
        t = time_eager(fn, warmup=2, repeats=10)
        row[f"dense_rab_{part}_eager_ms"] = t * 1e3
        row[f"dense_rab_{part}_eager_tflops"] = fl / t / 1e12
        try:
            t = time_graph(fn, repeats=10)
            row[f"dense_rab_{part}_graph_ms"] = t * 1e3
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            row[f"dense_rab_{part}_graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    del index
    torch.cuda.empty_cache()
    return row


def profile_small(seed: int, path: str, calls: int = 300) -> None:
    """cProfile of eager small-shape forward calls (public op and backend), top functions by
    own time, written to ``path``: where the host time of a call goes."""
    import cProfile
    import io
    import pstats

    from gauss_kernels.hstu.triton_attention import hstu_attention_triton
    from gauss_plugins.hstu import hstu_attention

    B, N, H, D = CONFIGS[-1]
    lengths, offsets, q, k, v = make_inputs(B, N, H, D, "cuda", torch.bfloat16, seed)
    opts = dict(max_seq_len=N, alpha=1.0 / math.sqrt(D))
    backend = hstu_attention_triton()
    text = io.StringIO()
    with torch.no_grad():
        for name, fn in (("public hstu_attention", lambda: hstu_attention(q, k, v, offsets, **opts)),
                         ("backend.forward", lambda: backend.forward(q, k, v, offsets, causal=True, **opts))):
            fn()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            text.write(f"==== {name}: {calls} calls\n")
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    with open(path, "w") as f:
        f.write(text.getvalue())


def eager_small_us(seed: int) -> Dict[str, float]:
    """Per-call wall time of the small-shape eager forward: through the public op, and
    straight into the backend (the difference is the op's dispatch and checks)."""
    from gauss_kernels.hstu.triton_attention import hstu_attention_triton
    from gauss_plugins.hstu import hstu_attention

    B, N, H, D = CONFIGS[-1]
    lengths, offsets, q, k, v = make_inputs(B, N, H, D, "cuda", torch.bfloat16, seed)
    opts = dict(max_seq_len=N, alpha=1.0 / math.sqrt(D))
    backend = hstu_attention_triton()
    result = {}
    with torch.no_grad():
        result["public_api_us"] = host_call_us(lambda: hstu_attention(q, k, v, offsets, **opts))
        result["backend_us"] = host_call_us(lambda: backend.forward(q, k, v, offsets, causal=True, **opts))
        result["kernel_graph_us"] = 1e6 * time_graph(lambda: backend.forward(q, k, v, offsets, causal=True, **opts),
                                                     repeats=50)
        cuda = cuda_backend()
        if cuda is not None:
            result["cuda_backend_us"] = host_call_us(lambda: cuda.forward(q, k, v, offsets, causal=True, **opts))
            result["cuda_kernel_graph_us"] = 1e6 * time_graph(
                lambda: cuda.forward(q, k, v, offsets, causal=True, **opts), repeats=50)
    return result


# ---------------------------------------------------------------- CPU quick mode
def quick(seed: int) -> List[Dict[str, Any]]:
    """Reference only, tiny shapes: checks the script and the FLOP count on a CPU."""
    from gauss_plugins.hstu.attention import hstu_attention_reference

    rows = []
    for B, N, H, D in QUICK_CONFIGS:
        lengths, offsets, q, k, v = make_inputs(B, N, H, D, "cpu", torch.float32, seed)
        opts = dict(max_seq_len=N, alpha=1.0 / math.sqrt(D))
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            hstu_attention_reference(q, k, v, offsets, **opts)
        t = (time.perf_counter() - t0) / reps
        flops = fwd_flops(lengths, H, D)
        rows.append(dict(B=B, N=N, H=H, D=D, fwd_gflop=flops / 1e9, ref_fwd_cpu_ms=t * 1e3,
                         ref_fwd_cpu_tflops=flops / t / 1e12))
    return rows


def reference_bias_backward_cpu(seed: int, repeats: int = 5) -> Dict[str, Any]:
    """Backward time of the reference op (backend="torch") at the training shape (128, 200, 1,
    64) on this CPU: the position table passed as a table (dS reduced by index) vs the dense
    [B, 1, N, N] bias gathered from it and passed as rab (autograd's index backward)."""
    from gauss_plugins.hstu import hstu_attention

    B, N, H, D = CONFIGS[-1]
    lengths, offsets, q, k, v = make_inputs(B, N, H, D, "cpu", torch.float32, seed)
    table = bias_tables(lengths, N, "cpu", seed)["position_bias"].requires_grad_(True)
    index = dense_position_index(offsets, N, table.shape[0])
    q.requires_grad_(True)
    opts = dict(max_seq_len=N, alpha=1.0 / math.sqrt(D), backend="torch")
    go = torch.randn_like(v)

    def backward_time(make_out) -> float:
        times = []
        torch.autograd.grad(make_out(), [q, table], go)  # warm-up
        for _ in range(repeats):
            out = make_out()
            t0 = time.perf_counter()
            torch.autograd.grad(out, [q, table], go)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    tables_s = backward_time(lambda: hstu_attention(q, k, v, offsets, position_bias=table, **opts))
    dense_s = backward_time(lambda: hstu_attention(q, k, v, offsets, rab=table[index], **opts))
    return dict(B=B, N=N, H=H, D=D, ref_bwd_tables_ms=tables_s * 1e3, ref_bwd_dense_rab_ms=dense_s * 1e3,
                ref_bwd_dense_over_tables=dense_s / tables_s)


# ---------------------------------------------------------------- plot
def plot(record: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in record["results"] if "ours_fwd_graph_tflops" in r), key=lambda r: r["N"])
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"N={r['N']}\n(B{r['B']} H{r['H']} D{r['D']})" for r in rows]
    x = list(range(len(rows)))
    for ax, name, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        ax.plot(x, [r[f"ours_{name}_graph_tflops"] for r in rows], "o-", label="fused Triton (graph)")
        ax.plot(x, [r[f"ours_{name}_eager_tflops"] for r in rows], "o--", label="fused Triton (eager)")
        ax.plot(x, [r.get(f"ref_{name}_graph_tflops", r[f"ref_{name}_eager_tflops"]) for r in rows], "s-",
                label="padded torch reference")
        ax.axhline(450 if name == "fwd" else 300, color="gray", lw=0.8, ls=":", label="target (N >= 2048)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"HSTU attention {title}, bf16 causal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gpu = record.get("machine", {}).get("gpu") or "?"
    fig.suptitle(f"{gpu}, torch {record['machine'].get('torch')}, triton {record['machine'].get('triton')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


CUDA_SUMMARY_KEYS = ("cuda_fwd_tflops_n4096", "cuda_fwdbwd_tflops_n4096", "cuda_fwd_tflops_n2048",
                     "cuda_fwdbwd_tflops_n2048", "cuda_vs_triton_fwd", "cuda_vs_triton_fwdbwd",
                     "cuda_vs_triton_fwd_n2048", "cuda_vs_triton_fwdbwd_n2048", "cuda_vs_triton_fwd_small",
                     "cuda_vs_triton_fwdbwd_small", "cuda_eager_fwd_us_small_backend", "cuda_kernel_fwd_us_small",
                     "cuda_dq_rel_err_n4096", "cuda_max_rel_err", "cuda_fwd_tflops_n4096_rab",
                     "cuda_fwdbwd_tflops_n4096_rab", "cuda_rab_cost_ratio", "cuda_max_rel_err_rab")
CUDA_TARGETS = {"cuda_fwd_tflops_n4096": ">= 600", "cuda_fwd_tflops_n2048": ">= 600",
                "cuda_fwdbwd_tflops_n4096": ">= 420", "cuda_fwdbwd_tflops_n2048": ">= 420",
                "cuda_vs_triton_fwd": ">= 1.3", "cuda_vs_triton_fwdbwd": ">= 1.3",
                "cuda_vs_triton_fwd_small": ">= 1.0", "cuda_vs_triton_fwdbwd_small": ">= 1.0",
                "cuda_max_rel_err": "<= 0.004"}


def cuda_summary(rows: List[Dict[str, Any]], small: Dict[str, float]) -> Dict[str, Any]:
    """The ``cuda_*`` summary keys (None where not measured; ``cuda_skipped`` says why)."""
    by_n = {r["N"]: r for r in rows if "N" in r}

    def get(n: int, key: str) -> Optional[float]:
        return by_n.get(n, {}).get(key)

    def speedup(n: int, part: str) -> Optional[float]:
        ours, cuda = get(n, f"ours_{part}_graph_ms"), get(n, f"cuda_{part}_graph_ms")
        return None if ours is None or cuda is None else ours / cuda

    errors = [r[f"cuda_{n}_rel_err"] for r in rows for n in ("out", "dq", "dk", "dv") if f"cuda_{n}_rel_err" in r]
    rab_errors = [v for r in rows for key, v in r.items() if key.startswith("cuda_rab_") and key.endswith("_rel_err")]
    rab_ms, plain_ms = get(4096, "cuda_rab_fwdbwd_graph_ms"), get(4096, "cuda_fwdbwd_graph_ms")
    summary = {
        "cuda_fwd_tflops_n4096": get(4096, "cuda_fwd_graph_tflops"),
        "cuda_fwdbwd_tflops_n4096": get(4096, "cuda_fwdbwd_graph_tflops"),
        "cuda_fwd_tflops_n2048": get(2048, "cuda_fwd_graph_tflops"),
        "cuda_fwdbwd_tflops_n2048": get(2048, "cuda_fwdbwd_graph_tflops"),
        "cuda_vs_triton_fwd": speedup(4096, "fwd"),
        "cuda_vs_triton_fwdbwd": speedup(4096, "fwdbwd"),
        "cuda_vs_triton_fwd_n2048": speedup(2048, "fwd"),
        "cuda_vs_triton_fwdbwd_n2048": speedup(2048, "fwdbwd"),
        "cuda_vs_triton_fwd_small": speedup(200, "fwd"),
        "cuda_vs_triton_fwdbwd_small": speedup(200, "fwdbwd"),
        "cuda_eager_fwd_us_small_backend": small.get("cuda_backend_us"),
        "cuda_kernel_fwd_us_small": small.get("cuda_kernel_graph_us"),
        "cuda_dq_rel_err_n4096": get(4096, "cuda_dq_rel_err"),
        "cuda_max_rel_err": max(errors) if errors else None,
        "cuda_fwd_tflops_n4096_rab": get(4096, "cuda_rab_fwd_graph_tflops"),
        "cuda_fwdbwd_tflops_n4096_rab": get(4096, "cuda_rab_fwdbwd_graph_tflops"),
        "cuda_rab_cost_ratio": None if rab_ms is None or plain_ms is None else rab_ms / plain_ms,
        "cuda_max_rel_err_rab": max(rab_errors) if rab_errors else None,
    }
    if _cuda_skipped:
        summary["cuda_skipped"] = _cuda_skipped
    return summary


# ---------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--plot", metavar="PNG", help="draw TFLOP/s by N (ours vs reference) here")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot from a saved record and exit")
    p.add_argument("--profile", metavar="TXT", help="write a cProfile of the small eager call here")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000,
                   help="input seed (default: fresh every run)")
    p.add_argument("--configs", metavar="N,N", help="run only the configs with these N (default: all)")
    p.add_argument("--tune-top", type=int, default=0, metavar="K",
                   help="autotune over the first K candidates of each kernel only (default: all)")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            record = json.load(f)
        plot(record, args.plot or os.path.splitext(args.plot_only)[0] + ".png")
        return record

    if args.quick or not torch.cuda.is_available():
        if not args.quick:
            print("no CUDA device: running --quick (reference only)", file=sys.stderr)
        rows = quick(args.seed)
        print_table(rows)
        bias_row = reference_bias_backward_cpu(args.seed)
        print_table([bias_row])
        rows.append(bias_row)
        summary = {k: None for k in ("fwd_tflops_n4096", "fwdbwd_tflops_n4096", "fwd_tflops_n2048",
                                     "fwdbwd_tflops_n2048", "eager_fwd_us_small", "dq_rel_err_n4096",
                                     "fwd_tflops_n4096_rab", "fwdbwd_tflops_n4096_rab", "rab_cost_ratio")}
        summary["ref_bwd_ms_small_tables"] = bias_row["ref_bwd_tables_ms"]
        summary["ref_bwd_ms_small_dense_rab"] = bias_row["ref_bwd_dense_rab_ms"]
        summary["mode"] = "quick (CPU reference only)"
        summary.update({k: None for k in CUDA_SUMMARY_KEYS})
        summary["cuda_skipped"] = "no CUDA device (quick CPU mode)"
        return write_report("hstu_attention", rows, summary, args.json, targets={**TARGETS, **CUDA_TARGETS})

    from gauss_kernels.hstu import triton_attention as ta

    if args.tune_top:
        for table in (ta._CANDIDATES, ta._WIDE_CANDIDATES):
            for kind in table:
                for d in table[kind]:
                    table[kind][d] = table[kind][d][:args.tune_top]
    wanted = set(int(n) for n in args.configs.split(",")) if args.configs else None
    rows = []
    for i, (B, N, H, D) in enumerate(CONFIGS):
        if wanted is not None and N not in wanted:
            continue
        t0 = time.perf_counter()
        rows.append(bench_config(B, N, H, D, args.seed + i))
        print(f"config {(B, N, H, D)}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    small = eager_small_us(args.seed) if 200 in {r["N"] for r in rows} else {}
    if args.profile:
        profile_small(args.seed, args.profile)
    from gauss_kernels.hstu.triton_attention import _tune_failures, _tuned

    columns = ["B", "N", "H", "D", "ours_fwd_graph_tflops", "ours_fwd_eager_tflops", "ours_fwdbwd_graph_tflops",
               "ours_fwdbwd_eager_tflops", "ref_fwd_eager_tflops", "ref_fwdbwd_eager_tflops", "out_rel_err",
               "dq_rel_err", "dk_rel_err", "dv_rel_err"]
    by_n = {r["N"]: r for r in rows}
    n4096, n2048, n200 = by_n.get(4096, {}), by_n.get(2048, {}), by_n.get(200, {})

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None else a / b

    summary = {
        "fwd_tflops_n4096": n4096.get("ours_fwd_graph_tflops"),
        "fwdbwd_tflops_n4096": n4096.get("ours_fwdbwd_graph_tflops"),
        "fwd_tflops_n2048": n2048.get("ours_fwd_graph_tflops"),
        "fwdbwd_tflops_n2048": n2048.get("ours_fwdbwd_graph_tflops"),
        "eager_fwd_us_small": small.get("public_api_us"),
        "eager_fwd_us_small_backend": small.get("backend_us"),
        "kernel_fwd_us_small": small.get("kernel_graph_us"),
        "dq_rel_err_n4096": n4096.get("dq_rel_err"),
        "max_rel_err": max(max(r[f"{n}_rel_err"] for n in ("out", "dq", "dk", "dv")) for r in rows),
        "fwd_tflops_n4096_rab": n4096.get("rab_fwd_graph_tflops"),
        "fwdbwd_tflops_n4096_rab": n4096.get("rab_fwdbwd_graph_tflops"),
        "rab_cost_ratio": ratio(n4096.get("rab_fwdbwd_graph_ms"), n4096.get("ours_fwdbwd_graph_ms")),
        "fwdbwd_tflops_n4096_rab_time": n4096.get("rabt_fwdbwd_graph_tflops"),
        "rab_time_cost_ratio": ratio(n4096.get("rabt_fwdbwd_graph_ms"), n4096.get("ours_fwdbwd_graph_ms")),
        "rab_diag_off_cost_ratio": ratio(n4096.get("rab_diag_off_fwdbwd_graph_ms"), n4096.get("ours_fwdbwd_graph_ms")),
        "dense_rab_over_tables_n4096": ratio(n4096.get("dense_rab_fwdbwd_eager_ms"), n4096.get("rab_fwdbwd_graph_ms")),
        "small_fwdbwd_us_rab_time": None if "rabt_fwdbwd_graph_ms" not in n200 else n200["rabt_fwdbwd_graph_ms"] * 1e3,
        "small_fwdbwd_us_dense_rab": (None if "dense_rab_fwdbwd_eager_ms" not in n200
                                      else n200["dense_rab_fwdbwd_eager_ms"] * 1e3),
        "max_rel_err_rab": max((v for r in rows for key, v in r.items()
                                if key.startswith(("rab_", "rabt_")) and key.endswith("_rel_err")), default=None),
        "configs": [list(c) for c in CONFIGS if wanted is None or c[1] in wanted],
        "tune_top": args.tune_top,
    }
    summary.update(cuda_summary(rows, small))
    rows.append({"tuned_configs": {"/".join(map(str, k)): list(v) for k, v in _tuned.items()},
                 "skipped_configs": {"/".join(map(str, k[0])) + " " + str(tuple(k[1])): why
                                     for k, why in _tune_failures.items()}})
    print_table(rows[:-1], columns)
    if any("cuda_fwd_graph_tflops" in r for r in rows[:-1]):
        print_table(rows[:-1], ["B", "N", "H", "D", "ours_fwd_graph_tflops", "cuda_fwd_graph_tflops",
                                "ours_fwdbwd_graph_tflops", "cuda_fwdbwd_graph_tflops", "cuda_rab_fwd_graph_tflops",
                                "cuda_rab_fwdbwd_graph_tflops", "cuda_out_rel_err", "cuda_dq_rel_err",
                                "cuda_dk_rel_err", "cuda_dv_rel_err", "cuda_rab_dpos_rel_err"])
    bias_rows = [r for r in rows[:-1] if "rab_fwdbwd_graph_ms" in r]
    print_table(bias_rows, ["B", "N", "H", "D", "ours_fwdbwd_graph_ms", "rab_fwdbwd_graph_ms", "rabt_fwdbwd_graph_ms",
                            "rab_diag_off_fwdbwd_graph_ms", "dense_rab_fwdbwd_eager_ms", "rab_fwd_graph_tflops",
                            "rab_fwdbwd_graph_tflops", "rab_dpos_rel_err", "rabt_dtime_rel_err"])
    record = write_report("hstu_attention", rows, summary, args.json, targets={**TARGETS, **CUDA_TARGETS})
    if args.plot:
        try:
            plot(record, args.plot)
        except ImportError as exc:
            print(f"plot skipped: {exc} (redraw later with --plot-only)", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
