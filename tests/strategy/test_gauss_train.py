"""The main job under `strategy: gauss`: the shipped config trains the retrieval model's
dynamic item table through the lookahead cache with a budget below the item count."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")

from gauss_plugins.cli import main  # noqa: E402
from gauss_plugins.serialization import load_tensors  # noqa: E402
from gauss_plugins.train.config import load_config  # noqa: E402

ITEMS = 300


def _small(tmp_path, **train):
    """The shipped ml-100k-hstu-gauss config on a small synthetic stream (300 items), with a
    budget of 200 rows (below the item count) and a smaller model, for one epoch."""
    cfg = load_config("ml-100k-hstu-gauss")
    assert cfg.train.strategy == "gauss" and cfg.train.cache_budget_rows < 1682  # the shipped job: below ML-100K's items
    with open(cfg_path := tmp_path / "gauss.yaml", "w") as f:
        yaml.safe_dump({
            "name": "gauss-small",
            "data": {"dataset": "synthetic", "max_len": 20,
                     "options": {"num_users": 120, "num_items": ITEMS, "mean_length": 25, "seed": 0}},
            "model": {"arch": "hstu", "dim": 16, "num_blocks": 1, "attention_dim": 8, "linear_dim": 8,
                      "num_time_buckets": 0},
            "loss": {"num_negatives": 16, "shared_negatives": True},
            "train": {"max_epochs": 1, "batch_size": 8, "eval_every": 1, "strategy": "gauss",
                      "cache_budget_rows": 200, "cache_window": 4, **train},
        }, f)
    return str(cfg_path)


def test_gauss_train_runs_the_main_job_through_the_cache(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", _small(tmp_path), "--output-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test/hr@10"] <= metrics["test/hr@200"] <= 1.0
    report = json.loads((out / "report.json").read_text())
    cache = report["cache"]
    assert cache["policy"] == "lookahead" and cache["budget_rows"] == 200 < ITEMS
    assert cache["misses_at_use"] == 0 and cache["hits_at_use"] > 0
    assert cache["evicted_rows"] > 0 and cache["written_back_rows"] > 0   # rows went to TierPS and came back
    assert 0 < cache["max_resident_rows"]["items"] <= 200                  # the budget held every step
    # The checkpoint has the whole trained table (gathered back from the store after fit), more
    # rows than the cache ever held.
    tensors, _ = load_tensors(str(out / "model.safetensors"))
    assert tensors["item_embeddings.table.index.keys"].numel() > 200


def test_shipped_gauss_config_is_valid_and_other_strategies_are_refused(tmp_path):
    cfg = load_config("ml-100k-hstu-gauss")
    assert cfg.loss.shared_negatives and cfg.train.cache_window == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {strategy: horovod}\n")
    assert main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "never")]) == 2


@pytest.mark.slow
def test_gauss_train_with_two_processes(tmp_path):
    """`devices: 2`: Lightning starts `gauss train` again for rank 1; both train halves of each
    batch through their caches, every rank evaluates every user, rank 0 alone writes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "gauss_plugins.cli", "train", "--config",
                           _small(tmp_path, devices=2), "--output-dir", str(out), "--no-progress"],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["cache"]["misses_at_use"] == 0 and report["cache"]["max_resident_rows"]["items"] <= 200
    # Rank 0 wrote the selected model; the metrics are exact (every rank ranked every user).
    assert report["eval_users"] == 120 and (out / "model.safetensors").exists()


def test_the_budget_changes_where_rows_live_not_the_training(tmp_path):
    """Budget 160 (rows travel through TierPS every few steps) and 300 (every item fits): the
    same metrics and the same trained rows. Negatives are drawn from their own generator, so
    how far ahead the cache pulls batches does not shift the dropout stream."""
    outs = []
    for budget in (160, ITEMS):
        out = tmp_path / f"b{budget}"
        assert main(["train", "--config", _small(tmp_path, cache_budget_rows=budget, cache_window=3),
                     "--output-dir", str(out), "--no-progress"]) == 0
        outs.append(out)
    m0, m1 = (json.loads((o / "metrics.json").read_text()) for o in outs)
    assert m0 == pytest.approx(m1, abs=1e-6)
    rows = [_item_rows(o / "model.safetensors") for o in outs]
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=1e-6)
    assert rows[0].abs().sum() > 0


def _item_rows(path):
    """Every item's trained row, read through the checkpoint's own model."""
    from gauss_integrations.lightning.fit import load_model_tensors
    from gauss_plugins.models import build_model
    from gauss_plugins.train.config import config_from_dict

    tensors, meta = load_tensors(str(path))
    model = build_model(config_from_dict(json.loads(meta["config"])), num_items=int(meta["num_items"])).eval()
    load_model_tensors(model, tensors)
    return model.item_embeddings.table.lookup(torch.arange(1, ITEMS + 1)).detach()


def test_streaming_mode_trains_each_window_through_a_cache(tmp_path):
    out = tmp_path / "run"
    cfg = _small(tmp_path)
    assert main(["train", "--config", cfg, "--mode", "streaming", "--output-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    windows = report["cache"]
    assert [w["stream_window"] for w in windows] == list(range(report["num_windows"] - 1))
    assert all(w["misses_at_use"] == 0 and w["max_resident_rows"]["items"] <= 200 for w in windows)
    assert sum(w["evicted_rows"] for w in windows) > 0
