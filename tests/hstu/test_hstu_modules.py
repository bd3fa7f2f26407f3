"""HSTUBlock / HSTUEncoder / RelativeAttentionBias / HSTUConfig."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gauss_plugins.hstu.modules as modules
from gauss_plugins.hstu.attention import hstu_attention
from gauss_plugins.hstu.modules import HSTUBlock, HSTUConfig, HSTUEncoder, PaddedHSTUEncoder, RelativeAttentionBias
from gauss_plugins.jagged import lengths_to_offsets, pad


def jagged_batch(lengths, dim, seed=0, dtype=torch.float32, timestamps=True):
    g = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g, dtype=dtype)
    ts = None
    if timestamps:
        # increasing times inside each sequence, gaps from seconds to weeks
        gaps = torch.randint(1, 10**6, (total,), generator=g)
        ts = torch.cat([gaps[s:e].cumsum(0) for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    return x, offsets, ts


def small_config(**kw):
    base = dict(dim=12, num_blocks=2, num_heads=2, max_seq_len=8, dropout=0.0)
    base.update(kw)
    return HSTUConfig(**base)


def time_bucket(gap, scale, num_buckets):
    """The paper code's bucket of one time gap, in plain Python."""
    return min(max(int(math.floor(math.log(max(abs(gap), 1)) / scale)), 0), num_buckets)


def bias_indices_by_loops(bias: RelativeAttentionBias, lengths, timestamps=None, num_targets=None):
    """Which table entry the bias of :class:`RelativeAttentionBias` reads for every (b, i, j),
    written out element by element from its docstring: position ids with the targets sharing
    the first target's id, and the bucket of ``t_next(i) - t_j``. Returns two ``[B, N, N]``
    index maps (0 outside the sequences)."""
    n = bias.max_seq_len
    pos = torch.zeros(len(lengths), n, n, dtype=torch.int64)
    tim = torch.zeros(len(lengths), n, n, dtype=torch.int64)
    start = 0
    for b, length in enumerate(lengths):
        targets = int(num_targets[b]) if num_targets is not None else 0
        first_target = length - targets
        ids = [min(p, first_target) for p in range(length)]
        for i in range(length):
            nxt = i + 1 if i + 1 < first_target else i
            for j in range(length):
                pos[b, i, j] = ids[j] - ids[i] + n - 1
                if timestamps is not None:
                    gap = int(timestamps[start + nxt]) - int(timestamps[start + j])
                    tim[b, i, j] = time_bucket(gap, bias.time_bucket_scale, bias.num_time_buckets)
        start += length
    return pos, tim


def old_dense_position_bias(block: HSTUBlock) -> torch.Tensor:
    """The former formulation: ``position_weight[j - i + L - 1]`` gathered into ``[1, 1, N, N]``
    and passed to the attention as a dense ``rab`` (whose backward scatters into the table)."""
    n = block.config.max_seq_len
    positions = torch.arange(n)
    rel = positions.view(1, -1) - positions.view(-1, 1) + n - 1
    return block.relative_bias.position_weight[rel].view(1, 1, n, n)


# ---------------------------------------------------------------------------- config
def test_config_defaults_follow_the_research_setting():
    c = HSTUConfig(dim=50)
    assert (c.num_heads, c.head_dims) == (1, (50, 50))
    assert c.silu_on == "uvqk" and c.alpha == 1.0 and c.normalizer == "max_seq_len" and c.causal
    assert c.relative_position_bias and c.num_time_buckets == 128 and c.time_bucket_scale == 0.301
    assert HSTUConfig(dim=64, num_heads=4, d_v=8).head_dims == (16, 8)


