"""Streaming mode end to end: windows evaluated before training on them."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")

from gauss_plugins.cli import main  # noqa: E402


KEYS = [f"{s}/{m}@{k}" for s in ("val", "test") for m in ("hr", "ndcg") for k in (10, 50, 200)]


def test_streaming_mode(tmp_path, tiny_config):
    out = tmp_path / "stream"
    rc = main(["train", "--config", tiny_config("sasrec"), "--output-dir", str(out), "--mode", "streaming",
               "--max-epochs", "1", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics)
    report = json.loads((out / "report.json").read_text())
    assert [w["window"] for w in report["windows"]] == [1, 2, 3]
    assert (out / "stream_metrics.png").exists()
