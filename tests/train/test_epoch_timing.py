"""Per-epoch timings: the report of a run and the comparison summary carry them."""
from __future__ import annotations

import json
import os

from gauss_plugins.train.compare import markdown_table, run_comparison, timing_table
from gauss_plugins.train.config import load_config


def test_epoch_and_validation_seconds_reach_the_report_and_the_summary(tiny_config, tmp_path):
    config = load_config(tiny_config("sasrec", epochs=2))
    result = run_comparison({"sasrec": config}, [0], str(tmp_path / "runs"), log=lambda m: None)
    with open(os.path.join(tmp_path, "runs", "sasrec-seed0", "report.json")) as f:
        report = json.load(f)
    # One training time per epoch and one validation time per validation during fit (the
    # selected model's re-validation and the test pass come after fit: not counted).
    assert len(report["epoch_seconds"]) == report["epochs_trained"] == 2
    assert len(report["val_seconds"]) == 2
    assert all(s > 0 for s in report["epoch_seconds"] + report["val_seconds"])
    assert abs(report["epoch_seconds_mean"] - sum(report["epoch_seconds"]) / 2) < 1e-3
    assert sum(report["epoch_seconds"]) + sum(report["val_seconds"]) <= report["fit_s"] + 0.1
    stats = result["summary"]["sasrec"]
    assert abs(stats["epoch_seconds"]["mean"] - report["epoch_seconds_mean"]) < 1e-9
    assert abs(stats["val_seconds"]["mean"] - report["val_seconds_mean"]) < 1e-9
    assert "epoch_seconds" not in json.load(open(os.path.join(tmp_path, "runs", "sasrec-seed0", "metrics.json")))
    table = timing_table(result["summary"])
    assert table.splitlines()[2].startswith("| sasrec | ") and f"{stats['epoch_seconds']['mean']:.4f}" in table
    assert "epoch" not in markdown_table(result["summary"])  # the metric table stays metrics only
