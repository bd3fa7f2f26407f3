"""hstu_attention as a custom op: reference equality, gradcheck, compile/export, backends, errors."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from gauss_plugins.components import Component
from gauss_plugins.hstu.attention import (
    hstu_attention,
    hstu_attention_reference,
    hstu_attention_reference_backward,
    relative_bias_dense,
)
from gauss_plugins.plugins import hookimpl

_spec = importlib.util.spec_from_file_location("hstu_cases", pathlib.Path(__file__).with_name("hstu_cases.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
MODES, make_inputs = _cases.MODES, _cases.make_inputs
TABLE_MODES, make_tables = _cases.TABLE_MODES, _cases.make_tables


@pytest.mark.parametrize("mode", list(MODES))
def test_op_equals_reference_and_gradchecks(mode):
    q, k, v, offsets, _, options = make_inputs(5, MODES[mode], dtype=torch.float64, lengths=(3, 0, 4, 2),
                                               heads=2, d_qk=2, d_v=2, max_seq_len=5)
    rab = options.pop("rab")
    tensors = [q, k, v] + ([rab] if rab is not None else [])
    for t in tensors:
        t.requires_grad_(True)

    def op(q, k, v, rab=None):
        return hstu_attention(q, k, v, offsets, rab=rab, backend="torch", **options)

    torch.testing.assert_close(op(*tensors), hstu_attention_reference(q, k, v, offsets, rab=rab, **options))
    assert torch.autograd.gradcheck(op, tuple(tensors), eps=1e-6, atol=1e-6)


def test_rab_without_grad_gets_none_and_q_grad_still_flows():
    q, k, v, offsets, _, options = make_inputs(6, MODES["rab full"], dtype=torch.float64)
    q.requires_grad_(True)
    out = hstu_attention(q, k, v, offsets, **options)
    (gq,) = torch.autograd.grad(out.sum(), [q])
    assert gq.shape == q.shape and gq.abs().sum() > 0


def test_opcheck():
    q, k, v, offsets, _, options = make_inputs(7, MODES["everything"], dtype=torch.float32)
    rab = torch.randn(1, 2, 7, 7, requires_grad=True)
    for t in (q, k, v):
        t.requires_grad_(True)
    args = (q, k, v, offsets, options["num_targets"], rab, None, None, None, 7, 0.7, True, 1, 3, 0.301,
            "max_seq_len", "auto", True)
    torch.library.opcheck(torch.ops.gauss.hstu_attention_fwd.default, args)
    args = (q, k, v, offsets, None, None, None, None, None, 7, 0.7, False, 0, 0, 0.301, "seq_len", "auto", True)
    torch.library.opcheck(torch.ops.gauss.hstu_attention_fwd.default, args)


def _attention(q, k, v, offsets, num_targets, rab):
    return hstu_attention(q, k, v, offsets, max_seq_len=7, alpha=0.5, num_targets=num_targets, rab=rab,
                          contextual_len=1, max_attn_len=4)


def test_torch_compile_traces_forward_and_backward():
    q, k, v, offsets, _, options = make_inputs(8, MODES["everything"])
    rab = torch.randn(5, 1, 7, 7)
    leaves = [t.requires_grad_(True) for t in (q, k, v, rab)]
    compiled = torch.compile(_attention, backend="aot_eager", fullgraph=True)
    out_c = compiled(q, k, v, offsets, options["num_targets"], rab)
    grads_c = torch.autograd.grad(out_c.square().sum(), leaves)
    out_e = _attention(q, k, v, offsets, options["num_targets"], rab)
    grads_e = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_export_keeps_one_op_node():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, offsets, num_targets, rab):
            return _attention(q, k, v, offsets, num_targets, rab)

    q, k, v, offsets, _, options = make_inputs(9, MODES["everything"])
    rab = torch.randn(5, 1, 7, 7)
    args = (q, k, v, offsets, options["num_targets"], rab)
    rows, batch = torch.export.Dim("rows", min=1, max=1 << 20), torch.export.Dim("batch", min=1, max=4096)
    dynamic = ({0: rows}, {0: rows}, {0: rows}, {0: batch + 1}, {0: batch}, {0: batch})
    exported = torch.export.export(Attention(), args, dynamic_shapes=dynamic)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "gauss.hstu_attention_fwd.default" in targets
    torch.testing.assert_close(exported.module()(*args), _attention(*args))
    # another batch, other sizes: the exported program computes, it did not bake in the output
    other = make_inputs(10, MODES["everything"], lengths=(7, 2, 0))
    args2 = (*other[:4], other[5]["num_targets"], torch.randn(3, 1, 7, 7))
    torch.testing.assert_close(exported.module()(*args2), _attention(*args2))


# ---------------------------------------------------------------------------- backends
class RecordingBackend:
    """A backend object with its own backward: the reference, doubled, so dispatch shows."""

    def __init__(self):
        self.calls = []

    def forward(self, q, k, v, offsets, **options):
        self.calls.append(("forward", options))
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        return 2 * hstu_attention_reference(q, k, v, offsets, **options)

    def backward(self, grad_out, q, k, v, offsets, *, compute_drab, **options):
        self.calls.append(("backward", compute_drab))
        assert grad_out.is_contiguous()
        from gauss_plugins.hstu.attention import hstu_attention_reference_backward

        return hstu_attention_reference_backward(2 * grad_out, q, k, v, offsets, compute_drab=compute_drab,
                                                 **options)


def forward_only(q, k, v, offsets, **options):
    return 3 * hstu_attention_reference(q, k, v, offsets, **options)


def wrong_shape(q, k, v, offsets, **options):
    return q.new_zeros(q.shape[0], q.shape[1], v.shape[2] + 1)


@pytest.fixture
def test_backends(monkeypatch, fresh_registry):
    recording = RecordingBackend()
    plugin = types.ModuleType("hstu_test_backends_plugin")

    @hookimpl
    def gauss_register_attention_backends():
        return [
            Component(kind="attention_backend", name="recording", factory=lambda: recording, priority=1000,
                      supports=lambda q, k, v: q.dtype == torch.float64),
            Component(kind="attention_backend", name="forward_only", factory=lambda: forward_only, priority=-1),
            Component(kind="attention_backend", name="wrong_shape", factory=lambda: wrong_shape, priority=-1),
        ]

    plugin.gauss_register_attention_backends = gauss_register_attention_backends
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    monkeypatch.setattr(fresh_registry, "DEFAULT_PLUGINS", fresh_registry.DEFAULT_PLUGINS + (plugin.__name__,))
    fresh_registry.reset()
    return recording


def test_auto_picks_highest_priority_supporting_backend(test_backends):
    q, k, v, offsets, _, options = make_inputs(10, MODES["rab full"], dtype=torch.float64)
    rab = options.pop("rab").requires_grad_(True)
    q.requires_grad_(True)
    out = hstu_attention(q, k, v, offsets, rab=rab, **options)
    torch.testing.assert_close(out, 2 * hstu_attention_reference(q, k, v, offsets, rab=rab, **options))
    dq, drab = torch.autograd.grad(out.sum(), [q, rab])
    assert [c[0] for c in test_backends.calls] == ["forward", "backward"]
    assert test_backends.calls[1][1] is True  # rab needed a gradient
    ref = hstu_attention_reference(q, k, v, offsets, rab=rab, **options)
    rq, rrab = torch.autograd.grad(2 * ref.sum(), [q, rab])
    torch.testing.assert_close(dq, rq)
    torch.testing.assert_close(drab, rrab)
    # float32 is not supported by "recording": auto falls back to the torch backend
    out32 = hstu_attention(q.float(), k.float(), v.float(), offsets, rab=rab.float(), **options)
    torch.testing.assert_close(out32, ref.float())


def test_backend_without_drab_request(test_backends):
    q, k, v, offsets, _, options = make_inputs(11, MODES["rab full"], dtype=torch.float64)
    q.requires_grad_(True)
    out = hstu_attention(q, k, v, offsets, backend="recording", **options)
    out.sum().backward()
    assert test_backends.calls[-1] == ("backward", False)


def test_forward_only_backend_gets_reference_backward(test_backends):
    q, k, v, offsets, _, options = make_inputs(12, MODES["targets"], dtype=torch.float64)
    v.requires_grad_(True)
    out = hstu_attention(q, k, v, offsets, backend="forward_only", **options)
    torch.testing.assert_close(out, 3 * hstu_attention_reference(q, k, v, offsets, **options))
    (dv,) = torch.autograd.grad(out.sum(), [v])
    (want,) = torch.autograd.grad(hstu_attention_reference(q, k, v, offsets, **options).sum(), [v])
    torch.testing.assert_close(dv, want)  # the gradient of the reference, not of 3x


def test_backend_errors(test_backends):
    q, k, v, offsets, _, options = make_inputs(13, MODES["causal"])
    with pytest.raises(RuntimeError, match="wrong_shape.*returned"):
        hstu_attention(q, k, v, offsets, backend="wrong_shape", **options)
    with pytest.raises(KeyError, match="no attention_backend named 'nope'"):
        hstu_attention(q, k, v, offsets, backend="nope", **options)
    with pytest.raises(ValueError, match="does not support"):
        hstu_attention(q, k, v, offsets, backend="recording", **options)  # float32


def test_registry_lists_torch_backend(fresh_registry):
    names = fresh_registry.get_registry().names("attention_backend")
    assert "torch" in names


# ---------------------------------------------------------------------------- bad input
def _good():
    q, k, v, offsets, _, options = make_inputs(14, MODES["targets"])
    return dict(q=q, k=k, v=v, offsets=offsets, **options)


def _call(**kw):
    args = _good()
    args.update(kw)
    q, k, v, offsets = (args.pop(n) for n in ("q", "k", "v", "offsets"))
    return hstu_attention(q, k, v, offsets, **args)


@pytest.mark.parametrize("change, error, match", [
    (lambda g: dict(k=g["k"][:, :1]), ValueError, "agree on \\[T, H\\]"),
    (lambda g: dict(v=g["v"][:-1]), ValueError, "agree on \\[T, H\\]"),
    (lambda g: dict(k=torch.randn(g["k"].shape[0], 2, 5)), ValueError, "same head dim"),
    (lambda g: dict(q=g["q"][0]), ValueError, "shape \\[T, H, d\\]"),
    (lambda g: dict(q=g["q"].double()), TypeError, "share one dtype"),
    (lambda g: dict(q=g["q"].int(), k=g["k"].int(), v=g["v"].int()), TypeError, "float16, bfloat16"),
    (lambda g: dict(offsets=g["offsets"].int()), TypeError, "int64"),
    (lambda g: dict(offsets=g["offsets"][:, None]), ValueError, "1-D"),
    (lambda g: dict(offsets=g["offsets"].flip(0)), ValueError, "offsets"),
    (lambda g: dict(offsets=torch.tensor([0, 4, 3, 10, 11, 16])), ValueError, "non-decreasing"),
    (lambda g: dict(offsets=torch.tensor([1, 4, 4, 10, 11, 16])), ValueError, "offsets\\[0\\]"),
    (lambda g: dict(offsets=torch.tensor([0, 4, 4, 10, 11, 15])), ValueError, "number of rows"),
    (lambda g: dict(max_seq_len=5), ValueError, "more than max_seq_len=5"),
    (lambda g: dict(max_seq_len=0), ValueError, "positive int"),
    (lambda g: dict(num_targets=torch.tensor([1.0, 0, 0, 0, 0])), TypeError, "integer"),
    (lambda g: dict(num_targets=torch.tensor([1, 0])), ValueError, "shape \\(5,\\)"),
    (lambda g: dict(num_targets=torch.tensor([5, 0, 0, 0, 0])), ValueError, "num_targets\\[0\\]=5"),
    (lambda g: dict(num_targets=torch.tensor([-1, 0, 0, 0, 0])), ValueError, "num_targets\\[0\\]=-1"),
    (lambda g: dict(rab=torch.randn(5, 2, 6, 6)), ValueError, "rab must have shape"),
    (lambda g: dict(rab=torch.randn(3, 2, 7, 7)), ValueError, "rab must have shape"),
    (lambda g: dict(rab=torch.randn(2, 7, 7)), ValueError, "rab must have shape"),
    (lambda g: dict(normalizer="softmax"), ValueError, "normalizer"),
    (lambda g: dict(contextual_len=-1), ValueError, "contextual_len"),
    (lambda g: dict(max_attn_len=1.5), ValueError, "max_attn_len"),
    (lambda g: dict(alpha=float("nan")), ValueError, "alpha"),
    (lambda g: dict(backend=""), ValueError, "backend"),
])
def test_bad_input_raises_clearly(change, error, match):
    with pytest.raises(error, match=match):
        _call(**change(_good()))


def test_validate_false_skips_data_checks_only():
    good = _good()
    bad_targets = torch.tensor([5, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        _call(num_targets=bad_targets)
    # data checks off: the same call goes through (what GPU callers get by default)
    _call(num_targets=torch.tensor([1, 0, 0, 0, 0]), validate=False)
    with pytest.raises(TypeError):  # layout checks stay on
        _call(offsets=good["offsets"].int(), validate=False)


@pytest.mark.parametrize("offsets", [torch.tensor([0, 0, 0]), torch.tensor([0])], ids=["empty sequences", "no sequences"])
def test_empty_batches(offsets):
    q = torch.zeros(0, 2, 3, requires_grad=True)
    v = torch.zeros(0, 2, 4)
    out = hstu_attention(q, q, v, offsets, max_seq_len=4, alpha=1.0, normalizer="seq_len")
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 3)


@pytest.mark.parametrize("offsets", [torch.tensor([0, 0, 0]), torch.tensor([0])], ids=["empty sequences", "no sequences"])
@pytest.mark.parametrize("targets", [False, True], ids=["positions", "targets"])
def test_empty_batches_with_tables(offsets, targets):
    q = torch.zeros(0, 2, 3, requires_grad=True)
    v = torch.zeros(0, 2, 4)
    pos, time = torch.randn(7, requires_grad=True), torch.randn(5, requires_grad=True)
    nt = torch.zeros(offsets.shape[0] - 1, dtype=torch.int64) if targets else None
    out = hstu_attention(q, q, v, offsets, max_seq_len=4, num_targets=nt, position_bias=pos, time_bias=time,
                         timestamps=torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert torch.equal(pos.grad, torch.zeros(7)) and torch.equal(time.grad, torch.zeros(5))


@pytest.mark.parametrize("mode", ["everything", "rab shared by heads", "seq_len normaliser", "not causal"])
def test_custom_op_autograd_gradchecks(mode):
    """The op's registered autograd (what compile/export use), called directly in eager."""
    q, k, v, offsets, _, options = make_inputs(15, MODES[mode], dtype=torch.float64, lengths=(3, 0, 4),
                                               heads=2, d_qk=2, d_v=2, max_seq_len=5)
    rab = options.pop("rab")
    tensors = [q, k, v] + ([rab] if rab is not None else [])
    for t in tensors:
        t.requires_grad_(True)
    nt = options["num_targets"]
    schema_args = (options["max_seq_len"], options["alpha"], options["causal"], options["contextual_len"],
                   options["max_attn_len"], 0.301, options["normalizer"], "torch", True)

    def op(q, k, v, rab=None):
        return torch.ops.gauss.hstu_attention_fwd(q, k, v, offsets, nt, rab, None, None, None, *schema_args)

    torch.testing.assert_close(op(*tensors), hstu_attention(q, k, v, offsets, rab=rab, **options))
    assert torch.autograd.gradcheck(op, tuple(tensors), eps=1e-6, atol=1e-6)


