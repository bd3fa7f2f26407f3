"""Dynamic-table rows under elastic training on a real local Ray cluster: one shared
ShardedTierPS outlives the trainers; a SIGKILL right after an acknowledged write loses nothing."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time

import pytest

ray = pytest.importorskip("ray")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the shared checks beside this file
from elastic_testutil import store_rows  # noqa: E402
from gauss_plugins.elastic.synthetic import (SyntheticIdStream, TableRegressionModel, make_adam,  # noqa: E402
                                             table_batch_ids, table_mse_loss)
from gauss_plugins.embedding.backing import state_layout  # noqa: E402

pytestmark = pytest.mark.slow

RAY_DIR = "/tmp/ray_e12b"  # short: Ray's socket paths must stay under 107 bytes


@pytest.fixture
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.makedirs(RAY_DIR, exist_ok=True)
    ray.init(num_cpus=2, _temp_dir=RAY_DIR, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 << 20)
    yield
    ray.shutdown()
    shutil.rmtree(RAY_DIR, ignore_errors=True)


def _table_rows(table):
    from gauss_plugins.embedding.backing import pack_state

    ids = table.index.keys_and_rows()[0].sort().values
    rows = table.find(ids)
    return ids, table.weight.index_select(0, rows).float(), pack_state(table, rows)


def _assert_store_is(store, table):
    s_ids, s_values, s_state = store_rows(store)
    t_ids, t_values, t_state = _table_rows(table)
    assert torch.equal(s_ids, t_ids), "the store and the trained table hold different ids"
    assert torch.equal(s_values, t_values), "a stored row differs from the trained row"
    assert torch.equal(s_state, t_state), "a stored row's optimizer state differs from the trained one"
    return s_values.clone(), s_state.clone()


def _wait(predicate, trainer, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = trainer.status()
        if predicate(st):
            return st
        time.sleep(0.05)
    raise TimeoutError(f"status never matched: {trainer.status()}")


def test_rows_survive_a_sigkill_right_after_an_acknowledged_write(ray_cluster, tmp_path):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer
    from gauss_integrations.ray.sharded_store import ShardedTierPS

    probe = TableRegressionModel().table
    store = ShardedTierPS(probe.dim, str(tmp_path / "ps"), num_shards=1,
                          state_dim=sum(w for _, _, w in state_layout(probe)), actor_options={"num_cpus": 0})
    config = ElasticConfig(num_workers=3, min_workers=1, max_workers=4, batch_size=8, name="e12b-rows")
    trainer = ElasticTrainer(TableRegressionModel, make_adam, table_mse_loss, SyntheticIdStream(num_ids=64),
                             config, stores={"items": store}, table_ids=table_batch_ids)
    driver = TableRegressionModel()
    driver_opt = make_adam(list(driver.parameters()))
    try:
        trainer.start()
        st = trainer.run(steps=8, timeout_s=60)
        # While training ran, rank 0 wrote step s's rows only after step s + 1's all-reduce.
        assert st["rows_acked"] is not None and st["rows_acked"]["step"] == st["step"] - 1
        ack = trainer.write_rows()  # paused at a committed step: its rows are acknowledged now
        assert ack["acked_step"] == st["step"] == 8
        assert trainer.fetch_state(driver, driver_opt) == 8
        acked_values, acked_state = _assert_store_is(store, driver.table)

        # SIGKILL rank 0 right after the store acknowledged its write.
        killed = trainer.kill_worker(0, signal.SIGKILL)
        _wait(lambda s: s["generation"] >= 2 and killed not in [m["pid"] for m in s["members"]], trainer)
        s_ids, s_values, s_state = store_rows(store)
        assert torch.equal(s_values, acked_values) and torch.equal(s_state, acked_state), \
            "an acknowledged row update was lost or changed by the trainer's death"

        # Train on; kill a member mid-run too (its step is abandoned and re-assigned).
        killed_mid = {}

        def kill_once(s):
            if not killed_mid and s["step"] >= 11 and s["workers"] >= 2:
                ranks = sorted(m["rank"] for m in s["members"])
                killed_mid["pid"] = trainer.kill_worker(ranks[-1], signal.SIGKILL)
            # Both replacements joined (a join is recorded when their group commits a step).
            return s["step"] >= 20 and bool(killed_mid) and len(s["joins"]) >= 2

        st = trainer.run_until(kill_once, timeout_s=90)
        assert killed_mid and st["step"] >= 20

        digests = trainer.replica_digests()
        assert len(digests) == 3 and len(set(digests.values())) == 1, f"the replicas disagree: {digests}"
        trainer.write_rows()
        assert trainer.fetch_state(driver, driver_opt) == st["step"]
        _assert_store_is(store, driver.table)

        ledger = trainer.sample_ledger()
        assert sorted(ledger) == list(range(st["cursor"])) and set(ledger.values()) == {1}
        losses = [loss for _, loss in st["losses"]]
        assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, f"the loss did not fall: {losses}"
        assert len(st["recoveries"]) >= 2
    finally:
        trainer.shutdown()
        store.close()
