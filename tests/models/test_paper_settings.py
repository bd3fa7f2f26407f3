"""The knobs that bring the ML-1M HSTU to the paper code's settings (issue #9, session 3):
LayerNorm affine, the position-embedding initialisation, the truncated normal, and the
shipped ML-1M configs carrying the paper's values."""
from __future__ import annotations

import math

import pytest
import torch

from gauss_plugins.models import StaticItemEmbeddings, build_model
from gauss_plugins.models.item_embeddings import truncated_normal_
from gauss_plugins.train.config import config_from_dict, load_config


def _config(arch="hstu", max_len=40, **model):
    base = {"arch": arch, "dim": 16, "num_blocks": 1, "num_heads": 1, "attention_dim": 8, "linear_dim": 8,
            "num_time_buckets": 0, "item_embedding": "static"}
    base.update(model)
    return config_from_dict({"data": {"max_len": max_len}, "model": base})


def test_truncated_normal_cuts_at_two_std():
    torch.manual_seed(0)
    x = truncated_normal_(torch.empty(200_000), std=0.02)
    assert x.abs().max() <= 0.04
    # the std of N(0, 1) truncated at +-2 is 0.8796
    assert x.std().item() == pytest.approx(0.02 * 0.8796, rel=0.02)


def test_static_item_rows_start_truncated():
    torch.manual_seed(0)
    emb = StaticItemEmbeddings(num_items=20_000, dim=8)
    assert emb.weight[0].abs().sum() == 0  # padding row
    assert emb.weight[1:].abs().max() <= 0.04 and emb.weight[1:].std().item() < 0.019


def test_position_init_knob_reaches_the_model():
    torch.manual_seed(0)
    xavier = build_model(_config(max_len=400, position_init="xavier_normal"), num_items=30).pos_emb.weight
    assert xavier.std().item() == pytest.approx(math.sqrt(2.0 / (400 + 16)), rel=0.05)
    assert xavier.abs().max() > 2 * math.sqrt(2.0 / 416)  # not truncated
    trunc = build_model(_config(max_len=400, position_init="truncated_normal"), num_items=30).pos_emb.weight
    assert trunc.abs().max() <= 2 * math.sqrt(1.0 / 16)
    assert trunc.std().item() == pytest.approx(0.8796 * math.sqrt(1.0 / 16), rel=0.05)
    plain = build_model(_config(max_len=400), num_items=30).pos_emb.weight  # default: as earlier versions
    assert plain.std().item() == pytest.approx(math.sqrt(1.0 / 16), rel=0.05)
    assert plain.abs().max() > 2 * math.sqrt(1.0 / 16)


def test_layer_norm_affine_knob_reaches_every_block():
    def norm_weights(**kw):
        encoder = build_model(_config(num_blocks=2, **kw), num_items=30).encoder.encoder
        return [b.input_norm.weight is not None for b in encoder.blocks] + \
               [b.attention_norm.weight is not None for b in encoder.blocks]

    assert norm_weights() == [True] * 4
    assert norm_weights(layer_norm_affine=False) == [False] * 4


@pytest.mark.parametrize("model, match", [
    (dict(layer_norm_affine="false"), "layer_norm_affine must be true or false"),
    (dict(position_init="xavier"), "position_init must be one of normal, truncated_normal, xavier_normal"),
])
def test_bad_knobs_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        _config(**model)


def test_model_refuses_an_unknown_position_init():
    from gauss_plugins.models.retrieval import SequentialRetrievalModel

    with pytest.raises(ValueError, match="position_init"):
        SequentialRetrievalModel(StaticItemEmbeddings(5, 4), torch.nn.Identity(), max_len=4, num_items=5,
                                 position_init="uniform")


def test_shipped_ml1m_configs_carry_the_paper_settings():
    pytest.importorskip("yaml", reason="reading YAML needs pyyaml (the lightning extra)")
    small, large = load_config("ml-1m-hstu").model, load_config("ml-1m-hstu-large").model
    # configs/ml-1m/hstu-sampled-softmax-n128-final.gin: dqk = dv = 50; -large-final.gin: 25 x 2 heads
    assert (small.num_blocks, small.num_heads, small.attention_dim, small.linear_dim) == (2, 1, 50, 50)
    assert (large.num_blocks, large.num_heads, large.attention_dim, large.linear_dim) == (8, 2, 25, 25)
    for m in (small, large):
        assert (m.output_norm, m.layer_norm_affine, m.position_init) == (False, False, "xavier_normal")
    # the paper code's SASRec keeps its truncated-normal position embedding
    assert load_config("ml-1m-sasrec").model.position_init == "truncated_normal"
    # other configs keep the earlier behaviour
    other = load_config("ml-100k-hstu").model
    assert (other.layer_norm_affine, other.output_norm, other.position_init) == (True, True, "normal")
