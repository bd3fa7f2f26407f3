"""`gauss train` on tiny synthetic data and a sequence file: every promised output."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")

from gauss_plugins.cli import main  # noqa: E402
from gauss_plugins.serialization import load_tensors  # noqa: E402


KEYS = [f"{s}/{m}@{k}" for s in ("val", "test") for m in ("hr", "ndcg") for k in (10, 50, 200)]


@pytest.mark.parametrize("arch", ["hstu", "sasrec"])
def test_cli_train_writes_metrics_checkpoint_and_plot(tmp_path, arch, tiny_config):
    out = tmp_path / "run"
    rc = main(["train", "--config", tiny_config(arch), "--dataset", "synthetic", "--output-dir", str(out),
               "--max-epochs", "2", "--accelerator", "cpu", "--seed", "3", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in KEYS)
    assert metrics["test/hr@10"] <= metrics["test/hr@50"] <= metrics["test/hr@200"]
    assert (out / "training_curve.png").stat().st_size > 1000
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["train"]["seed"] == 3 and report["item_embeddings"] == "dynamic"
    tensors, meta = load_tensors(str(out / "model.safetensors"))
    assert meta["format"] == "gauss-plugins/retrieval-model/1"
    assert any(k.startswith("item_embeddings.table.") for k in tensors)   # the dynamic table is in it
    # the checkpoint restores the selected model exactly
    from gauss_integrations.lightning.fit import load_model_tensors
    from gauss_plugins.models import build_model
    from gauss_plugins.train.config import config_from_dict

    cfg = config_from_dict(json.loads(meta["config"]))
    model = build_model(cfg, num_items=int(meta["num_items"])).eval()
    load_model_tensors(model, tensors)
    ids = torch.tensor([[1, 2, 3]])
    q = model.query(ids, torch.tensor([3]))
    assert torch.isfinite(q).all()


def test_bad_config_fails_cleanly_without_output(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: hstu, blocks: 3}\n")
    out = tmp_path / "never"
    assert main(["train", "--config", str(bad), "--output-dir", str(out)]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_seqfile_training(tmp_path, tiny_config):
    lines = [f"{u} " + " ".join(str((u * 7 + k) % 50 + 1) for k in range(12)) for u in range(1, 31)]
    seqfile = tmp_path / "seqs.txt"
    seqfile.write_text("\n".join(lines) + "\n")
    out = tmp_path / "seq"
    rc = main(["train", "--config", tiny_config("sasrec"), "--dataset", "seqfile", "--data-path", str(seqfile),
               "--output-dir", str(out), "--max-epochs", "1", "--no-progress"])
    assert rc == 0
    assert set(KEYS) <= set(json.loads((out / "metrics.json").read_text()))
