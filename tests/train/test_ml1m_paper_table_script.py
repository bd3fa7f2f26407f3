"""benchmarks/ml1m_paper_table.py --parallel without training: one child per (model, seed),
spread over --gpus round robin, their records merged and summarised per model over seeds."""
from __future__ import annotations

import json
import os

import pytest


class _FakeChild:
    """Stands in for a child process: writes the part JSON the real child would."""

    launched = []

    def __init__(self, cmd, stdout=None, stderr=None, env=None):
        model = cmd[cmd.index("--models") + 1]
        seed = int(cmd[cmd.index("--seeds") + 1])
        out = cmd[cmd.index("--out") + 1]
        self.launched.append((model, seed, env.get("CUDA_VISIBLE_DEVICES")))
        hr = {"hstu": 0.30, "sasrec": 0.28}[model] + seed / 1000
        with open(out, "w") as f:
            json.dump({"runs": [{"model": model, "seed": seed, "metrics": {"test/hr@10": hr, "test/ndcg@10": hr / 2},
                                 "timing": {"epoch_seconds": 1.0 + seed}}],
                       "summary": {}, "configs": {model: {"train": {"max_epochs": 101, "refit": True}}},
                       "data": {"name": "fake"}}, f)
        self.returncode = 0

    def wait(self):
        return self.returncode


def test_parallel_runs_one_child_per_model_and_seed_and_merges_over_seeds(load_benchmark, tmp_path, monkeypatch):
    table = load_benchmark("ml1m_paper_table")
    monkeypatch.setattr(table.subprocess, "Popen", _FakeChild)
    _FakeChild.launched = []
    argv = ["--parallel", "--refit", "--models", "hstu", "sasrec", "--seeds", "1", "2", "--gpus", "0,1",
            "--accelerator", "cpu", "--workdir", str(tmp_path), "--out", str(tmp_path / "t.json")]
    assert table.main(argv) == 0
    assert sorted(_FakeChild.launched) == [("hstu", 1, "0"), ("hstu", 2, "0"), ("sasrec", 1, "1"), ("sasrec", 2, "1")]
    merged = json.loads((tmp_path / "t.json").read_text())
    assert merged["seeds"] == [1, 2] and len(merged["runs"]) == 4
    assert merged["summary"]["hstu"]["test/hr@10"]["mean"] == pytest.approx(0.3015)
    assert merged["summary"]["sasrec"]["test/hr@10"]["values"] == pytest.approx([0.281, 0.282])
    assert merged["summary"]["hstu"]["epoch_seconds"]["mean"] == pytest.approx(2.5)
    assert "GPUs 0,1" in merged["how_run"]
    assert "refit on train + validation" in (tmp_path / "t.md").read_text()


def test_refit_flag_reaches_the_configs(load_benchmark):
    pytest.importorskip("yaml", reason="reading YAML configs needs pyyaml (the lightning extra)")
    table = load_benchmark("ml1m_paper_table")
    args = table._parse(["--refit", "--accelerator", "cpu"])
    assert all(c.train.refit for c in table._configs(args).values())
    args = table._parse(["--accelerator", "cpu"])
    assert not any(c.train.refit for c in table._configs(args).values())


def test_bad_gpus_are_refused_before_anything_runs(load_benchmark, tmp_path, capsys):
    table = load_benchmark("ml1m_paper_table")
    with pytest.raises(SystemExit):
        table._parse(["--parallel", "--gpus", "0,x", "--accelerator", "cpu", "--workdir", str(tmp_path)])
    assert "--gpus takes CUDA device numbers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
