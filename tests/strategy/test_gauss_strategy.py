"""GaussStrategy: registration, options, the cached training step against a plain one, and
(slow) two gloo replicas against one process on the same global batches."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

sys.path.insert(0, os.path.dirname(__file__))  # the test model, also for ddp_spawn's workers

from strategy_testmodel import IdDataset, TinyModule, loader, table_rows  # noqa: E402

import gauss_integrations.lightning  # noqa: E402,F401  (registers the strategy)
from gauss_integrations.lightning.strategy import GaussStrategy  # noqa: E402
from gauss_plugins.embedding import SparseOptimizer  # noqa: E402
from gauss_plugins.serialization import load_tensors  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _trainer(strategy, devices=1, epochs=2, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices, strategy=strategy, logger=kw.pop("logger", False),
                      enable_progress_bar=False, enable_model_summary=False, **kw)


class _Plain(TinyModule):
    """The reference: no strategy, the table fully in memory, its sparse step after the dense one."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._sparse = SparseOptimizer(self.table)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        self._sparse.step()


def test_registered_under_its_names():
    from pytorch_lightning.strategies import StrategyRegistry

    assert "gauss" in StrategyRegistry
    trainer = _trainer("gauss")
    assert isinstance(trainer.strategy, GaussStrategy)
    assert trainer.strategy._start_method == "popen"
    with pytest.raises(ValueError, match="popen"):
        GaussStrategy(start_method="spawn")  # tables cannot be pickled into spawned workers


def test_elastic_is_checked_at_construction():
    # elastic=True itself is tested on a Ray cluster in tests/elastic/test_elastic_lightning.py
    with pytest.raises(TypeError, match="ElasticConfig"):
        GaussStrategy(elastic="yes")


@pytest.mark.parametrize("kw", [dict(budget_rows=0), dict(window=0), dict(min_window=5, window=2),
                                dict(sync_every_n_steps=0), dict(policy=3), dict(gather_on_end=False)])
def test_bad_options_are_refused(kw):
    with pytest.raises((ValueError, TypeError)):
        GaussStrategy(**kw)


@pytest.mark.parametrize("policy", ["lookahead", "lru"])
def test_cached_training_equals_plain_training(tmp_path, policy):
    """Budget 40 rows for ~107 ids: rows are evicted to TierPS and fetched back with their
    Adam state, and the result is the plain in-memory run's, exactly. Validation twice an
    epoch (the cache's pass is cut mid-epoch and resumed) reads every row, as the plain run does."""
    ds = IdDataset()
    val = loader(IdDataset(n=8, seed=1), 8)
    ref = _Plain()
    _trainer("auto", val_check_interval=0.5).fit(ref, loader(ds, 8), val)
    model = TinyModule()
    strategy = GaussStrategy(budget_rows=40, window=3, policy=policy, store_dir=str(tmp_path))
    _trainer(strategy, use_distributed_sampler=False, val_check_interval=0.5).fit(model, loader(ds, 8), val)
    assert len(model.val_sums) == len(ref.val_sums) == 5  # the sanity check and two an epoch
    for got, want in zip(model.val_sums, ref.val_sums):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    stats = strategy.cache_stats()
    assert stats["misses_at_use"] == (0 if policy == "lookahead" else stats["misses_at_use"])
    assert stats["evicted_rows"] > 0 and stats["written_back_rows"] > 0
    k_ref, rows_ref = table_rows(ref.table)
    k, rows = table_rows(model.table)  # gather_on_end: every trained row is back in the table
    assert torch.equal(k_ref, k)
    torch.testing.assert_close(rows, rows_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.dense.weight, ref.dense.weight, rtol=0, atol=1e-6)
    assert model.losses == pytest.approx(ref.losses, abs=1e-6)
    assert model.table.backing is None and not model.table.synchronized_replicas  # released after fit


