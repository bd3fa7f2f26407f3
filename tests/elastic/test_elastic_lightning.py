"""``Trainer(strategy=GaussStrategy(elastic=True))`` on a real local Ray cluster: the main job's
HSTU retrieval model trains on 3 replicas, one is SIGKILLed mid-step, fit goes on and ends with
every sample trained exactly once and a falling loss."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")
ray = pytest.importorskip("ray")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from gauss_integrations.lightning import GaussStrategy, RetrievalModule, SequenceDataModule  # noqa: E402
from gauss_integrations.lightning.elastic import ElasticLauncher, LoaderStream  # noqa: E402
from gauss_integrations.ray.elastic import ElasticConfig  # noqa: E402
from gauss_plugins.data.split import leave_one_out  # noqa: E402
from gauss_plugins.elastic.synthetic import (SyntheticIdStream, TableRegressionModel, table_batch_ids,  # noqa: E402
                                             table_mse_loss)
from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig  # noqa: E402
from gauss_plugins.data.synthetic import synthetic_event_stream  # noqa: E402
from gauss_plugins.models import build_model  # noqa: E402
from gauss_plugins.train.batching import HeldOutExamples, TrainExamples, collate_train  # noqa: E402
from gauss_plugins.train.config import config_from_dict  # noqa: E402

MAX_LEN = 20
EPOCHS = 20  # ~300 steps of ~0.1 s: room for the replacement (a Ray actor start, ~20 s) to join


class SlowRetrievalModule(RetrievalModule):
    """The main job's module with a sleep in its step: most of a step is then "mid-step", where
    the test's kill lands (the replicas run this class: it travels to them by value)."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.08)
        return super().training_step(batch, batch_idx)


def _job(item_embedding="static", lr=5e-3):
    seqs = synthetic_event_stream(num_users=240, num_items=300, mean_length=25, seed=0)
    split = leave_one_out(seqs)
    cfg = config_from_dict({
        "data": {"dataset": "synthetic", "max_len": MAX_LEN},
        "model": {"arch": "hstu", "dim": 16, "num_blocks": 1, "attention_dim": 8, "linear_dim": 8,
                  "num_time_buckets": 0, "item_embedding": item_embedding},
        "loss": {"num_negatives": 16, "shared_negatives": True},
    })
    torch.manual_seed(0)
    module = SlowRetrievalModule(build_model(cfg, num_items=seqs.max_item_id), lr=lr, shared_negatives=True)
    data = SequenceDataModule(TrainExamples(split.train, MAX_LEN), HeldOutExamples(split.val, MAX_LEN),
                              HeldOutExamples(split.test, MAX_LEN), batch_size=8, eval_batch_size=64, seed=0)
    return module, data


def _trainer(strategy, **kw):
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def _config(**kw):
    # Ray's socket paths must stay short: a temp dir of this test's own under /tmp.
    return ElasticConfig(num_workers=3, min_workers=1, max_workers=4,
                         ray_temp_dir=tempfile.mkdtemp(prefix="ray_e12", dir="/tmp"), **kw)



def _status(job):
    """The elastic job's status, or None while it starts or shuts down."""
    try:
        return job.status() if job is not None else None
    except Exception:  # the job is shutting down between the check and the call
        return None


def _fit_while_watching(strategy, trainer, watch, *args, **kwargs):
    """``trainer.fit(*args, **kwargs)`` in a thread; ``watch(job, status)`` every 20 ms while
    it runs (status None while the job starts or stops). The fit's error is re-raised here;
    the job's Ray temp dir is removed either way."""
    failure = []

    def fit():
        try:
            trainer.fit(*args, **kwargs)
        except BaseException as exc:  # re-raised below, in the test's thread
            failure.append(exc)

    fitting = threading.Thread(target=fit)
    fitting.start()
    try:
        while fitting.is_alive():
            job = strategy.launcher.elastic
            watch(job, _status(job))
            time.sleep(0.02)
    finally:
        fitting.join(timeout=300)
        shutil.rmtree(strategy._elastic.ray_temp_dir, ignore_errors=True)
    if failure:
        raise failure[0]

def test_elastic_option_builds_the_ray_launcher_and_refuses_nonsense():
    strategy = GaussStrategy(elastic=True)
    trainer = _trainer(strategy, max_epochs=1)
    assert isinstance(trainer.strategy.launcher, ElasticLauncher)
    with pytest.raises(TypeError, match="True or a gauss_integrations.ray.elastic.ElasticConfig"):
        GaussStrategy(elastic="yes")


def test_loader_stream_is_an_epoch_permutation_per_index_block():
    data = list(range(10))
    stream = LoaderStream(data, lambda xs: torch.tensor(xs), shuffle=True, seed=3)
    first = stream.batch(torch.arange(0, 10))
    assert sorted(first.tolist()) == data and first.tolist() != data      # one epoch: each sample once, shuffled
    second = stream.batch(torch.arange(10, 20))
    assert sorted(second.tolist()) == data and second.tolist() != first.tolist()  # the next epoch reshuffles
    assert stream.batch(torch.arange(5, 15)).tolist() == first.tolist()[5:] + second.tolist()[:5]
    with pytest.raises(ValueError, match="empty"):
        LoaderStream([], collate_train, shuffle=False, seed=0)


