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
    assert [r["world"] for r in result["runs"]] == [1, 2] and all(r["steps_timed"] == 5 for r in result["runs"])


def test_world_must_divide_the_global_batch(tmp_path):
    from gauss_integrations.lightning.strategy_bench import measure

    with pytest.raises(ValueError, match="divide"):
        measure(3, rows=100, steps=2, budget_rows=100, window=2, warmup=0, out=str(tmp_path / "x.json"))
