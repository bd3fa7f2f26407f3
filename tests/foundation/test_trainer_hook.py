"""The `trainer` hook kind: the core reaches training only through the registry."""
from __future__ import annotations

import ast
import json
import os
import types
from pathlib import Path

import pytest

from gauss_plugins import Component, hookimpl
from gauss_plugins.train.trainers import TrainerUnavailableError, get_trainer, trainer_component

CORE = Path(__file__).resolve().parents[2] / "src" / "gauss_plugins"


def test_core_never_imports_a_kernel_or_an_integration():
    """What the README promises: every module of src/gauss_plugins, imports inside functions too."""
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(CORE)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("gauss_integrations", "gauss_kernels")]
    assert offenders == []


def test_lightning_registers_the_trainer(fresh_registry):
    comp = trainer_component()
    assert (comp.kind, comp.name, comp.plugin, comp.provider) == ("trainer", "lightning", "integrations", "gauss-plugins")
    from gauss_integrations.lightning.fit import run_experiment

    assert get_trainer() is run_experiment and get_trainer("lightning") is run_experiment


def test_no_trainer_registered_says_why(fresh_registry, monkeypatch):
    monkeypatch.setenv("GAUSS_PLUGINS_DENY", "integrations")
    with pytest.raises(TrainerUnavailableError, match=r"none is registered.*gauss-plugins\[lightning\]"):
        get_trainer()


def test_unknown_trainer_name(fresh_registry):
    with pytest.raises(TrainerUnavailableError, match="no trainer named 'nosuch'; registered: lightning"):
        get_trainer("nosuch")


def _plugin(**hooks) -> types.ModuleType:
    module = types.ModuleType("third_party_trainer")
    for name, fn in hooks.items():
        setattr(module, name, hookimpl(fn))
    return module


def test_unavailable_trainer_is_reported_with_its_reason(fresh_registry, monkeypatch):
    monkeypatch.setenv("GAUSS_PLUGINS_DENY", "integrations")
    from gauss_plugins.components import Availability

    fresh_registry.get_plugin_manager().register(_plugin(gauss_register_trainers=lambda: [
        Component("trainer", "jax", "nowhere:run", check=lambda: Availability(False, "jax not installed"))]))
    with pytest.raises(TrainerUnavailableError, match="training is not available here: jax: jax not installed"):
        get_trainer()


def test_comparison_runs_whatever_trainer_is_registered(fresh_registry, monkeypatch, tmp_path):
    """run_comparison takes its loop from the registry: a plugin's trainer of higher priority
    is the one that runs (Lightning is not touched)."""
    calls = []

    def run(config, output_dir, progress=True, log=print, sequences=None):
        calls.append((config.train.seed, sequences.num_users))
        os.makedirs(output_dir, exist_ok=True)
        metrics = {"val/hr@10": 0.5, "test/hr@10": 0.25 + config.train.seed / 100, "test/ndcg@10": 0.125}
        with open(os.path.join(output_dir, "report.json"), "w") as f:
            json.dump({"selected_epoch": 1, "metrics": metrics}, f)
        return metrics

    fresh_registry.get_plugin_manager().register(_plugin(gauss_register_trainers=lambda: [
        Component("trainer", "recorder", run, priority=10)]))
    assert trainer_component().name == "recorder"

    from gauss_plugins.train.compare import run_comparison
    from gauss_plugins.train.config import config_from_dict

    cfg = config_from_dict({"data": {"dataset": "synthetic", "options": {"num_users": 30, "num_items": 40,
                                                                         "mean_length": 8, "seed": 0}}})
    result = run_comparison({"m": cfg}, [0, 1], str(tmp_path), log=lambda m: None, summary_table=False)
    assert calls == [(0, 30), (1, 30)]
    assert result["summary"]["m"]["test/hr@10"]["values"] == [0.25, 0.26]
