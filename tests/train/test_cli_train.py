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
    q = model.query(ids, torch.tensor([3]), torch.tensor([[100, 200, 300]]))  # HSTU's time bias needs times
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


def _history(out):
    return json.loads((out / "report.json").read_text())["history"]


def test_a_run_shorter_than_eval_every_still_validates_and_selects(tmp_path, tiny_config):
    """Was: "training ended before any validation" for `gauss demo --max-epochs 1`."""
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(open(tiny_config("sasrec")).read().replace("eval_every: 1", "eval_every: 3"))
    out = tmp_path / "one"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--max-epochs", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["selected_epoch"] == 1 and "val/ndcg@10" in report["history"][0]


def test_the_last_epoch_is_validated_when_eval_every_does_not_divide_it(tmp_path, tiny_config):
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(open(tiny_config("sasrec")).read().replace("eval_every: 1", "eval_every: 3"))
    out = tmp_path / "four"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--max-epochs", "4", "--no-progress"]) == 0
    validated = [r["epoch"] for r in _history(out) if "val/ndcg@10" in r]
    assert validated == [3, 4]


def test_shipped_config_by_name_from_another_folder(tmp_path, monkeypatch, capsys):
    """`gauss train --config demo-sasrec` resolves the packaged config from any folder; a
    missing dataset is one clear line and leaves no output folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAUSS_DATA", str(tmp_path / "nodata"))
    assert main(["train", "--config", "demo-sasrec", "--output-dir", "out", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no " in err and "ml-100k" in err and "gauss data download movielens-100k" in err
    assert not (tmp_path / "out").exists()


def test_report_json_is_strict_json(tmp_path):
    """A std over one seed is NaN: it is written as null, which every JSON parser accepts."""
    import numpy as np

    from gauss_plugins.train.report import write_json

    path = tmp_path / "r.json"
    write_json(str(path), {"std": float("nan"), "inf": [float("inf"), -float("inf")], "np": np.float64("nan"),
                           "t": torch.tensor(float("nan")), "arr": np.array([1.0, np.nan]), "ok": 0.5})

    def reject(constant):
        raise ValueError(f"bare {constant} in the file")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data == {"std": None, "inf": [None, None], "np": None, "t": None, "arr": [1.0, None], "ok": 0.5}


def test_one_seed_comparison_writes_null_std(tmp_path, tiny_config):
    from gauss_plugins.train.compare import run_comparison
    from gauss_plugins.train.config import load_config

    cfg = load_config(tiny_config("sasrec", epochs=1))
    result_path = tmp_path / "cmp.json"
    run_comparison({"sasrec": cfg}, [0], str(tmp_path / "w"), result_path=str(result_path), log=lambda m: None)
    text = result_path.read_text()
    assert "NaN" not in text
    assert json.loads(text)["summary"]["sasrec"]["test/hr@10"]["std"] is None