def test_tracing_modes_use_the_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v, offsets, _, options = make_inputs(16, MODES["targets"])
    traced = make_fx(lambda q, k, v: hstu_attention(q, k, v, offsets, **options))(q, k, v)
    targets = [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    assert "gauss.hstu_attention_fwd.default" in targets


# ---------------------------------------------------------------------------- relative bias tables
def _table_inputs(seed, name, dtype=torch.float64, **shape):
    mode, position, buckets = TABLE_MODES[name]
    q, k, v, offsets, lengths, options = make_inputs(seed, MODES[mode], dtype=dtype, **shape)
    tables = make_tables(seed, offsets, options["max_seq_len"], position, buckets, dtype=dtype)
    return q, k, v, offsets, lengths, options, tables


def _naive_bias(lengths, max_seq_len, num_targets, contextual_len, position_bias, time_bias, timestamps, scale):
    """The bias by the docstring's formula, one pair at a time."""
    import math

    out = torch.zeros(len(lengths), max_seq_len, max_seq_len, dtype=torch.float64)
    start = 0
    for b, n in enumerate(lengths):
        nt = 0 if num_targets is None else int(num_targets[b])
        last = n - nt - (contextual_len - 1 if contextual_len > 0 else 0)

        def pid(p):
            i = max(p - contextual_len + 1, 0) if contextual_len > 0 else p
            return min(i, last) if num_targets is not None else i

        for i in range(n):
            t_next = timestamps[start + i + 1] if (timestamps is not None and i + 1 < n - nt) else None
            for j in range(n):
                value = 0.0
                if position_bias is not None:
                    size = position_bias.shape[0]
                    half = (size + 1) // 2
                    value += float(position_bias[min(max(pid(j) - pid(i) + half - 1, 0), size - 2)])
                if time_bias is not None:
                    tq = int(timestamps[start + i]) if t_next is None else int(t_next)
                    gap = max(abs(tq - int(timestamps[start + j])), 1)
                    bucket = math.floor(math.log(gap) / scale)
                    value += float(time_bias[min(max(bucket, 0), time_bias.shape[0] - 1)])
                out[b, i, j] = value
        start += n
    return out


@pytest.mark.parametrize("name", list(TABLE_MODES))
def test_relative_bias_dense_follows_the_formula(name):
    q, k, v, offsets, lengths, options, tables = _table_inputs(20, name)
    got = relative_bias_dense(offsets, options["max_seq_len"], num_targets=options["num_targets"],
                              contextual_len=options["contextual_len"], **tables)
    want = _naive_bias(lengths, options["max_seq_len"], options["num_targets"], options["contextual_len"],
                       tables["position_bias"], tables["time_bias"], tables["timestamps"], 0.301)
    torch.testing.assert_close(got, want)


def test_candidates_bias_ignores_their_slot_and_each_other():
    """M-FALCON: a candidate's bias row is the same wherever it sits among the targets."""
    offsets = torch.tensor([0, 8])
    position_bias = torch.randn(2 * 8 - 1, dtype=torch.float64)
    time_bias = torch.randn(20, dtype=torch.float64)
    history = torch.tensor([100, 160, 400, 9000, 9100])
    candidates = torch.tensor([20000, 9150, 500000])
    nt = torch.tensor([3])

    def bias(order):
        ts = torch.cat([history, candidates[order]])
        return relative_bias_dense(offsets, 8, position_bias=position_bias, time_bias=time_bias, timestamps=ts,
                                   num_targets=nt)[0]

    a, b = bias(torch.tensor([0, 1, 2])), bias(torch.tensor([2, 0, 1]))
    for slot_a, slot_b in ((5, 6), (6, 7), (7, 5)):  # candidate 0, 1, 2
        torch.testing.assert_close(a[slot_a, :5], b[slot_b, :5])  # its row over the history
        torch.testing.assert_close(a[slot_a, slot_a], b[slot_b, slot_b])  # and itself
        torch.testing.assert_close(a[:5, :5], b[:5, :5])


@pytest.mark.parametrize("name", list(TABLE_MODES))
def test_tables_equal_their_dense_expansion_as_rab(name):
    """The op with tables == the op with relative_bias_dense(...) passed as rab, outputs and
    gradients; the tables' gradients are the dense bias gradient summed by index."""
    q, k, v, offsets, _, options, tables = _table_inputs(21, name)
    rab = options.pop("rab")
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    table_leaves = [tables[n].requires_grad_(True) for n in ("position_bias", "time_bias") if tables[n] is not None]
    extra = [] if rab is None else [rab.requires_grad_(True)]
    out = hstu_attention(q, k, v, offsets, rab=rab, backend="torch", **tables, **options)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves + extra + table_leaves, grad_out)

    dense = relative_bias_dense(offsets, options["max_seq_len"], num_targets=options["num_targets"],
                                contextual_len=options["contextual_len"], **tables).unsqueeze(1)
    total_rab = dense if rab is None else dense + rab
    out_dense = hstu_attention(q, k, v, offsets, rab=total_rab, backend="torch", **options)
    want = torch.autograd.grad(out_dense, leaves + extra + table_leaves, grad_out)
    torch.testing.assert_close(out, out_dense)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for table in table_leaves:
        assert table.grad is None  # autograd.grad, nothing accumulated


