"""``train.refit``: retrain on train + validation items for the epoch count selected on validation."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")


def _config(tiny_config, **overrides):
    from gauss_plugins.train.config import load_config, with_overrides

    return with_overrides(load_config(tiny_config("hstu", epochs=3)), **overrides)


def test_refit_trains_a_fresh_model_on_train_and_val_for_the_selected_epochs(tmp_path, tiny_config):
    from gauss_integrations.lightning import run_experiment
    from gauss_integrations.lightning.fit import _build_module, _seed
    from gauss_integrations.lightning.module import SequenceDataModule
    from gauss_plugins.data.split import leave_one_out
    from gauss_plugins.serialization import load_tensors
    from gauss_plugins.train.batching import HeldOutExamples, TrainExamples
    import pytorch_lightning as pl

    cfg = _config(tiny_config, train__refit=True)
    metrics = run_experiment(cfg, str(tmp_path / "run"), progress=False, log=lambda m: None)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["refit"]["epochs"] == report["selected_epoch"]
    assert len(report["refit"]["history"]) == report["selected_epoch"]  # trained that many epochs, no validation
    assert all("val/ndcg@10" not in r for r in report["refit"]["history"])
    assert {"test/hr@10", "test_selection_run/hr@10", "val/hr@10"} <= set(metrics)

    # The same model trained by hand on all but the test items for the selected epochs: the
    # refit's test metrics and the saved checkpoint are that model's.
    from gauss_integrations.lightning import load_sequences

    seqs = load_sequences(cfg)
    split = leave_one_out(seqs)
    _seed(cfg.train.seed)
    module = _build_module(cfg, seqs.max_item_id)
    dm = SequenceDataModule(TrainExamples(split.train_and_val, cfg.data.max_len), None,
                            HeldOutExamples(split.test, cfg.data.max_len, cfg.data.exclude_history),
                            batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                            seed=cfg.train.seed)
    trainer = pl.Trainer(max_epochs=report["selected_epoch"], accelerator="cpu", limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    for key, value in module.last_eval["test"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    saved, _ = load_tensors(str(tmp_path / "run" / "model.safetensors"))
    from gauss_integrations.lightning.fit import model_tensors

    for name, tensor in model_tensors(module.model).items():
        assert torch.allclose(saved[name], tensor.detach().cpu(), rtol=0, atol=1e-6), name


def test_refit_config_is_checked():
    from gauss_plugins.train.config import ExperimentConfig, with_overrides

    base = ExperimentConfig()
    with pytest.raises(ValueError, match="train.refit must be true or false"):
        with_overrides(base, train__refit="yes").validate()
    with pytest.raises(ValueError, match="needs train.mode epoch"):
        with_overrides(base, train__refit=True, train__mode="streaming").validate()
    with pytest.raises(ValueError, match="runs in one process"):
        with_overrides(base, train__refit=True, train__devices=2, train__strategy="gauss").validate()
    assert with_overrides(base, train__refit=True).validate().train.refit is True
