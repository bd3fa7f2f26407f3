"""The reference against an independent naive loop, and its written-out backward against autograd."""
from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

from gauss_plugins.hstu.attention import hstu_attention_reference, hstu_attention_reference_backward

_spec = importlib.util.spec_from_file_location("hstu_cases", pathlib.Path(__file__).with_name("hstu_cases.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
MODES, make_inputs = _cases.MODES, _cases.make_inputs


def allowed(i: int, j: int, n: int, t: int, c: int, w: int, causal: bool) -> bool:
    """The mask rule for one (query i, key j) pair, stated position by position."""
    if i >= n or j >= n:
        return False
    if i == j:
        return True
    first_target = n - t
    if i >= first_target and j >= first_target:
        return False  # targets never see each other
    if c > 0 and i < c and j < first_target:
        return True  # the contextual prefix sees the whole history

    def coordinate(p: int) -> int:
        # the prefix collapses to coordinate 0, targets to the first target's coordinate
        p = min(p, first_target)
        return max(p - c + 1, 0) if c > 0 else p

    dist = coordinate(i) - coordinate(j)
    if not causal:
        dist = abs(dist)
    return dist > 0 and (w == 0 or dist <= w)


def naive_attention(q, k, v, lengths, *, max_seq_len, alpha, causal, num_targets, contextual_len, max_attn_len,
                    rab, normalizer):
    """One sequence, one head, one (i, j) at a time, in float64."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    start = 0
    for b, n in enumerate(lengths):
        t = int(num_targets[b]) if num_targets is not None else 0
        divisor = max_seq_len if normalizer == "max_seq_len" else n
        for h in range(q.shape[1]):
            for i in range(n):
                acc = torch.zeros(v.shape[2], dtype=torch.float64)
                for j in range(n):
                    if not allowed(i, j, n, t, contextual_len, max_attn_len, causal):
                        continue
                    s = alpha * float(q[start + i, h].double() @ k[start + j, h].double())
                    if rab is not None:
                        s += float(rab[b if rab.shape[0] > 1 else 0, h if rab.shape[1] > 1 else 0, i, j])
                    acc += s / (1 + math.exp(-s)) / divisor * v[start + j, h].double()
                out[start + i, h] = acc
        start += n
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_matches_naive_loop(mode):
    q, k, v, offsets, lengths, options = make_inputs(1, MODES[mode])
    got = hstu_attention_reference(q, k, v, offsets, **options)
    want = naive_attention(q, k, v, lengths, **options)
    assert got.shape == (q.shape[0], q.shape[1], v.shape[2]) and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_written_backward_matches_autograd(mode):
    q, k, v, offsets, _, options = make_inputs(2, MODES[mode], dtype=torch.float64)
    inputs = [q, k, v] + ([options["rab"]] if options["rab"] is not None else [])
    for x in inputs:
        x.requires_grad_(True)
    out = hstu_attention_reference(q, k, v, offsets, **options)
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(out, inputs, grad_out)
    got = hstu_attention_reference_backward(grad_out, q.detach(), k.detach(), v.detach(), offsets,
                                            **{**options, "rab": None if options["rab"] is None else options["rab"].detach()})
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if options["rab"] is None:
        assert got[3] is None


def test_low_precision_inputs_accumulate_in_fp32():
    q, k, v, offsets, lengths, options = make_inputs(3, MODES["everything"], dtype=torch.bfloat16)
    got = hstu_attention_reference(q, k, v, offsets, **options)
    assert got.dtype == torch.bfloat16
    want = naive_attention(q, k, v, lengths, **options)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_neg_inf_bias_at_masked_places_gives_no_nan():
    q, k, v, offsets, _, options = make_inputs(4, MODES["rab full"])
    rab = options["rab"]
    rab[..., 6] = float("-inf")  # column 6 is padding or masked for every row shorter than 7
    out = hstu_attention_reference(q, k, v, offsets, **options)
    assert torch.isfinite(out).all()