def test_syncs_trained_rows_to_a_serving_store(tmp_path):
    """sync_target: the rank's TierPS partition is pushed to WePS by a Syncer; the cache is
    flushed every sync_every_n_steps; after fit the serving store holds the trained rows."""
    from gauss_plugins.stores import WePS

    weps = WePS(dim=8)
    model = TinyModule()
    strategy = GaussStrategy(budget_rows=40, window=3, store_dir=str(tmp_path), sync_target=weps,
                             sync_interval_s=0.05, sync_every_n_steps=3)
    _trainer(strategy, use_distributed_sampler=False).fit(model, loader(IdDataset(), 8))
    ids, rows = table_rows(model.table)
    got = weps.lookup(ids)
    assert bool(got.found.all())
    torch.testing.assert_close(got.values, rows.float(), rtol=0, atol=1e-6)
    assert not strategy.syncers  # stopped, after a final push


def test_lightning_checkpoints_hold_every_trained_row(tmp_path):
    """Lightning's own checkpoint (ModelCheckpoint, on by default) taken during training has
    the rows waiting in TierPS too, not only the cache's resident ones."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = TinyModule()
    strategy = GaussStrategy(budget_rows=40, window=3, store_dir=str(tmp_path / "store"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(strategy, epochs=1, use_distributed_sampler=False, enable_checkpointing=True,
             callbacks=[ckpt]).fit(model, loader(IdDataset(), 8))
    assert strategy.cache_stats()["evicted_rows"] > 0
    state = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
    restored = TinyModule()
    restored.load_state_dict(state)
    ids, rows = table_rows(model.table)
    ids_ckpt, rows_ckpt = table_rows(restored.table)
    assert ids.numel() > 40 and torch.equal(ids, ids_ckpt)
    torch.testing.assert_close(rows_ckpt, rows, rtol=0, atol=0)


def test_logs_cache_figures_per_step(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    model = TinyModule()
    strategy = GaussStrategy(budget_rows=40, window=3, store_dir=str(tmp_path / "store"))
    logger = CSVLogger(str(tmp_path), name="run")
    _trainer(strategy, epochs=1, logger=logger, log_every_n_steps=1, use_distributed_sampler=False).fit(
        model, loader(IdDataset(), 8))
    logger.save()
    import csv

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("gauss/hits_at_use")]
    assert len(logged) == 8  # one per step
    assert {"gauss/hits_at_use", "gauss/misses_at_use", "gauss/prefetched_rows", "gauss/prefetched_bytes",
            "gauss/stall_ms", "gauss/window"} <= set(rows[0])
    assert all(float(r["gauss/misses_at_use"]) == 0 for r in logged)
    assert sum(float(r["gauss/prefetched_rows"]) for r in logged) == strategy.cache_stats()["prefetched_rows"]


def test_a_store_dir_with_an_earlier_run_is_refused(tmp_path):
    _trainer(GaussStrategy(budget_rows=40, store_dir=str(tmp_path)), epochs=1,
             use_distributed_sampler=False).fit(TinyModule(), loader(IdDataset(), 8))
    model = TinyModule()
    with pytest.raises(ValueError, match="earlier run"):
        _trainer(GaussStrategy(budget_rows=40, store_dir=str(tmp_path)), epochs=1).fit(model, loader(IdDataset(), 8))
    assert model.table.backing is None and not model.table.synchronized_replicas  # nothing left attached


def test_module_without_ids_is_told_what_to_define(tmp_path):
    class NoIds(TinyModule):
        gauss_cache_ids = None

    with pytest.raises(ValueError, match="gauss_cache_ids"):
        _trainer(GaussStrategy(budget_rows=40, store_dir=str(tmp_path)), epochs=1).fit(NoIds(), loader(IdDataset(), 8))


def _world_of_one():
    import torch.distributed as dist

    if not dist.is_initialized():  # the in-process fits above may have made one already
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)


def test_reduced_gradients_step_like_the_recorded_ones():
    """reduce_row_gradients at world size 1 (sum over one replica): the step it leaves gives the
    same rows as the table's own records, repeated ids and the default row included."""
    from gauss_integrations.lightning.strategy import reduce_row_gradients

    _world_of_one()
    results = []
    for reduce in (False, True):
        model = TinyModule()
        ids = torch.tensor([[3, 5, 3, 0], [9, 5, 5, 7]])
        loss = model.table.lookup(ids, valid=ids > 0).pow(2).sum()
        loss.backward()
        if reduce:
            assert reduce_row_gradients(model.table, torch.tensor([3, 5, 7, 9])) == 4
        SparseOptimizer(model.table).step()
        results.append(table_rows(model.table))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-7)