@pytest.mark.parametrize("name", ["position+time, everything", "position+time + rab", "time",
                                  "position+time, not causal + targets + window"])
def test_tables_gradcheck(name):
    q, k, v, offsets, _, options, tables = _table_inputs(22, name, lengths=(3, 0, 4, 2), heads=2, d_qk=2, d_v=2,
                                                         max_seq_len=5)
    rab = options.pop("rab")
    names = [n for n in ("position_bias", "time_bias") if tables[n] is not None]
    inputs = [q, k, v] + [tables[n] for n in names] + ([rab] if rab is not None else [])
    for t in inputs:
        t.requires_grad_(True)
    timestamps = tables["timestamps"]

    def op(q, k, v, *rest):
        named = dict(zip(names, rest))
        r = rest[len(names)] if rab is not None else None
        return hstu_attention(q, k, v, offsets, rab=r, timestamps=timestamps, backend="torch", **named, **options)

    assert torch.autograd.gradcheck(op, tuple(inputs), eps=1e-6, atol=1e-6)

    # and the op's registered autograd (what compile/export run)
    schema = (options["max_seq_len"], options["alpha"], options["causal"], options["contextual_len"],
              options["max_attn_len"], 0.301, options["normalizer"], "torch", True)

    def custom_op(q, k, v, *rest):
        named = dict(zip(names, rest))
        r = rest[len(names)] if rab is not None else None
        return torch.ops.gauss.hstu_attention_fwd(q, k, v, offsets, options["num_targets"], r,
                                                  named.get("position_bias"), named.get("time_bias"), timestamps,
                                                  *schema)

    assert torch.autograd.gradcheck(custom_op, tuple(inputs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tables_in_low_precision_follow_fp64(dtype):
    q, k, v, offsets, _, options, tables = _table_inputs(23, "position+time, everything", dtype=dtype)
    options.pop("rab")
    leaves = [t.requires_grad_(True) for t in (q, k, v, tables["position_bias"], tables["time_bias"])]
    out = hstu_attention(*leaves[:3], offsets, position_bias=leaves[3], time_bias=leaves[4],
                         timestamps=tables["timestamps"], **options)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    wide = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = hstu_attention_reference(*wide[:3], offsets, position_bias=wide[3], time_bias=wide[4],
                                   timestamps=tables["timestamps"], **options)
    want = torch.autograd.grad(ref.square().sum(), wide)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    for g, w in zip(grads, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, **tol)


def test_only_the_tables_require_grad():
    q, k, v, offsets, _, options, tables = _table_inputs(24, "position+time, targets")
    tables["time_bias"].requires_grad_(True)
    out = hstu_attention(q, k, v, offsets, **tables, **options)
    (dtime,) = torch.autograd.grad(out.sum(), [tables["time_bias"]])
    assert dtime.shape == tables["time_bias"].shape and dtime.abs().sum() > 0


def test_reference_backward_reduces_by_index():
    """The written backward's table gradients equal autograd through the dense gather."""
    q, k, v, offsets, _, options, tables = _table_inputs(25, "position+time, everything")
    options.pop("rab")
    pos, time = (tables[n].requires_grad_(True) for n in ("position_bias", "time_bias"))
    out = hstu_attention_reference(q, k, v, offsets, position_bias=pos, time_bias=time,
                                   timestamps=tables["timestamps"], **options)
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(out, [pos, time], grad_out)
    got = hstu_attention_reference_backward(grad_out, q, k, v, offsets, position_bias=pos.detach(),
                                            time_bias=time.detach(), timestamps=tables["timestamps"], **options)
    torch.testing.assert_close(got[4], want[0])
    torch.testing.assert_close(got[5], want[1])
    skipped = hstu_attention_reference_backward(grad_out, q, k, v, offsets, position_bias=pos.detach(),
                                                time_bias=time.detach(), timestamps=tables["timestamps"],
                                                compute_dposition_bias=False, compute_dtime_bias=False, **options)
    assert skipped[4] is None and skipped[5] is None


def _table_attention(q, k, v, offsets, num_targets, position_bias, time_bias, timestamps):
    return hstu_attention(q, k, v, offsets, max_seq_len=7, alpha=0.5, num_targets=num_targets, contextual_len=1,
                          max_attn_len=4, position_bias=position_bias, time_bias=time_bias, timestamps=timestamps)


def test_torch_compile_traces_tables():
    q, k, v, offsets, _, options, tables = _table_inputs(26, "position+time, everything", dtype=torch.float32)
    pos, time = tables["position_bias"], tables["time_bias"]
    leaves = [t.requires_grad_(True) for t in (q, k, v, pos, time)]
    args = (q, k, v, offsets, options["num_targets"], pos, time, tables["timestamps"])
    compiled = torch.compile(_table_attention, backend="aot_eager", fullgraph=True)
    out_c = compiled(*args)
    grads_c = torch.autograd.grad(out_c.square().sum(), leaves)
    out_e = _table_attention(*args)
    grads_e = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_export_with_tables():
    class Attention(torch.nn.Module):
        def __init__(self, pos, time):
            super().__init__()
            self.pos, self.time = torch.nn.Parameter(pos), torch.nn.Parameter(time)

        def forward(self, q, k, v, offsets, num_targets, timestamps):
            return _table_attention(q, k, v, offsets, num_targets, self.pos, self.time, timestamps)

    q, k, v, offsets, _, options, tables = _table_inputs(27, "position+time, everything", dtype=torch.float32)
    model = Attention(tables["position_bias"], tables["time_bias"])
    args = (q, k, v, offsets, options["num_targets"], tables["timestamps"])
    rows, batch = torch.export.Dim("rows", min=1, max=1 << 20), torch.export.Dim("batch", min=1, max=4096)
    dynamic = ({0: rows}, {0: rows}, {0: rows}, {0: batch + 1}, {0: batch}, {0: rows})
    exported = torch.export.export(model, args, dynamic_shapes=dynamic)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "gauss.hstu_attention_fwd.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*args), model(*args))
        other = _table_inputs(28, "position+time, everything", dtype=torch.float32, lengths=(7, 2, 0))
        args2 = (*other[:4], other[5]["num_targets"], other[6]["timestamps"])
        torch.testing.assert_close(exported.module()(*args2), model(*args2))


def _table_call(change):
    q, k, v, offsets, _, options, tables = _table_inputs(29, "position+time, targets", dtype=torch.float32)
    args = dict(q=q, k=k, v=v, offsets=offsets, **options, **tables)
    args.update(change(args))
    return args


@pytest.mark.parametrize("change, error, match", [
    (lambda a: dict(position_bias=a["position_bias"][:-4]), ValueError, "odd length 2L - 1"),
    (lambda a: dict(position_bias=torch.zeros(12)), ValueError, "odd length"),
    (lambda a: dict(position_bias=a["position_bias"].view(1, -1)), ValueError, "1-D table"),
    (lambda a: dict(position_bias=a["position_bias"].long()), TypeError, "position_bias must be a floating"),
    (lambda a: dict(position_bias=[0.0] * 17), TypeError, "position_bias must be a 1-D float tensor"),
    (lambda a: dict(time_bias=a["time_bias"].view(1, -1)), ValueError, "time_bias must be a 1-D"),
    (lambda a: dict(time_bias=torch.zeros(0)), ValueError, "time_bias must be a 1-D"),
    (lambda a: dict(timestamps=None), ValueError, "time_bias needs timestamps"),
    (lambda a: dict(time_bias=None), ValueError, "timestamps were given without time_bias"),
    (lambda a: dict(timestamps=a["timestamps"].double()), TypeError, "timestamps must be an integer"),
    (lambda a: dict(timestamps=a["timestamps"][:-1]), ValueError, "timestamps must have shape"),
    (lambda a: dict(time_bucket_scale=0.0), ValueError, "time_bucket_scale"),
    (lambda a: dict(time_bucket_scale=float("inf")), ValueError, "time_bucket_scale"),
    (lambda a: dict(time_bucket_scale=True), ValueError, "time_bucket_scale"),
])
def test_bad_tables_raise_clearly_and_change_nothing(change, error, match):
    args = _table_call(change)
    for name in ("position_bias", "time_bias"):
        if isinstance(args[name], torch.Tensor) and args[name].is_floating_point():
            args[name].requires_grad_(True)
    before = {n: t.detach().clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    q, k, v, offsets = (args.pop(n) for n in ("q", "k", "v", "offsets"))
    with pytest.raises(error, match=match):
        hstu_attention(q, k, v, offsets, **args)
    after = dict(q=q, k=k, v=v, offsets=offsets, **args)
    for name, value in before.items():
        assert torch.equal(after[name].detach(), value), f"{name} changed"
        assert after[name].grad is None


def test_opcheck_with_tables():
    q, k, v, offsets, _, options, tables = _table_inputs(30, "position+time, everything", dtype=torch.float32)
    for t in (q, k, v, tables["position_bias"], tables["time_bias"]):
        t.requires_grad_(True)
    args = (q, k, v, offsets, options["num_targets"], None, tables["position_bias"], tables["time_bias"],
            tables["timestamps"], 7, 0.7, True, 1, 3, 0.301, "max_seq_len", "torch", True)
    torch.library.opcheck(torch.ops.gauss.hstu_attention_fwd.default, args)


def test_relative_bias_dense_errors():
    offsets = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="needs position_bias, time_bias or both"):
        relative_bias_dense(offsets, 3)
    with pytest.raises(ValueError, match="odd length"):
        relative_bias_dense(offsets, 3, position_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="time_bias needs timestamps"):
        relative_bias_dense(offsets, 3, time_bias=torch.zeros(4))
