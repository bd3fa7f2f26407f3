"""hstu_attention as a custom op: reference equality, gradcheck, compile/export, backends, errors."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import pytest
import torch

from gauss_plugins.components import Component
from gauss_plugins.hstu.attention import hstu_attention, hstu_attention_reference
from gauss_plugins.plugins import hookimpl

_spec = importlib.util.spec_from_file_location("hstu_cases", pathlib.Path(__file__).with_name("hstu_cases.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
MODES, make_inputs = _cases.MODES, _cases.make_inputs


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
