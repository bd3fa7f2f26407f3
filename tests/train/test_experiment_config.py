"""YAML configs: the shipped ones load, typos and test-set selection are refused."""
from __future__ import annotations

import glob
import os

import pytest

from gauss_plugins.train.config import config_from_dict, load_config, with_overrides

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "src", "gauss_plugins", "configs")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.item_embedding == "dynamic"
    assert cfg.loss.num_negatives == 128 and cfg.loss.temperature == 0.05
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.98)


def test_paper_ml1m_settings():
    hstu = load_config(os.path.join(CONFIGS, "ml-1m-hstu.yaml"))
    large = load_config(os.path.join(CONFIGS, "ml-1m-hstu-large.yaml"))
    sasrec = load_config(os.path.join(CONFIGS, "ml-1m-sasrec.yaml"))
    assert (hstu.data.max_len, hstu.model.dim, hstu.model.num_blocks, hstu.model.num_heads) == (200, 50, 2, 1)
    assert (large.model.num_blocks, large.model.num_heads) == (8, 2)
    assert sasrec.model.arch == "sasrec" and hstu.model.dropout == 0.2 and hstu.train.batch_size == 128
    big = load_config(os.path.join(CONFIGS, "ml-20m-hstu-large.yaml"))
    assert (big.model.dim, big.model.num_blocks, big.model.num_heads) == (256, 16, 8)


def test_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown key.*blocks"):
        config_from_dict({"model": {"blocks": 2}})
    with pytest.raises(ValueError, match="unknown section"):
        config_from_dict({"modle": {}})
    with pytest.raises(ValueError, match="tune on the test set"):
        config_from_dict({"train": {"monitor": "test/ndcg@10"}})
    with pytest.raises(ValueError, match="arch"):
        config_from_dict({"model": {"arch": "bert4rec"}})


def test_overrides():
    cfg = with_overrides(config_from_dict({}), train__seed=7, data__dataset="synthetic", train__max_epochs=None)
    assert cfg.train.seed == 7 and cfg.data.dataset == "synthetic" and cfg.train.max_epochs == 101
    with pytest.raises(KeyError):
        with_overrides(cfg, train__nope=1)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "nope.yaml"))
