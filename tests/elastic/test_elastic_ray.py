"""Elastic training on a real local Ray cluster: SIGKILL mid-step, scaling 2->3->2, a kill during a
scale-up, a lost coordinator and the disaster checkpoint."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import pytest

ray = pytest.importorskip("ray")

sys.path.insert(0, os.path.dirname(__file__))  # the shared checks beside this file
from elastic_testutil import assert_exactly_once, steps_seen  # noqa: E402
from gauss_plugins.elastic.state import latest_disaster_checkpoint  # noqa: E402
from gauss_plugins.elastic.synthetic import SlowLoss, SyntheticRegressionStream, make_adam, make_mlp  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="gel", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _trainer(workers, **cfg):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer

    config = ElasticConfig(num_workers=workers, min_workers=1, max_workers=4, batch_size=8, **cfg)
    return ElasticTrainer(make_mlp, make_adam, SlowLoss(0.02), SyntheticRegressionStream(16), config)


def test_sigkill_mid_step_survivors_continue_and_a_replacement_joins(ray_cluster, tmp_path):
    trainer = _trainer(3, disaster_checkpoint_every=5, checkpoint_dir=str(tmp_path)).start()
    killed = {}

    def kill_at_step_10_then_wait_for_the_replacement(st):
        if not killed and st["step"] >= 10:
            # The recovery path must never read a disaster checkpoint: make the one there unreadable.
            with open(latest_disaster_checkpoint(str(tmp_path)), "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\xde\xad\xbe\xef")
            killed["step"] = st["step"]
            trainer.kill_worker(1, signal.SIGKILL)  # training runs: the loss's sleep makes this mid-step
        return bool(killed) and st["workers"] == 3 and len(st["joins"]) == 1 and st["step"] >= killed["step"] + 15

    try:
        st = steps_seen(trainer, kill_at_step_10_then_wait_for_the_replacement)
        [rec] = st["recoveries"]
        assert rec["steps_redone"] == 0 and rec["killed_at"] >= killed["step"]
        assert rec["world"] == 2 and rec["first_step_after_s"] < 15
        # Where the seconds went: the coordinator's events and both survivors' phases, in order.
        events = rec["timeline"]
        assert events["generation_formed"] <= events["first_step_committed"] == rec["first_step_after_s"]
        assert len(rec["worker_timelines"]) == 2
        for phases in rec["worker_timelines"].values():
            assert phases["joined"] <= phases["group_formed"] <= phases["step_started"] <= phases["optimizer_done"]
        assert st["joins"][0]["join_s"] < 60
        assert st["checkpoint_reads"] == 0
        assert_exactly_once(trainer)
        losses = [loss for _, loss in st["losses"]]
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    finally:
        trainer.shutdown()


def test_scale_2_3_2_while_training_through_the_cli(ray_cluster, capsys):
    from gauss_plugins.cli import main

    trainer = _trainer(2).start()
    try:
        trainer.run(steps=5)
        assert main(["elastic", "scale", "--workers", "3"]) == 0
        # a join counts once the new worker's generation committed a step
        st = steps_seen(trainer, lambda s: s["workers"] == 3 and len(s["joins"]) == 1)
        gen3, step3 = st["generation"], st["step"]
        trainer.scale(2)
        st = steps_seen(trainer, lambda s: s["workers"] == 2 and s["generation"] > gen3
                         and s["step"] >= step3 + 5)
        assert st["recoveries"] == [] and len(st["joins"]) == 1, st
        assert main(["elastic", "status"]) == 0
        assert '"workers": 2' in capsys.readouterr().out
        assert main(["elastic", "scale", "--workers", "9"]) == 2
        assert "allows 1..4" in capsys.readouterr().err
        with pytest.raises(ValueError, match="1..4"):
            trainer.scale(0)
        assert_exactly_once(trainer)
    finally:
        trainer.shutdown()
    assert main(["elastic", "status"]) == 2
    assert "no elastic coordinator named 'gauss-elastic'" in capsys.readouterr().err


def test_kill_during_scale_up(ray_cluster):
    trainer = _trainer(2).start()
    try:
        trainer.run(steps=5)
        trainer.scale(3)
        killed = []

        def kill_while_the_new_worker_starts(st):
            if not killed and st["step"] >= 8:
                killed.append(trainer.kill_worker(0))
            return bool(killed) and st["workers"] == 3 and st["step"] >= 20

        st = steps_seen(trainer, kill_while_the_new_worker_starts)
        assert st["generation"] >= 3  # the kill, then the joins
        assert len(st["recoveries"]) == 1 and st["recoveries"][0]["steps_redone"] == 0
        assert_exactly_once(trainer)
    finally:
        trainer.shutdown()


def test_coordinator_killed_clear_error_then_disaster_checkpoint(ray_cluster, tmp_path):
    from gauss_integrations.ray.elastic import ElasticCoordinatorLost
    from gauss_plugins.elastic.state import load_disaster_checkpoint

    trainer = _trainer(2, disaster_checkpoint_every=5, checkpoint_dir=str(tmp_path)).start()
    try:
        first_run = dict(trainer.run(steps=12)["losses"])
        os.kill(trainer.coordinator_pid(), signal.SIGKILL)
        with pytest.raises(ElasticCoordinatorLost, match="from_checkpoint=.*disaster-step0000000010"):
            trainer.run(steps=5)
    finally:
        trainer.shutdown()
    latest = latest_disaster_checkpoint(str(tmp_path))
    step, cursor = load_disaster_checkpoint(latest)
    assert (step, cursor) == (10, 10 * 2 * 8)
    again = _trainer(2).start(from_checkpoint=latest)
    try:
        st = again.status()
        assert st["step"] == 10 and st["cursor"] == cursor and st["checkpoint_reads"] == 1
        st = again.run(steps=5)
        assert st["step"] == 15
        assert_exactly_once(again, start=cursor)
        # resumed from step 10's weights and optimizer state: step 11 repeats the first run's step 11
        assert st["losses"][0][0] == 11
        assert abs(st["losses"][0][1] - first_run[11]) < 1e-4 * max(1.0, first_run[11]), (st["losses"], first_run)
    finally:
        again.shutdown()


def test_hung_worker_is_detected_by_heartbeat_and_replaced(ray_cluster):
    trainer = _trainer(3, heartbeat_s=0.2, dead_after_s=1.5).start()
    hung = {}

    def stop_rank_2_then_wait(st):
        if not hung and st["step"] >= 5:
            hung["pid"] = trainer.kill_worker(2, signal.SIGSTOP)  # alive but silent: only heartbeats see it
        return bool(hung) and len(st["recoveries"]) == 1 and st["workers"] == 3 and len(st["joins"]) == 1

    try:
        st = steps_seen(trainer, stop_rank_2_then_wait)
        assert st["recoveries"][0]["steps_redone"] == 0
        assert st["recoveries"][0]["first_step_after_s"] < 20  # dead_after_s, a kill, a regroup
        assert any("no heartbeat" in e for e in st["errors"])
        assert_exactly_once(trainer)
    finally:
        trainer.shutdown()
        try:
            os.kill(hung["pid"], signal.SIGKILL)  # never leave a stopped process behind
        except (KeyError, ProcessLookupError):
            pass


def test_an_error_in_user_code_stops_training_with_it(ray_cluster):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer, ElasticWorkerError
    from gauss_plugins.elastic.synthetic import mse_loss

    # the model takes 16 features, the stream makes 8: every step fails the same way on every worker
    trainer = ElasticTrainer(make_mlp, make_adam, mse_loss, SyntheticRegressionStream(8),
                             ElasticConfig(num_workers=2, batch_size=4)).start()
    try:
        with pytest.raises(ElasticWorkerError, match="stream, model or loss.*mat1 and mat2"):
            trainer.run(steps=3, timeout_s=60)
        assert trainer.status()["step"] == 0
    finally:
        trainer.shutdown()


def test_backlog_policy_scales_up_then_down(ray_cluster, tmp_path):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer

    feed = tmp_path / "arrived"
    feed.write_text("0")
    config = ElasticConfig(num_workers=1, min_workers=1, max_workers=3, batch_size=8, backlog_samples_per_worker=1000,
                           dead_after_s=10.0)
    trainer = ElasticTrainer(make_mlp, make_adam, SlowLoss(0.02), SyntheticRegressionStream(16, arrived_file=str(feed)),
                             config).start()
    try:
        trainer.run(steps=3)
        feed.write_text(str(trainer.status()["cursor"] + 100_000))  # a burst far behind: max_workers (3)
        st = steps_seen(trainer, lambda s: s["workers"] == 3 and len(s["joins"]) == 2)
        assert st["target"] == 3
        feed.write_text("0")  # drained: back to min_workers
        st = steps_seen(trainer, lambda s: s["workers"] == 1 and s["target"] == 1 and s["step"] > st["step"] + 3)
        assert st["errors"] == [] and st["recoveries"] == []
        assert_exactly_once(trainer)
    finally:
        trainer.shutdown()


def test_a_survivor_abandons_the_in_flight_step_mid_forward(ray_cluster):
    from gauss_integrations.ray.elastic import ElasticConfig, ElasticTrainer
    from gauss_plugins.elastic.synthetic import make_slow_mlp, mse_loss

    # A step is a 1 s forward (10 pauses of 0.1 s): the kill lands 0.3 s into one.
    trainer = ElasticTrainer(make_slow_mlp, make_adam, mse_loss, SyntheticRegressionStream(16),
                             ElasticConfig(num_workers=2, min_workers=1, max_workers=2, batch_size=4)).start()
    killed = {}

    def kill_mid_forward(st):
        if not killed and st["step"] >= 2:
            time.sleep(0.3)
            killed["pid"] = trainer.kill_worker(1)
        return bool(killed) and len(st["recoveries"]) == 1 and st["step"] >= 4

    try:
        st = steps_seen(trainer, kill_mid_forward, timeout_s=120)
        # The survivor stopped its forward when the coordinator learnt of the death, instead of
        # finishing the step's forward and backward to fail at the all-reduce.
        assert any("_StepAbandoned" in f["reason"] for f in st["failures"]), st["failures"]
        assert st["recoveries"][0]["steps_redone"] == 0
        assert_exactly_once(trainer)
    finally:
        trainer.shutdown()