def test_reducing_with_a_missing_id_is_refused_and_drops_the_step():
    from gauss_integrations.lightning.strategy import reduce_row_gradients

    _world_of_one()
    model = TinyModule()
    model.table.lookup(torch.tensor([3, 5, 11])).sum().backward()
    with pytest.raises(RuntimeError, match=r"gauss_cache_ids.*every id"):
        reduce_row_gradients(model.table, torch.tensor([3, 5]))
    assert not model.table.has_pending_grads  # nothing half-reduced is left to apply


# ---------------------------------------------------------------------------- two replicas
def _run(world: int, tmp_path, *extra: str):
    """tiny_fit.py under Lightning's popen launcher (it starts the script again for rank 1):
    dynamic tables cannot be pickled into ddp_spawn workers."""
    import subprocess

    out = tmp_path / (f"w{world}" + "".join(extra))
    out.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # A fresh job: Lightning picks the port, and no seed left by an earlier in-process fit
    # (seed_everything exports PL_GLOBAL_SEED, which reorders the DistributedSampler's batches).
    for key in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "tiny_fit.py"),
                           "--world", str(world), "--out", str(out), *extra], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [load_tensors(str(out / f"rank{r}.safetensors"))[0] for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["partitioned", "replicated"])
def test_two_gloo_replicas_equal_one_process(tmp_path, mode):
    """2 processes, each half of every global batch (Lightning's DistributedSampler), against
    1 process on the whole global batches: the same trained table (every row, gathered after
    fit) and the same dense weights, within 1e-5. A 40-row budget makes rows travel through
    the TierPS partitions. ``partitioned``: each replica caches only the rows it owns, borrows
    the rest of its batch's rows from their owner and sends their gradients back (all-to-all);
    ``replicated``: each caches the global batch's rows and all-reduces their gradients."""
    (one,) = _run(1, tmp_path)
    r0, r1 = _run(2, tmp_path, *(["--replicated"] if mode == "replicated" else []))
    for other in (r0, r1):
        assert torch.equal(one["ids"], other["ids"])
        torch.testing.assert_close(other["rows"], one["rows"], rtol=0, atol=1e-5)
        torch.testing.assert_close(other["w"], one["w"], rtol=0, atol=1e-5)
        torch.testing.assert_close(other["b"], one["b"], rtol=0, atol=1e-5)
    # The replicas are not just close to the reference: they are the same bits.
    assert torch.equal(r0["rows"], r1["rows"]) and torch.equal(r0["w"], r1["w"])
    # And the reference moved: the comparison is not between two untrained tables.
    assert (one["rows"] - TinyModule().table.lookup(one["ids"]).detach()).abs().max() > 1e-3


def test_an_owner_share_over_the_budget_fails_on_every_rank_alike():
    """Partitioned caches: each rank checks every owner's share of the global batch from the same
    exchanged ids, so all ranks raise together (not one, leaving the others in a collective)."""
    from gauss_integrations.lightning.strategy import _check_owned_fit
    from gauss_plugins.cache import BudgetError

    parts = [torch.tensor([0, 2, 4, 5]), torch.tensor([2, 6, 7])]  # rank 0 owns 0, 2, 4, 6; rank 1 owns 5, 7
    _check_owned_fit(parts, world=2, bound=4)
    with pytest.raises(BudgetError, match="rank 0 owns 4 distinct ids"):
        _check_owned_fit(parts, world=2, bound=3)
