"""A short training run whose loss falls."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")


TINY = """
name: tiny
data:
  dataset: synthetic
  max_len: 20
  options: {{num_users: 60, num_items: 80, mean_length: 15, num_topics: 4, seed: 1}}
model: {{arch: {arch}, dim: 16, num_blocks: 1, num_heads: 1, attention_dim: 8, linear_dim: 8, dropout: 0.1}}
loss: {{num_negatives: 16}}
train: {{max_epochs: {epochs}, batch_size: 16, eval_every: 1}}
streaming: {{num_windows: 4}}
"""


def _config(tmp_path, arch="hstu", epochs=2):
    path = tmp_path / f"{arch}.yaml"
    path.write_text(TINY.format(arch=arch, epochs=epochs))
    return str(path)


def test_loss_falls(tmp_path):
    from gauss_integrations.lightning import run_experiment
    from gauss_plugins.train.config import load_config

    from gauss_plugins.train.config import with_overrides

    cfg = with_overrides(load_config(_config(tmp_path, "hstu", epochs=5)), train__eval_every=5)
    run_experiment(cfg, str(tmp_path / "run"), progress=False, log=lambda m: None)
    history = json.loads((tmp_path / "run" / "report.json").read_text())["history"]
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.3
