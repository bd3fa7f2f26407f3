"""Elastic training over NCCL on two GPUs of one host, on a real local Ray cluster.

The gloo tests (test_elastic_ray.py) see a dead peer's collectives fail at once. An NCCL collective
whose peer died hangs instead: the survivor must abort its communicator, form a new group and go
on. Here rank 1 SIGKILLs itself mid-step while rank 0 is already inside the step's all-reduce
(rank 1's loss sleeps first), so the survivor's recovery goes through that abort, which the test
checks in the failure the survivor reported. Needs 2 CUDA devices and Ray; run on the GPU machine
with ``scripts/device_run_nccl.sh``.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (the GPU image brings it from scripts/device_ray_bundle.sh)")

if torch.cuda.device_count() < 2:
    pytest.skip(f"needs 2 CUDA devices for 2 NCCL workers, this machine has {torch.cuda.device_count()}",
                allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))  # the shared checks beside this file
from elastic_testutil import assert_exactly_once, steps_seen, store_rows  # noqa: E402

from gauss_plugins.elastic.synthetic import (SyntheticIdStream, SyntheticRegressionStream,  # noqa: E402
                                             TableRegressionModel, make_adam, make_mlp, mse_loss, table_batch_ids,
                                             table_mse_loss)

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

RAY_DIR = "/tmp/gnccl"  # short: Ray's socket paths must stay under 107 bytes; the device script keeps its logs


@pytest.fixture
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.makedirs(RAY_DIR, exist_ok=True)
    # The loss and model classes below live in this test module, which the workers cannot import:
    # they travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=8, num_gpus=2, _temp_dir=RAY_DIR, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class Rank1DiesInStep:
    """:func:`mse_loss`; rank 1 first sleeps ``slow_s`` (rank 0, done with its backward, waits in
    the step's all-reduce meanwhile) and, on its ``kill_on``-th step, SIGKILLs its own process,
    once per job (``marker`` is created first: the replacement, a fresh process, does not die)."""

    def __init__(self, marker: str, kill_on: int = 6, slow_s: float = 0.3) -> None:
        self.marker, self.kill_on, self.slow_s, self.calls = marker, kill_on, slow_s, 0

    def __call__(self, model, batch):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            time.sleep(self.slow_s)
            self.calls += 1
            if self.calls >= self.kill_on:
                try:
                    os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
        return mse_loss(model, batch)


def test_nccl_peer_killed_in_an_all_reduce_survivor_aborts_regroups_and_a_replacement_joins(ray_cluster, tmp_path):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer

    marker = str(tmp_path / "killed")
    config = ElasticConfig(num_workers=2, min_workers=1, max_workers=2, batch_size=8, backend="nccl",
                           name="e12-nccl", step_timeout_s=60)
    trainer = ElasticTrainer(make_mlp, make_adam, Rank1DiesInStep(marker), SyntheticRegressionStream(16), config)
    try:
        trainer.start(timeout_s=240)

        def recovered_and_rejoined(st):
            return (bool(st["recoveries"]) and st["workers"] == 2 and len(st["joins"]) >= 1
                    and st["step"] >= st["recoveries"][0]["killed_at"] + 8)

        st = steps_seen(trainer, recovered_and_rejoined, timeout_s=240)
        assert os.path.exists(marker), "rank 1 never killed itself: the test did not exercise a death"
        rec = st["recoveries"][0]
        join = st["joins"][0]
        print(f"\nNCCL recovery: SIGKILL at step {rec['killed_at']}, first survivor step after "
              f"{rec['first_step_after_s']:.3f} s (world {rec['world']}), steps redone {rec['steps_redone']}, "
              f"replacement join {join['join_s']:.2f} s; failures: {st['failures']}")
        assert rec["steps_redone"] == 0 and rec["world"] == 1
        assert rec["first_step_after_s"] < 15, rec
        assert join["join_s"] < 120, join
        # The survivor was inside the all-reduce when its peer died: NCCL would have hung there,
        # so its recovery must have gone through aborting the communicator.
        assert any("aborted its NCCL collectives" in f["reason"] for f in st["failures"]), st["failures"]
        assert not st["errors"], st["errors"]
        st = assert_exactly_once(trainer)
        losses = [loss for _, loss in st["losses"]]
        assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, f"the loss did not fall: {losses}"
        # The replacement got its weights and Adam state from the live peer, over NCCL.
        digests = trainer.replica_digests()
        assert len(digests) == 2 and len(set(digests.values())) == 1, f"the replicas disagree: {digests}"
        assert trainer.status()["checkpoint_reads"] == 0
    finally:
        trainer.shutdown()


def make_cuda_table_model() -> TableRegressionModel:
    """The row tests' model with its dynamic table on the worker's GPU: under NCCL the row
    collectives move CUDA tensors."""
    return TableRegressionModel(device="cuda")


def test_nccl_rows_on_the_gpu_against_a_shared_store_survive_a_sigkill(ray_cluster, tmp_path):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer
    from gauss_integrations.ray.sharded_store import ShardedTierPS
    from gauss_plugins.embedding.backing import pack_state, state_layout

    probe = make_cuda_table_model().table
    store = ShardedTierPS(probe.dim, str(tmp_path / "ps"), num_shards=1,
                          state_dim=sum(w for _, _, w in state_layout(probe)), actor_options={"num_cpus": 0})
    config = ElasticConfig(num_workers=2, min_workers=1, max_workers=2, batch_size=8, backend="nccl",
                           name="e12-nccl-rows")
    trainer = ElasticTrainer(make_cuda_table_model, make_adam, table_mse_loss, SyntheticIdStream(num_ids=64), config,
                             stores={"items": store}, table_ids=table_batch_ids)
    driver = make_cuda_table_model()
    driver_opt = make_adam(list(driver.parameters()))
    try:
        trainer.start(timeout_s=240)
        trainer.run(steps=6, timeout_s=120)
        killed = {}

        def kill_then_rejoin(st):
            if not killed and st["step"] >= 8:
                killed["pid"] = trainer.kill_worker(1, signal.SIGKILL)
            return bool(killed) and st["workers"] == 2 and len(st["joins"]) >= 1 and st["step"] >= 20

        st = steps_seen(trainer, kill_then_rejoin, timeout_s=240)
        assert st["recoveries"] and st["recoveries"][0]["steps_redone"] == 0
        digests = trainer.replica_digests()
        assert len(digests) == 2 and len(set(digests.values())) == 1, f"the replicas disagree: {digests}"
        ack = trainer.write_rows()
        assert ack["acked_step"] == st["step"]
        assert trainer.fetch_state(driver, driver_opt) == st["step"]
        # The store (CPU, in its own actor) holds exactly the rows the GPU replicas trained.
        s_ids, s_values, s_state = store_rows(store)
        t_ids = driver.table.index.keys_and_rows()[0].sort().values
        rows = driver.table.find(t_ids)
        assert torch.equal(s_ids, t_ids.cpu()), "the store and the trained table hold different ids"
        assert torch.equal(s_values, driver.table.weight.index_select(0, rows).float().cpu())
        assert torch.equal(s_state, pack_state(driver.table, rows).cpu())
        st = assert_exactly_once(trainer)
        losses = [loss for _, loss in st["losses"]]
        assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, f"the loss did not fall: {losses}"
    finally:
        trainer.shutdown()
        store.close()
        shutil.rmtree(str(tmp_path / "ps"), ignore_errors=True)
