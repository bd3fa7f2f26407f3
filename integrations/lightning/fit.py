"""Run an experiment end to end under Lightning: data, model, training, selection, reports.

:func:`run_experiment` is what ``gauss train`` calls. Two modes (``train.mode``):

* ``epoch``: the paper's protocol on the leave-one-out split. Train for up to
  ``max_epochs``, validate every ``eval_every`` epochs, keep the parameters of the best
  validation ``monitor`` (optionally stop early), then report validation and test metrics of
  that model. The test set is evaluated once, at the end, and never used for any choice.
  With ``train.refit`` a fresh model (same seed) then trains on the training prefixes plus
  the validation items for the selected number of epochs, as the papers' code trains on all
  but the test item; ``test/*`` is that model's, ``test_selection_run/*`` the selected one's
  (both evaluated once, after every choice was made), ``val/*`` the selected one's.
* ``streaming``: events in time order (:mod:`gauss_plugins.train.streaming`): train on window
  0; for each later window evaluate first, then train on it. ``val/*`` is the event-weighted
  mean over the middle windows, ``test/*`` the last window.

Writes into ``output_dir``: ``metrics.json`` (flat ``val/...``, ``test/...``),
``report.json`` (config, data summary, history, timings, selection), ``model.safetensors``
(pickle-free checkpoint of the selected model, or of the refit one, written with
:func:`gauss_plugins.serialization.save_tensors`), and ``training_curve.png`` (or
``stream_metrics.png``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from gauss_plugins.data.locate import load_configured_dataset
from gauss_plugins.data.sequences import UserSequences
from gauss_plugins.data.split import leave_one_out
from gauss_plugins.models.builder import build_model
from gauss_plugins.serialization import save_tensors
from gauss_plugins.train.batching import HeldOutExamples, TrainExamples
from gauss_plugins.train.config import ExperimentConfig, config_to_dict
from gauss_plugins.train.report import METRIC_KEYS, plot_history, plot_stream, write_json
from gauss_plugins.train.streaming import stream_windows
from gauss_integrations.lightning.module import RetrievalModule, SequenceDataModule

__all__ = ["run_experiment", "load_sequences", "BestModelKeeper", "save_checkpoint"]

def load_sequences(config: ExperimentConfig) -> UserSequences:
    """The dataset of ``config``: from ``data.path``, else from the data folder
    (:mod:`gauss_plugins.data.locate`); ``synthetic`` needs no path."""
    return load_configured_dataset(config.data.dataset, config.data.path, config.data.options)


class BestModelKeeper(pl.Callback):
    """Keeps an in-memory copy of the parameters with the best validation ``monitor``.

    A Lightning ``ModelCheckpoint`` would write pickles (``torch.save``); this project's
    checkpoints are pickle-free, so selection happens in memory and the winner is written
    once with :func:`save_checkpoint`.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.best_score: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_state: Optional[Dict[str, torch.Tensor]] = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: RetrievalModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = pl_module.last_eval.get("val", {})
        if self.monitor not in values:
            raise KeyError(f"monitor {self.monitor!r} is not a validation metric; have {sorted(values)}")
        score = values[self.monitor]
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best_epoch = int(trainer.current_epoch) + 1
            self.best_state = {k: v.detach().clone() for k, v in model_tensors(pl_module.model).items()}

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            load_model_tensors(model, self.best_state)


def model_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every tensor of ``model``: its ``state_dict()``, which includes the dynamic table's
    keys, rows and optimizer state (the table exports them through the nn.Module hooks)."""
    return dict(model.state_dict())


def load_model_tensors(model: torch.nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    model.load_state_dict(tensors, strict=True)


class ValidateLastEpoch(pl.Callback):
    """Validates the last epoch even when ``eval_every`` does not divide ``max_epochs``, so
    the model trained last is always a candidate and a run shorter than ``eval_every``
    still selects a model. Lightning reads ``trainer.check_val_every_n_epoch`` at every
    epoch's end, so setting it at the start of the last epoch is enough."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs:
            trainer.check_val_every_n_epoch = 1