class TableModule(pl.LightningModule):
    """A dynamic table and a linear head (gauss_plugins.elastic.synthetic) as a LightningModule."""

    def __init__(self, **table_options):
        super().__init__()
        self.net = TableRegressionModel()
        if table_options:  # a table the elastic path must refuse
            self.net.table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=8, **table_options))

    def training_step(self, batch, batch_idx):
        time.sleep(0.03)  # most of a step is "mid-step", where the test's kill lands
        return table_mse_loss(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)

    def gauss_cache_ids(self, batch):
        return table_batch_ids(batch)


def _id_loader(n=240):
    stream = SyntheticIdStream(num_ids=64)
    ids, y = stream.batch(torch.arange(n))
    return torch.utils.data.DataLoader(list(zip(ids, y)), batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def test_dynamic_tables_replicas_could_disagree_on_are_refused_before_any_worker_starts():
    trainer = _trainer(GaussStrategy(elastic=True), max_epochs=1)
    with pytest.raises(ValueError, match="eviction"):
        trainer.fit(TableModule(eviction="lru"), _id_loader())
    assert not ray.is_initialized()


@pytest.mark.slow
def test_fit_trains_a_dynamic_table_through_a_sigkill():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import tests/
    module, loader = TableModule(), _id_loader()
    strategy = GaussStrategy(elastic=_config())
    trainer = _trainer(strategy, max_epochs=6)
    launcher, killed = strategy.launcher, {}

    def watch(job, st):
        if st is not None and not killed and st["generation"] >= 1 and (st["rows_acked"] or {}).get("step", 0) >= 5:
            killed["pid"] = job.kill_worker(0, signal.SIGKILL)  # rank 0: the one that writes rows

    _fit_while_watching(strategy, trainer, watch, module, loader)
    assert killed, "fit ended before the kill"
    res = launcher.result
    st = res["status"]
    assert res["lost"] == 0 and res["duplicated"] == 0 and st["cursor"] >= 6 * 240
    assert len(st["recoveries"]) == 1 and st["rows_acked"]["step"] >= st["step"] - 1
    losses = [loss for _, loss in st["losses"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    # The driver's module holds the whole trained table: every id of the data has its row.
    assert bool(module.net.table.contains(torch.arange(64)).all())


def test_what_an_elastic_fit_cannot_honour_is_refused_before_any_worker_starts():
    from gauss_integrations.lightning.elastic import _single_optimizer

    module, data = _job()
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        _trainer(GaussStrategy(elastic=True), max_epochs=1, accumulate_grad_batches=2).fit(module, datamodule=data)
    with pytest.raises(ValueError, match="ckpt_path"):
        _trainer(GaussStrategy(elastic=True), max_epochs=1).fit(module, datamodule=data, ckpt_path="last.ckpt")
    assert not ray.is_initialized()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    assert _single_optimizer([opt]) is opt and _single_optimizer({"optimizer": opt}) is opt
    with pytest.raises(ValueError, match="LR schedulers"):
        _single_optimizer({"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)})
    with pytest.raises(ValueError, match="exactly one optimizer"):
        _single_optimizer([opt, opt])


@pytest.mark.slow
def test_fit_survives_a_sigkill_mid_step_with_every_sample_once():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas cannot import tests/
    module, data = _job()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    strategy = GaussStrategy(elastic=_config())
    trainer = _trainer(strategy, max_epochs=EPOCHS)
    launcher = strategy.launcher
    seen, killed = [], {}

    def watch(job, st):
        if st is not None and st["generation"] >= 1:
            seen.append(st["step"])
            if not killed and st["step"] >= 3:
                killed["step"] = st["step"]
                killed["pid"] = job.kill_worker(1, signal.SIGKILL)

    _fit_while_watching(strategy, trainer, watch, module, datamodule=data)
    assert killed, "fit ended before the kill"
    assert seen == sorted(seen), f"the step counter went back: {seen}"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    res = launcher.result
    st = res["status"]
    total = EPOCHS * len(data.train_set)
    assert st["cursor"] >= total and res["samples"] == st["cursor"]
    assert res["lost"] == 0 and res["duplicated"] == 0
    [rec] = st["recoveries"]
    assert rec["steps_redone"] == 0 and rec["killed_at"] >= killed["step"]
    assert len(st["joins"]) == 1, st  # the replacement joined by broadcast from a live peer
    assert st["workers"] == 3
    assert st["checkpoint_reads"] == 0
    losses = [loss for _, loss in st["losses"]]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    # The driver holds the trained state, and Lightning's counters say what was trained.
    assert trainer.global_step == st["step"] and trainer.state.finished
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["val/hr@10"] <= 1.0
