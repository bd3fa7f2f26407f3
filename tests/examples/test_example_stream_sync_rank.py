"""examples/stream_sync_rank.py end to end with tiny settings: train while syncing, serve, rank."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stream_sync_rank.py"
TINY = ["--users", "80", "--items", "200", "--mean-length", "20", "--steps", "30", "--batch", "32",
        "--dim", "16", "--max-len", "20", "--negatives", "32", "--sync-interval", "0.2",
        "--publish-every", "5", "--show-users", "2", "--quiet"]


def load_example():
    spec = importlib.util.spec_from_file_location("example_stream_sync_rank", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_sync_rank_served_equals_trained(tmp_path):
    example = load_example()
    out = tmp_path / "run"
    report = example.main(TINY + ["--out", str(out)])

    on_disk = json.loads((out / "report.json").read_text())
    for key in example.REPORT_KEYS:
        assert key in report and key in on_disk, key
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic write left no temp file

    c = report["consistency"]
    assert c["rows_checked"] > 0
    assert c["served_rows_equal_trained"] and c["served_id_set_equal"]
    assert c["dense_equal_trained"]
    assert c["manifest_version_is_final"] and c["snapshot_version"] == c["table_version"]
    # the very last training step changed rows, and the final snapshot holds their new values
    assert c["last_step_rows_changed"] > 0 and c["last_step_rows_visible"]
    assert c["scores_equal"] and c["scores_max_abs_diff"] == 0.0
    assert c["mfalcon_query_matches"]

    s = report["syncer"]
    assert s["failures"] == 0 and s["last_error"] is None
    assert s["pushes"] >= 2 and s["rows_pushed"] >= c["rows_checked"]
    assert s["freshness_p50_s"] is not None and math.isfinite(s["freshness_p50_s"])
    assert s["freshness_p99_s"] is not None and 0 <= s["freshness_p50_s"] <= s["freshness_p99_s"] < 60

    assert report["steps"] == 30 and report["events_trained"] > 0 and report["events_per_s"] > 0
    assert report["manifest"]["embedding_version"] == c["table_version"]
    assert 0.0 <= report["ranking"]["hr@10"] <= 1.0 and report["ranking"]["users"] > 0
    assert len(report["top10"]) == 2 and all(len(t["top10"]) == 10 for t in report["top10"])


def test_stream_sync_rank_detects_a_lossy_sync(tmp_path, monkeypatch):
    """Negative control: a source that never delivers some ids' changes must fail the checks."""
    example = load_example()
    from gauss_plugins.stores.base import ChangeBatch

    class LossySource(example.TableSource):
        def changes_since(self, version, consumer=None, full=False):
            b = super().changes_since(version, consumer=consumer, full=full)
            keep = b.ids % 7 != 0
            return ChangeBatch(b.ids[keep], b.values[keep], None, b.deleted, b.version, full=False)

    monkeypatch.setattr(example, "TableSource", LossySource)
    report = example.main(TINY + ["--steps", "10", "--out", str(tmp_path / "lossy")])
    c = report["consistency"]
    assert not c["served_rows_equal_trained"]
    assert not c["last_step_rows_visible"]


def test_ml100k_comes_from_the_data_folder(tmp_path, monkeypatch, capsys):
    """--dataset ml-100k looks where every command looks ($GAUSS_DATA ...), not at a fixed path,
    and says why when it falls back to the synthetic stream."""
    example = load_example()
    monkeypatch.setenv("GAUSS_DATA", str(tmp_path))
    args = example.parse_args(["--dataset", "ml-100k", "--users", "30", "--items", "40"])
    fallback = example.load_events(args)
    err = capsys.readouterr().err
    assert fallback.name == "synthetic" and f"no {tmp_path / 'ml-100k' / 'u.data'}" in err
    assert "using the synthetic stream instead" in err

    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t10\t5\t100\n1\t11\t4\t101\n2\t10\t3\t100\n2\t12\t1\t102\n")
    seqs = example.load_events(args)
    assert seqs.name == "ml-100k" and seqs.num_users == 2 and seqs.num_events == 4