class EpochLogger(pl.Callback):
    """One line per validation when progress bars are off (background runs, benchmarks)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._emit = log

    def on_validation_end(self, trainer: pl.Trainer, pl_module: RetrievalModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        record = pl_module.history[-1] if pl_module.history else {}
        self._emit(f"epoch {int(trainer.current_epoch) + 1}: train loss {record.get('train/loss', float('nan')):.4f}, "
                 f"val HR@10 {record.get('val/hr@10', float('nan')):.4f}, NDCG@10 {record.get('val/ndcg@10', float('nan')):.4f}")


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (its batches and optimizer steps, from the epoch's
    start to the start of its validation, or to its end when it has none) and of each
    validation pass, in seconds. The device is synchronised at each mark, so queued GPU work
    is counted in the phase that queued it."""

    def __init__(self) -> None:
        self.train_seconds: List[float] = []
        self.val_seconds: List[float] = []
        self._train_start: Optional[float] = None
        self._val_start: Optional[float] = None

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _end_train(self, pl_module: pl.LightningModule) -> None:
        if self._train_start is not None:
            self.train_seconds.append(self._now(pl_module) - self._train_start)
            self._train_start = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = self._now(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._end_train(pl_module)  # Lightning validates inside the epoch, before its end hook
        self._val_start = self._now(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self.val_seconds.append(self._now(pl_module) - self._val_start)
            self._val_start = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_train(pl_module)

    def summary(self) -> Dict[str, Any]:
        """``epoch_seconds`` / ``val_seconds``: per-epoch lists and their means (None if empty)."""
        def mean(xs: List[float]) -> Optional[float]:
            return round(float(np.mean(xs)), 4) if xs else None

        return {"epoch_seconds": [round(x, 4) for x in self.train_seconds], "epoch_seconds_mean": mean(self.train_seconds),
                "val_seconds": [round(x, 4) for x in self.val_seconds], "val_seconds_mean": mean(self.val_seconds)}


def save_checkpoint(path: str, model: torch.nn.Module, config: ExperimentConfig, extra: Dict[str, Any]) -> None:
    """Pickle-free checkpoint: tensors + the config and run facts as JSON metadata."""
    metadata = {"format": "gauss-plugins/retrieval-model/1", "config": json.dumps(config_to_dict(config)),
                "num_items": str(model.num_items), "extra": json.dumps(extra, default=str)}
    save_tensors(path, model_tensors(model), metadata)


def _seed(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


def _process_layout(config: ExperimentConfig):
    """``(devices, num_nodes)``: torchrun's environment when it started this process
    (Lightning's TorchElasticEnvironment then reads the ranks), else ``train.devices`` on one node."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if config.train.strategy == "gauss" and local and world:
        return int(local), max(1, int(world) // int(local))
    return config.train.devices, 1


def _rank() -> int:
    """This process's global rank: torchrun's RANK, the process group's, or Lightning's
    launcher's LOCAL_RANK (one node), 0 for a single process."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("LOCAL_RANK", 0))


def _silent(message: str) -> None:
    pass


def _strategy(config: ExperimentConfig) -> Any:
    if config.train.strategy != "gauss":
        return "auto"
    from gauss_integrations.lightning.strategy import GaussStrategy

    return GaussStrategy(budget_rows=config.train.cache_budget_rows, window=config.train.cache_window,
                         policy=config.train.cache_policy)


def _trainer(config: ExperimentConfig, max_epochs: int, callbacks: List[pl.Callback], progress: bool,
             check_val_every_n_epoch: int = 1, validate: bool = True) -> pl.Trainer:
    devices, num_nodes = _process_layout(config)
    return pl.Trainer(
        limit_val_batches=None if validate else 0,
        max_epochs=max_epochs,
        accelerator=config.train.accelerator,
        strategy=_strategy(config),
        devices=devices,
        num_nodes=num_nodes,
        # Several processes split the training batches (DistributedSampler); evaluation loaders
        # opt out (SequenceDataModule), so every rank ranks every user and metrics agree.
        use_distributed_sampler=devices * num_nodes > 1,
        logger=False,
        enable_checkpointing=False,   # pickle-free: see BestModelKeeper
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=check_val_every_n_epoch,
        callbacks=callbacks,
        deterministic=False,
    )


def _quiet_lightning() -> None:
    # Lightning's banners ("GPU available: False...") and the num_workers hint add nothing
    # to a CPU run on two cores (worker processes would only compete with the trainer).
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*smaller than the logging interval.*")
    # Under several processes every rank evaluates every user (SequenceDataModule): the logged
    # metrics are already the same everywhere, so Lightning's sync_dist advice does not apply.
    warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\(.*sync_dist=True.*")


def run_experiment(config: ExperimentConfig, output_dir: str, progress: bool = True,
                   log: Callable[[str], None] = print, sequences: Optional[UserSequences] = None) -> Dict[str, float]:
    """Train and evaluate ``config``; write the outputs listed in the module docstring.

    Returns the flat metrics (``val/...``, ``test/...``). ``sequences`` skips loading (the
    demo shares one load between models).
    """
    config.validate()
    if _rank() != 0:  # the other processes of a multi-process run say what rank 0 says
        log = _silent
    _quiet_lightning()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    if config.train.accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("--accelerator gpu was asked for but torch sees no CUDA device; use --accelerator cpu")
    t0 = time.time()
    seqs = sequences if sequences is not None else load_sequences(config)
    log(f"data: {seqs.describe()}")
    config.check_data(seqs)  # e.g. HSTU's time bias on data without timestamps: refuse before any output
    os.makedirs(output_dir, exist_ok=True)  # only once the data loaded: bad input leaves no folder behind
    _seed(config.train.seed)
    module = _build_module(config, seqs.max_item_id)
    model = module.model
    log(f"model: {config.model.arch}, dim {config.model.dim}, {config.model.num_blocks} blocks x "
        f"{config.model.num_heads} heads, item embeddings: {model.item_embeddings.kind}, "
        f"{sum(p.numel() for p in model.parameters())} dense-or-static parameters")
    if config.train.mode == "epoch":
        metrics, report, model = _run_epoch_mode(config, seqs, module, progress, log, output_dir)
    else:
        metrics, report = _run_streaming_mode(config, seqs, module, progress, log, output_dir)
    report.update({
        "name": config.name,
        "config": config_to_dict(config),
        "data": {"name": seqs.name, "users": seqs.num_users, "items": int(len(seqs.item_ids())),
                 "max_item_id": seqs.max_item_id, "events": seqs.num_events, "info": seqs.info},
        "item_embeddings": model.item_embeddings.kind,
        "wall_time_s": round(time.time() - t0, 1),
        "metrics": metrics,
    })
    if _rank() != 0:  # replicas end with the same model and metrics: rank 0 writes them
        return metrics
    save_checkpoint(os.path.join(output_dir, "model.safetensors"), model, config,
                    {"mode": config.train.mode, "selected_epoch": report.get("selected_epoch"),
                     "refit": bool(config.train.refit)})
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    write_json(os.path.join(output_dir, "report.json"), report)
    log(f"wrote {output_dir}/metrics.json, report.json, model.safetensors and the plot "
        f"({report['wall_time_s']:.0f} s)")
    return metrics


def _build_module(config: ExperimentConfig, num_items: int) -> RetrievalModule:
    # Under several processes each builds its table on its own GPU (a table is not moved with the module).
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if config.train.accelerator == "gpu" \
        else torch.device("cpu")
    model = build_model(config, num_items=num_items, device=device)
    return RetrievalModule(model, lr=config.optim.lr, betas=config.optim.betas, weight_decay=config.optim.weight_decay,
                           shared_negatives=config.loss.shared_negatives)


def _run_epoch_mode(config: ExperimentConfig, seqs: UserSequences, module: RetrievalModule, progress: bool,
                    log: Callable[[str], None], output_dir: str):
    split = leave_one_out(seqs)
    max_len = config.data.max_len
    devices, num_nodes = _process_layout(config)
    if config.train.refit and devices * num_nodes > 1:  # torchrun's environment can ask for several
        raise ValueError(f"train.refit runs in one process, but this run has {devices * num_nodes} processes; "
                         "set refit: false or start one process")
    datamodule = SequenceDataModule(
        TrainExamples(split.train, max_len),
        HeldOutExamples(split.val, max_len, config.data.exclude_history),
        HeldOutExamples(split.test, max_len, config.data.exclude_history),
        batch_size=config.train.batch_size, eval_batch_size=config.train.eval_batch_size, seed=config.train.seed)
    keeper = BestModelKeeper(config.train.monitor)
    timer = EpochTimer()
    callbacks: List[pl.Callback] = [ValidateLastEpoch(), keeper, timer]
    if not progress:
        callbacks.append(EpochLogger(log))
    if config.train.early_stopping_patience:
        callbacks.append(pl.callbacks.EarlyStopping(monitor=config.train.monitor, mode="max",
                                                    patience=config.train.early_stopping_patience,
                                                    check_on_train_epoch_end=False))
    trainer = _trainer(config, config.train.max_epochs, callbacks, progress, config.train.eval_every)
    t_fit = time.time()
    trainer.fit(module, datamodule=datamodule)
    fit_s = time.time() - t_fit
    fit_cache_stats = trainer.strategy.cache_stats() if hasattr(trainer.strategy, "cache_stats") else None
    epochs_trained = int(trainer.current_epoch)
    if keeper.best_state is None:
        raise RuntimeError("training ended before any validation; lower train.eval_every or raise max_epochs")
    keeper.restore(module.model)
    log(f"selected epoch {keeper.best_epoch} of {epochs_trained} by {config.train.monitor} = {keeper.best_score:.4f}")
    # Validation metrics of the selected model (recomputed, not copied from the log), then
    # the one and only test evaluation.
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val = dict(module.last_eval["val"])
    trainer.test(module, datamodule=datamodule, verbose=False)
    test = dict(module.last_eval["test"])
    report = {"mode": "epoch", "selected_epoch": keeper.best_epoch, "epochs_trained": epochs_trained,
              "monitor": config.train.monitor, "fit_s": round(fit_s, 1),
              "eval_users": len(split.test), "history": module.history, **timer.summary()}
    final = module
    if config.train.refit:
        # The selected model's test stays in the record (as test_selection_run/...), so a
        # refit's gain is visible; the reported test/... is the refit's.
        selection_test = {"test_selection_run/" + k[len("test/"):]: v for k, v in test.items()}
        final, test, refit_report = _refit(config, split, keeper.best_epoch, progress, log)
        test = {**test, **selection_test}
        report["refit"] = refit_report
    metrics = {**{k: v for k, v in val.items()}, **{k: v for k, v in test.items()}}
    if hasattr(trainer.strategy, "cache_stats"):  # strategy gauss: the embedding cache's totals of the fit
        report["cache"] = fit_cache_stats
        report["world_size"] = trainer.world_size
    if _rank() == 0:
        refit_note = ", refit on train+val" if config.train.refit else ""
        plot_history({config.model.arch: module.history}, os.path.join(output_dir, "training_curve.png"),
                     title=f"{config.name}: test HR@10 {test['test/hr@10']:.4f}, NDCG@10 {test['test/ndcg@10']:.4f} "
                           f"(epoch {keeper.best_epoch}{refit_note})")
    return metrics, report, final.model


def _refit(config: ExperimentConfig, split, epochs: int, progress: bool, log: Callable[[str], None]):
    """A fresh model (same seed, same settings) trained on the training prefixes plus the
    validation items for ``epochs`` epochs, with no validation (its targets are now training
    data), then tested once. Returns the module, its test metrics and a report."""
    _seed(config.train.seed)
    module = _build_module(config, split.sequences.max_item_id)
    datamodule = SequenceDataModule(
        TrainExamples(split.train_and_val, config.data.max_len), None,
        HeldOutExamples(split.test, config.data.max_len, config.data.exclude_history),
        batch_size=config.train.batch_size, eval_batch_size=config.train.eval_batch_size, seed=config.train.seed)
    timer = EpochTimer()
    log(f"refit: a fresh model on train+val for the selected {epochs} epochs")
    trainer = _trainer(config, epochs, [timer], progress, validate=False)
    t_fit = time.time()
    trainer.fit(module, datamodule=datamodule)
    fit_s = time.time() - t_fit
    trainer.test(module, datamodule=datamodule, verbose=False)
    test = dict(module.last_eval["test"])
    timing = timer.summary()
    report = {"epochs": int(epochs), "fit_s": round(fit_s, 1), "epoch_seconds_mean": timing.get("epoch_seconds_mean"),
              "train_examples": len(datamodule.train_set), "history": module.history}
    log(f"refit: test HR@10 {test['test/hr@10']:.4f} NDCG@10 {test['test/ndcg@10']:.4f} ({fit_s:.0f} s)")
    return module, test, report


def _run_streaming_mode(config: ExperimentConfig, seqs: UserSequences, module: RetrievalModule, progress: bool,
                        log: Callable[[str], None], output_dir: str):
    windows = stream_windows(seqs, config.streaming.num_windows)
    max_len = config.data.max_len
    records: List[Dict[str, float]] = []
    cache_stats: List[Dict[str, Any]] = []
    t_fit = time.time()
    for w in windows:
        if w.index >= 1 and len(w.eval_examples):
            dm = SequenceDataModule(None, None, HeldOutExamples(w.eval_examples, max_len, config.data.exclude_history),
                                    config.train.batch_size, config.train.eval_batch_size, config.train.seed)
            _trainer(config, 1, [], False).test(module, datamodule=dm, verbose=False)
            values = {k[len("test/"):]: v for k, v in module.last_eval["test"].items()}
            records.append({"window": w.index, "examples": len(w.eval_examples), **values})
            log(f"window {w.index}: {len(w.eval_examples)} targets, HR@10 {values['hr@10']:.4f}, "
                f"NDCG@10 {values['ndcg@10']:.4f} (before training on it)")
        if w.index < len(windows) - 1:
            train_set = TrainExamples(w.train_sequences, max_len, target_from=w.target_from, users=w.train_users)
            if len(train_set):
                dm = SequenceDataModule(train_set, None, None, config.train.batch_size, config.train.eval_batch_size,
                                        config.train.seed + w.index)
                trainer = _trainer(config, config.streaming.epochs_per_window, [], progress, validate=False)
                trainer.fit(module, datamodule=dm)
                if hasattr(trainer.strategy, "cache_stats"):
                    cache_stats.append({**trainer.strategy.cache_stats(), "stream_window": w.index})
    fit_s = time.time() - t_fit
    if len(records) < 2:
        raise RuntimeError("streaming needs at least two evaluated windows; use more data or more windows")
    middle, last = records[:-1], records[-1]
    weights = np.array([r["examples"] for r in middle], dtype=float)
    metrics: Dict[str, float] = {}
    for key in list(METRIC_KEYS) + ["mrr"]:
        metrics[f"val/{key}"] = float(np.average([r[key] for r in middle], weights=weights))
    for key in list(METRIC_KEYS) + ["mrr"]:
        metrics[f"test/{key}"] = float(last[key])
    report = {"mode": "streaming", "windows": records, "fit_s": round(fit_s, 1),
              "num_windows": config.streaming.num_windows, "epochs_per_window": config.streaming.epochs_per_window,
              "history": module.history}
    if cache_stats:
        report["cache"] = cache_stats
    if _rank() == 0:
        plot_stream({config.model.arch: records}, os.path.join(output_dir, "stream_metrics.png"),
                    title=f"{config.name}: metrics per window (evaluated before training on it)")
    return metrics, report

