"""The HSTU bias knobs of a config: they reach the encoder, bad values are refused, and a
time bias on data without timestamps is refused before anything is written."""
from __future__ import annotations

import numpy as np
import pytest

from gauss_plugins.data.sequences import UserSequences
from gauss_plugins.models import build_model
from gauss_plugins.train.config import config_from_dict, load_config


def _config(arch="hstu", **model):
    base = {"arch": arch, "dim": 16, "num_blocks": 2, "num_heads": 1, "attention_dim": 8, "linear_dim": 8}
    base.update(model)
    return config_from_dict({"data": {"max_len": 12}, "model": base})


def _tables(cfg):
    blocks = build_model(cfg, num_items=30).encoder.encoder.blocks
    bias = blocks[0].relative_bias
    return (None if bias.position_weight is None else bias.position_weight.numel(),
            None if bias.time_weight is None else bias.time_weight.numel(), bias.time_bucket_scale)


def test_knobs_reach_every_block():
    assert _tables(_config()) == (23, 129, 0.301)
    assert _tables(_config(num_time_buckets=0)) == (23, None, 0.301)
    assert _tables(_config(relative_position_bias=False, num_time_buckets=20, time_bucket_scale="0.5")) \
        == (None, 21, 0.5)


@pytest.mark.parametrize("model, match", [
    (dict(num_time_buckets=-1), "num_time_buckets must be a whole number >= 0"),
    (dict(num_time_buckets=2.5), "num_time_buckets"),
    (dict(num_time_buckets=True), "num_time_buckets"),
    (dict(relative_position_bias="no"), "relative_position_bias must be true or false"),
    (dict(time_bucket_scale=0), "time_bucket_scale must be a positive number"),
    (dict(time_bucket_scale=float("inf")), "time_bucket_scale"),
])
def test_bad_knobs_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        _config(**model)


def test_shipped_configs_carry_the_knobs():
    pytest.importorskip("yaml", reason="reading YAML needs pyyaml (the lightning extra)")
    ml1m = load_config("ml-1m-hstu")
    assert ml1m.model.relative_position_bias and ml1m.model.num_time_buckets == 0  # the shared file has no times
    assert load_config("ml-1m-hstu-large").model.num_time_buckets == 0
    for name in ("ml-100k-hstu", "ml-20m-hstu", "demo-hstu"):
        cfg = load_config(name)
        assert (cfg.model.num_time_buckets, cfg.model.time_bucket_scale) == (128, 0.301), name


def _sequences(timestamps):
    items = np.arange(1, 9, dtype=np.int64)
    return UserSequences(np.array([1, 2]), np.array([0, 4, 8]), items,
                         np.arange(8, dtype=np.int64) if timestamps else None, name="ml-1m",
                         info={"source": "/data/ml-1m/ml-1m_seq.txt"})


def test_time_bias_on_data_without_timestamps_is_refused():
    with pytest.raises(ValueError, match=r"num_time_buckets = 128 .*ml-1m_seq.txt.* no timestamps.*num_time_buckets: 0"):
        _config().check_data(_sequences(timestamps=False))
    _config().check_data(_sequences(timestamps=True))
    _config(num_time_buckets=0).check_data(_sequences(timestamps=False))
    _config(arch="sasrec").check_data(_sequences(timestamps=False))  # SASRec has no time bias
