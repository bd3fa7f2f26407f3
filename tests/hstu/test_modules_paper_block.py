"""HSTU as the paper's research code builds it (``layer_norm_affine=False``, no final norm):
the block equals the research block's formula, and no LayerNorm parameter exists."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gauss_plugins.hstu.modules import HSTUBlock, HSTUConfig, HSTUEncoder


def paper_config(**kw):
    base = dict(dim=10, num_blocks=2, num_heads=1, max_seq_len=6, dropout=0.0, num_time_buckets=0,
                layer_norm_affine=False, output_norm=False)
    base.update(kw)
    return HSTUConfig(**base)


def test_block_equals_the_research_formula():
    """``SequentialTransductionUnitJagged`` (rel_bias normalisation, uvqk SiLU), written out for
    one sequence: u, v, q, k = silu(layer_norm(x) @ W); A = silu(q k^T + rab) / N, causal;
    out = o(u * layer_norm(A v)) + x, both norms without weights."""
    torch.manual_seed(0)
    block = HSTUBlock(paper_config(num_blocks=1)).double()
    n, dim, big_n = 4, 10, 6
    x = torch.randn(n, dim, dtype=torch.float64)
    h = F.layer_norm(x, (dim,), eps=1e-6)
    u, v, q, k = torch.split(F.silu(h @ block.uvqk.weight.T), [10, 10, 10, 10], dim=-1)
    w = block.relative_bias.position_weight
    rab = torch.stack([torch.stack([w[j - i + big_n - 1] for j in range(n)]) for i in range(n)])
    attn = F.silu(q @ k.T + rab) / big_n * torch.ones(n, n, dtype=torch.bool).tril()
    want = block.output(u * F.layer_norm(attn @ v, (dim,), eps=1e-6)) + x
    torch.testing.assert_close(block(x, torch.tensor([0, n])), want)


def test_no_layer_norm_parameters_and_no_final_norm():
    encoder = HSTUEncoder(paper_config())
    names = {name.split(".", 2)[-1] for name, _ in encoder.named_parameters()}
    assert names == {"uvqk.weight", "output.weight", "output.bias", "relative_bias.position_weight"}
    assert encoder.output_norm is None
    # the default keeps the learned affine of the earlier versions (other configs unchanged)
    affine = HSTUEncoder(paper_config(layer_norm_affine=True, output_norm=True))
    assert affine.blocks[0].input_norm.weight is not None and affine.output_norm.weight is not None


def test_every_parameter_still_learns_without_affine():
    encoder = HSTUEncoder(paper_config())
    x = torch.randn(9, 10, requires_grad=True)
    encoder(x, torch.tensor([0, 4, 9])).square().sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("value", ["no", 0, None])
def test_layer_norm_affine_must_be_a_bool(value):
    with pytest.raises(ValueError, match="layer_norm_affine"):
        paper_config(layer_norm_affine=value)
