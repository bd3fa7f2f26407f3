"""HSTUBlock / HSTUEncoder / RelativeAttentionBias / HSTUConfig."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def test_config_defaults_follow_the_research_setting():
    c = HSTUConfig(dim=50)
    assert (c.num_heads, c.head_dims) == (1, (50, 50))
    assert c.silu_on == "uvqk" and c.alpha == 1.0 and c.normalizer == "max_seq_len" and c.causal
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
    (dict(dim=8, num_blocks=True), "num_blocks"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        HSTUConfig(**kw)


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


def test_time_bias_gets_no_gradient_without_timestamps():
    encoder = HSTUEncoder(small_config())
    x, offsets, _ = jagged_batch([4, 6], 12, timestamps=False)
    encoder(x, offsets).sum().backward()
    block = encoder.blocks[0]
    assert block.relative_bias.time_weight.grad is None
    assert block.relative_bias.position_weight.grad.abs().sum() > 0


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


def test_relative_bias_values():
    bias = RelativeAttentionBias(4, num_time_buckets=6, time_bucket_scale=0.301)
    pos = torch.arange(4)
    b = bias.bias(pos, pos)
    assert b.shape == (1, 1, 4, 4)
    for i in range(4):
        for j in range(4):
            assert b[0, 0, i, j] == bias.position_weight[j - i + 3]
    gaps = torch.tensor([0, 1, 2, -2, 100, 10**9])
    want = [0, 0, int(math.log(2) / 0.301), int(math.log(2) / 0.301), 6, 6]  # clamped at 6 buckets
    assert bias.time_buckets(gaps).tolist() == want
    times = torch.tensor([[0, 2, 102]])
    tb = bias.bias(pos[:3], pos[:3], times, times)
    assert tb[0, 0, 2, 0] == bias.position_weight[0 - 2 + 3] + bias.time_weight[6]


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
    out3 = encoder(x3, offsets, ts, targets)
    torch.testing.assert_close(out[[0, 1, 2, 3, 4, 5, 7]], out3[[0, 1, 2, 3, 4, 5, 7]])


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


def test_encoder_input_errors():
    encoder = HSTUEncoder(small_config())
    x, offsets, ts = jagged_batch([3, 4], 12)
    with pytest.raises(ValueError, match="\\[T, 12\\]"):
        encoder(x[:, :5], offsets)
    with pytest.raises(ValueError, match="timestamps"):
        encoder(x, offsets, ts[:3])
    with pytest.raises(TypeError, match="int64"):
        encoder(x, offsets.int())
    long_x, long_offsets, _ = jagged_batch([9], 12)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        encoder(long_x, long_offsets)


def test_encoder_compiles():
    encoder = HSTUEncoder(small_config(max_attn_len=3)).eval()
    x, offsets, ts = jagged_batch([3, 8, 5], 12, seed=4)
    compiled = torch.compile(encoder, backend="aot_eager")
    torch.testing.assert_close(compiled(x, offsets, ts), encoder(x, offsets, ts))
