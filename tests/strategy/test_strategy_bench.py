"""The W-process GaussStrategy throughput runner behind the cache benchmark's scaling_2_workers."""
from __future__ import annotations

import pytest

pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")


@pytest.mark.slow
def test_scaling_runner_measures_one_and_two_processes():
    from gauss_integrations.lightning.strategy_bench import scaling

    result = scaling(rows=3_000, steps=8, budget_rows=1_500, window=4, warmup=2)
    assert result["batches_per_s_1"] > 0 and result["batches_per_s_2"] > 0
    assert result["scaling_2_workers"] == pytest.approx(result["batches_per_s_2"] / result["batches_per_s_1"])
    assert result["misses_at_use"] == 0
    assert [r["world"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        # Every rank reports its own steps; the slowest rank's median step sets the throughput.
        assert [r["rank"] for r in run["ranks"]] == list(range(run["world"]))
        assert all(r["steps_timed"] == 5 and r["cpu_ms_per_step"] > 0 for r in run["ranks"])
        assert run["batches_per_s"] == pytest.approx(1e3 / max(r["step_ms_median"] for r in run["ranks"]))
        assert len(run["cpu_ms_per_step_per_rank"]) == run["world"] and run["load_average_1m"] >= 0


def test_world_must_divide_the_global_batch(tmp_path):
    from gauss_integrations.lightning.strategy_bench import measure

    with pytest.raises(ValueError, match="divide"):
        measure(3, rows=100, steps=2, budget_rows=100, window=2, warmup=0, out=str(tmp_path / "x.json"))


def test_unknown_model_is_refused(tmp_path):
    from gauss_integrations.lightning.strategy_bench import measure

    with pytest.raises(ValueError, match="model must be one of"):
        measure(1, rows=100, steps=2, budget_rows=100, window=2, warmup=0, out=str(tmp_path / "x.json"), model="rnn")


@pytest.mark.slow
def test_control_runs_plain_ddp_without_table_or_cache():
    from gauss_integrations.lightning.strategy_bench import scaling

    result = scaling(rows=3_000, steps=8, budget_rows=1_500, window=4, warmup=2, cache=False, per_worker_batch=True)
    assert result["cache"] is False and result["per_worker_batch"] is True
    for run in result["runs"]:
        assert all(r["cache"] is False and r["global_batch_seqs"] == 32 * run["world"] for r in run["ranks"])
        assert run["sequences_per_s"] == pytest.approx(run["batches_per_s"] * 32 * run["world"])
    assert result["scaling_2_workers"] == pytest.approx(result["runs"][1]["sequences_per_s"]
                                                        / result["runs"][0]["sequences_per_s"])
