"""A tiny synthetic experiment config shared by the training tests."""
from __future__ import annotations

import pytest

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



@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(arch="hstu", epochs=2) -> path`` of a YAML config in ``tmp_path``."""

    def make(arch: str = "hstu", epochs: int = 2) -> str:
        path = tmp_path / f"{arch}.yaml"
        path.write_text(TINY.format(arch=arch, epochs=epochs))
        return str(path)

    return make
