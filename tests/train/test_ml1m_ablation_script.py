"""benchmarks/ml1m_ablation.py without training: every variant builds a valid config, runs
are read back at the validation-selected epoch, and the summary averages seeds per group and
compares each ablation with its baseline."""
from __future__ import annotations

import json
import os
import types

import pytest


@pytest.fixture(scope="module")
def ablation(load_benchmark):
    pytest.importorskip("yaml", reason="reading YAML configs needs pyyaml (the lightning extra)")
    return load_benchmark("ml1m_ablation")


def test_every_variant_is_a_valid_config_differing_from_its_baseline_by_its_overrides(ablation):
    args = types.SimpleNamespace(max_epochs=None, quick=False, accelerator="gpu")
    for name, (base, overrides, seed, _group, baseline) in ablation.VARIANTS.items():
        config = ablation._config(base, overrides, seed, args, "/data/ml-1m")
        assert config.train.seed == seed and config.train.max_epochs == 101 and config.data.path == "/data/ml-1m"
        for key, value in overrides.items():
            section, field = key.split(".")
            assert getattr(getattr(config, section), field) == value, (name, key)
        if baseline:
            base_config = ablation._config(*ablation.VARIANTS[baseline][:3], args, "/data/ml-1m")
            differing = {f"{section}.{k}" for section in ("data", "model", "loss", "optim", "train")
                         for k, v in vars(getattr(config, section)).items()
                         if getattr(getattr(base_config, section), k) != v}
            assert differing == set(overrides), name


def _fake_run(folder, selected, history, test):
    run = os.path.join(folder, "run")
    os.makedirs(run)
    with open(os.path.join(run, "report.json"), "w") as f:
        json.dump({"selected_epoch": selected, "epochs_trained": len(history), "history": history,
                   "epoch_seconds_mean": 1.5}, f)
    with open(os.path.join(run, "metrics.json"), "w") as f:
        json.dump({f"test/{k}": v for k, v in test.items()}, f)


def test_results_are_read_at_the_selected_epoch_and_summarised(ablation, tmp_path):
    args = types.SimpleNamespace(workdir=str(tmp_path))
    history = [{"epoch": 1, "val/hr@10": 0.1, "val/ndcg@10": 0.05}, {"epoch": 2, "val/hr@10": 0.3, "val/ndcg@10": 0.2},
               {"epoch": 3, "val/hr@10": 0.2, "val/ndcg@10": 0.1}]
    _fake_run(tmp_path / "hstu-s42", 2, history, {"hr@10": 0.30, "ndcg@10": 0.17})
    _fake_run(tmp_path / "hstu-s43", 2, history, {"hr@10": 0.32, "ndcg@10": 0.19})
    _fake_run(tmp_path / "hstu-d25-s42", 3, history, {"hr@10": 0.25, "ndcg@10": 0.12})
    ok = {"status": "ok", "wall_s": 1.0}
    results = [ablation._result(n, args, ok) for n in ("hstu-s42", "hstu-s43", "hstu-d25-s42")]
    results.append(ablation._result("large-s42", args, {"status": "timed out", "wall_s": 9.0}))
    assert results[0]["val_ndcg@10"] == 0.2 and results[0]["test_ndcg@10"] == 0.17  # epoch 2, as selected
    assert results[2]["val_ndcg@10"] == 0.1
    assert results[3].get("test_ndcg@10") is None and results[3]["log"].endswith("train.log")
    summary = ablation._summary(results)
    assert summary["hstu"]["runs"] == 2 and summary["hstu"]["test_hr@10"]["mean"] == pytest.approx(0.31)
    assert summary["hstu"]["paper_test_hr@10_ndcg@10"] == [0.3097, 0.1720]
    assert "hstu-large" not in summary  # the timed-out run counts nowhere
    assert results[2]["delta_vs_base"]["val_ndcg@10"] == pytest.approx(-0.1)
    assert results[2]["delta_vs_base"]["test_ndcg@10"] == pytest.approx(-0.05)
    text = ablation._markdown(results, summary, "test")
    assert "| hstu-d25-s42 | model.attention_dim=25, model.linear_dim=25 | 42 | 3 |" in text and "timed out" in text


def test_unknown_variant_is_refused(ablation, capsys):
    with pytest.raises(SystemExit):
        ablation._parse(["--variants", "nope"])
    assert "unknown variant(s) nope" in capsys.readouterr().err


def test_runs_are_spread_over_the_gpus_round_robin(ablation, tmp_path, monkeypatch):
    launched = {}

    class Done:
        def poll(self):
            return 0

    class Log:
        def close(self):
            pass

    def fake_launch(name, config_path, run_dir, accelerator, gpu=None):
        launched[name] = gpu
        return Done(), Log()

    monkeypatch.setattr(ablation, "_launch", fake_launch)
    monkeypatch.setattr(ablation, "_write_config", lambda config, path: None)
    monkeypatch.setattr(ablation.time, "sleep", lambda s: None)
    args = types.SimpleNamespace(parallel=4, gpus=["0", "1"], workdir=str(tmp_path), accelerator="gpu", timeout_s=None)
    names = ["hstu-s42", "hstu-s43", "hstu-neg512-s42", "hstu-neg512-s43"]
    status = ablation._run_all(args, {n: object() for n in names})
    assert launched == {"hstu-s42": "0", "hstu-s43": "1", "hstu-neg512-s42": "0", "hstu-neg512-s43": "1"}
    assert all(s["status"] == "ok" for s in status.values())
