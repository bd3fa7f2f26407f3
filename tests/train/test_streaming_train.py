"""Streaming mode end to end: windows evaluated before training on them."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")

from gauss_plugins.cli import main  # noqa: E402

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

KEYS = [f"{s}/{m}@{k}" for s in ("val", "test") for m in ("hr", "ndcg") for k in (10, 50, 200)]


def _config(tmp_path, arch="hstu", epochs=2):
    path = tmp_path / f"{arch}.yaml"
    path.write_text(TINY.format(arch=arch, epochs=epochs))
    return str(path)


def test_streaming_mode(tmp_path):
    out = tmp_path / "stream"
    rc = main(["train", "--config", _config(tmp_path, "sasrec"), "--output-dir", str(out), "--mode", "streaming",
               "--max-epochs", "1", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics)
    report = json.loads((out / "report.json").read_text())
    assert [w["window"] for w in report["windows"]] == [1, 2, 3]
    assert (out / "stream_metrics.png").exists()