@pytest.mark.parametrize("kw, match", [
    (dict(dim=0), "dim"),
    (dict(dim=8, num_heads=16), "d_qk"),
    (dict(dim=8, dropout=1.0), "dropout"),
    (dict(dim=8, normalizer="softmax"), "normalizer"),
    (dict(dim=8, silu_on="uvx"), "silu_on"),
    (dict(dim=8, silu_on="uu"), "silu_on"),
    (dict(dim=8, max_attn_len=-1), "max_attn_len"),
    (dict(dim=8, time_bucket_scale=0.0), "time_bucket_scale"),
    (dict(dim=8, time_bucket_scale=float("nan")), "time_bucket_scale"),
    (dict(dim=8, num_time_buckets=-1), "num_time_buckets"),
    (dict(dim=8, num_time_buckets=1.5), "num_time_buckets"),
    (dict(dim=8, relative_position_bias="yes"), "relative_position_bias"),
    (dict(dim=8, num_blocks=True), "num_blocks"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        HSTUConfig(**kw)


def test_bias_knobs_decide_which_tables_exist():
    def tables(**kw):
        bias = HSTUBlock(small_config(**kw)).relative_bias
        return (None if bias.position_weight is None else bias.position_weight.shape[0],
                None if bias.time_weight is None else bias.time_weight.shape[0])

    assert tables() == (15, 129)
    assert tables(relative_position_bias=False) == (None, 129)
    assert tables(num_time_buckets=0) == (15, None)
    assert tables(relative_position_bias=False, num_time_buckets=0) == (None, None)
    assert tables(num_time_buckets=7) == (15, 8)


# ---------------------------------------------------------------------------- the encoder
def test_encoder_shapes_and_every_parameter_learns():
    config = small_config()
    encoder = HSTUEncoder(config)
    x, offsets, ts = jagged_batch([3, 8, 0, 5], 12)
    x.requires_grad_(True)
    out = encoder(x, offsets, ts, num_targets=torch.tensor([1, 2, 0, 1]))
    assert out.shape == x.shape and out.dtype == x.dtype
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_time_bias_needs_timestamps_and_position_only_does_not():
    x, offsets, _ = jagged_batch([4, 6], 12, timestamps=False)
    with pytest.raises(ValueError, match="num_time_buckets=128.*model.num_time_buckets: 0"):
        HSTUEncoder(small_config())(x, offsets)
    encoder = HSTUEncoder(small_config(num_time_buckets=0))
    encoder(x, offsets).sum().backward()
    assert encoder.blocks[0].relative_bias.time_weight is None
    assert encoder.blocks[0].relative_bias.position_weight.grad.abs().sum() > 0
    # timestamps are ignored (not required, not read) without a time bias
    torch.testing.assert_close(encoder(x, offsets, torch.zeros(10, dtype=torch.int64)), encoder(x, offsets))
    with pytest.raises(TypeError, match="integers"):
        HSTUEncoder(small_config())(x, offsets, torch.zeros(10))


def test_block_passes_the_tables_not_a_dense_bias(monkeypatch):
    """The training path hands the 1-D tables (and the jagged times) to the attention op."""
    seen = []
    attention = modules.hstu_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return attention(*args, **kwargs)

    monkeypatch.setattr(modules, "hstu_attention", spy)
    block = HSTUBlock(small_config(num_time_buckets=5, time_bucket_scale=0.5))
    x, offsets, ts = jagged_batch([3, 5], 12)
    block(x, offsets, ts)
    (call,) = seen
    assert call.get("rab") is None
    assert call["position_bias"] is block.relative_bias.position_weight
    assert call["time_bias"] is block.relative_bias.time_weight
    assert call["timestamps"] is ts and call["time_bucket_scale"] == 0.5


def test_block_computation_by_hand():
    """One block against the formula written with plain torch ops, one sequence, one head."""
    torch.manual_seed(0)
    config = small_config(num_heads=1, num_blocks=1, silu_on="uq", alpha=0.3, num_time_buckets=0)
    block = HSTUBlock(config).double()
    n, dim = 5, 12
    x = torch.randn(n, dim, dtype=torch.float64)
    h = F.layer_norm(x, (dim,), block.input_norm.weight, block.input_norm.bias, 1e-6)
    u, v, q, k = torch.split(h @ block.uvqk.weight.T, [12, 12, 12, 12], dim=-1)
    u, q = F.silu(u), F.silu(q)  # silu_on="uq": v and k stay linear
    w = block.relative_bias.position_weight
    rab = torch.stack([torch.stack([w[j - i + 7] for j in range(n)]) for i in range(n)])
    scores = 0.3 * q @ k.T + rab
    p = F.silu(scores) / 8 * torch.ones(n, n, dtype=torch.bool).tril()
    a = F.layer_norm(p @ v, (12,), block.attention_norm.weight, block.attention_norm.bias, 1e-6)
    want = x + (a * u) @ block.output.weight.T + block.output.bias
    got = block(x, torch.tensor([0, n]))
    torch.testing.assert_close(got, want)


def test_time_bias_is_next_time_minus_key_time():
    """Output of a block with position + time tables equals the same block run with the bias
    written out by loops from the docstring (t_next(i) - t_j; targets use their own time and
    share the first target's position id) and passed as a dense rab; gradients too."""
    torch.manual_seed(1)
    block = HSTUBlock(small_config(num_heads=2, num_time_buckets=12, time_bucket_scale=1.5)).double()
    lengths, targets = [5, 8, 1, 6], torch.tensor([0, 3, 1, 2])
    x, offsets, ts = jagged_batch(lengths, 12, seed=5, dtype=torch.float64)
    got = block(x, offsets, ts, targets)
    grads = torch.autograd.grad(got.square().sum(), [block.relative_bias.position_weight,
                                                      block.relative_bias.time_weight])

    # the same bias gathered densely from the tables (differentiable): the reference
    bias = block.relative_bias
    pos, tim = bias_indices_by_loops(bias, lengths, ts, targets)
    assert tim.unique().numel() >= 4  # the gaps spread over several buckets
    dense = (bias.position_weight[pos] + bias.time_weight[tim]).unsqueeze(1)
    u, q, k, v = block.project(x)
    attn = hstu_attention(q, k, v, offsets, num_targets=targets, rab=dense, **block.config.attention_options)
    want = block.combine(x, u, attn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    want_grads = torch.autograd.grad(want.square().sum(), [bias.position_weight, bias.time_weight])
    torch.testing.assert_close(grads[0], want_grads[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], want_grads[1], rtol=1e-9, atol=1e-12)


def test_position_weight_gradient_equals_the_old_dense_formulation():
    """Same loss through the tables and through the former dense ``position_weight[rel]``
    rab: same output, same gradient for ``position_weight`` and every other parameter."""
    torch.manual_seed(2)
    block = HSTUBlock(small_config(num_time_buckets=0))
    x, offsets, _ = jagged_batch([3, 8, 0, 5], 12, seed=6)
    got = block(x, offsets)
    params = [p for _, p in block.named_parameters()]
    new_grads = torch.autograd.grad(got.square().sum(), params)

    u, q, k, v = block.project(x)
    attn = hstu_attention(q, k, v, offsets, rab=old_dense_position_bias(block), **block.config.attention_options)
    old = block.combine(x, u, attn)
    old_grads = torch.autograd.grad(old.square().sum(), params)
    torch.testing.assert_close(got, old, rtol=1e-5, atol=1e-6)
    for (name, _), new_g, old_g in zip(block.named_parameters(), new_grads, old_grads):
        torch.testing.assert_close(new_g, old_g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert new_grads[[n for n, _ in block.named_parameters()].index("relative_bias.position_weight")].abs().sum() > 0


def test_dropout_sits_before_the_output_projection():
    """Training-mode output equals ``x + output(dropout(u * norm(attn)))`` with the same
    random stream (H * d_v != dim, so dropout after the projection would draw differently)."""
    block = HSTUBlock(small_config(num_heads=2, d_v=3, dropout=0.5, num_time_buckets=0)).train()
    x, offsets, _ = jagged_batch([4, 6], 12, seed=7)
    torch.manual_seed(123)
    got = block(x, offsets)
    u, q, k, v = block.project(x)
    attn = block.attend(q, k, v, offsets)
    gated = u * block.attention_norm(attn.reshape(attn.shape[0], -1))
    torch.manual_seed(123)
    want = x + block.output(F.dropout(gated, p=0.5, training=True))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, x + block.output(gated))  # dropout did something
    block.eval()
    torch.testing.assert_close(block(x, offsets), x + block.output(gated))


def test_jagged_batch_equals_sequences_one_by_one():
    encoder = HSTUEncoder(small_config()).eval()
    x, offsets, ts = jagged_batch([3, 8, 0, 5], 12, seed=1)
    out = encoder(x, offsets, ts)
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        alone = encoder(x[s:e], torch.tensor([0, e - s]), ts[s:e])
        torch.testing.assert_close(out[s:e], alone, rtol=1e-5, atol=1e-6)


def test_causal_outputs_ignore_the_future_and_targets_ignore_each_other():
    encoder = HSTUEncoder(small_config(contextual_len=0)).eval()
    x, offsets, ts = jagged_batch([8], 12, seed=2)
    out = encoder(x, offsets, ts)
    x2 = x.clone()
    x2[5:] += 1.0
    out2 = encoder(x2, offsets, ts)
    torch.testing.assert_close(out[:5], out2[:5])
    assert not torch.allclose(out[5:], out2[5:])

    targets = torch.tensor([3])
    out = encoder(x, offsets, ts, targets)
    x3 = x.clone()
    x3[6] += 1.0  # change one target
    t3 = ts.clone()
    t3[7] += 10**6  # and the time of another
    out3 = encoder(x3, offsets, t3, targets)
    torch.testing.assert_close(out[[0, 1, 2, 3, 4, 5]], out3[[0, 1, 2, 3, 4, 5]])
    assert not torch.allclose(out[[6, 7]], out3[[6, 7]])


def test_targets_do_not_depend_on_their_slot():
    """Permuting the targets (rows and times) permutes their outputs: their bias uses the
    shared target position id and their own time."""
    encoder = HSTUEncoder(small_config()).double().eval()
    x, offsets, ts = jagged_batch([8], 12, seed=8, dtype=torch.float64)
    targets = torch.tensor([4])
    out = encoder(x, offsets, ts, targets)
    perm = torch.tensor([0, 1, 2, 3, 6, 4, 7, 5])
    moved = encoder(x[perm], offsets, ts[perm], targets)
    torch.testing.assert_close(moved, out[perm], rtol=1e-12, atol=1e-12)


def test_padded_encoder_matches_jagged_encoder():
    config = small_config()
    padded_encoder = PaddedHSTUEncoder(config).eval()
    x, offsets, ts = jagged_batch([3, 8, 0, 5], 12, seed=3)
    xp, valid = pad(x, offsets, 8)
    tp, _ = pad(ts, offsets, 8)
    out = padded_encoder(xp, valid, tp)
    want, _ = pad(padded_encoder.encoder(x, offsets, ts), offsets, 8)
    torch.testing.assert_close(out, want)
    assert (out[~valid] == 0).all()
    hole = valid.clone()
    hole[1, 2] = False
    with pytest.raises(ValueError, match="prefix"):
        padded_encoder(xp, hole, tp)
    with pytest.raises(ValueError, match="timestamps must be padded"):
        padded_encoder(xp, valid, tp[:, :5])
    with pytest.raises(ValueError, match="no timestamps"):
        padded_encoder(xp, valid)


def test_encoder_input_errors():
    encoder = HSTUEncoder(small_config())
    x, offsets, ts = jagged_batch([3, 4], 12)
    with pytest.raises(ValueError, match="\\[T, 12\\]"):
        encoder(x[:, :5], offsets, ts)
    with pytest.raises(ValueError, match="timestamps"):
        encoder(x, offsets, ts[:3])
    with pytest.raises(TypeError, match="int64"):
        encoder(x, offsets.int(), ts)
    long_x, long_offsets, long_ts = jagged_batch([9], 12)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        encoder(long_x, long_offsets, long_ts)


def test_encoder_compiles():
    encoder = HSTUEncoder(small_config(max_attn_len=3)).eval()
    x, offsets, ts = jagged_batch([3, 8, 5], 12, seed=4)
    compiled = torch.compile(encoder, backend="aot_eager")
    torch.testing.assert_close(compiled(x, offsets, ts), encoder(x, offsets, ts))
