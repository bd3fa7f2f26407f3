"""A short training run whose loss falls."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")


def test_loss_falls(tmp_path, tiny_config):
    from gauss_integrations.lightning import run_experiment
    from gauss_plugins.train.config import load_config

    from gauss_plugins.train.config import with_overrides

    cfg = with_overrides(load_config(tiny_config("hstu", epochs=5)), train__eval_every=5)
    run_experiment(cfg, str(tmp_path / "run"), progress=False, log=lambda m: None)
    history = json.loads((tmp_path / "run" / "report.json").read_text())["history"]
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.3
