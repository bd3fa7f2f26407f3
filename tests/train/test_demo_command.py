"""`gauss demo` end to end on the synthetic stream (one epoch: the wiring, not the quality)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")

from gauss_plugins.cli import main  # noqa: E402


@pytest.mark.slow
def test_demo_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--synthetic", "--max-epochs", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "synthetic event stream" in printed and "hstu" in printed and "sasrec" in printed
    report = json.loads((out / "report.json").read_text())
    assert {r["model"] for r in report["runs"]} == {"hstu", "sasrec"}
    assert all("test/ndcg@10" in r["metrics"] for r in report["runs"])
    assert (out / "training_curves.png").exists() and (out / "test_metrics.png").exists()
