"""benchmarks/elastic_recovery.py without a cluster: its command line, the pairing of each kill
with the first step after it in the baselines' logs, and the summary over our kills.

The benchmark itself (real SIGKILLs under torchrun, Ray Train and the elastic launcher) takes
minutes; `make bench` runs it with --quick.
"""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("elastic_recovery")


def test_help_lists_quick_and_json(bench, capsys):
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out


def test_unknown_system_is_refused(bench):
    with pytest.raises(SystemExit) as done:
        bench.main(["--systems", "torchrun,slurm"])
    assert done.value.code == 2


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_analyse_baseline_pairs_each_kill_with_the_restarted_step(bench, tmp_path):
    # Steps 1..30 by pid 1 (a checkpoint at 20), a kill after 30 at t=30.5, the restart resumes
    # at 21 at t=33; a second kill after step 50 has no step after it (the run hung).
    steps = [{"step": s, "t": float(s), "pid": 1, "resumed_from": 0} for s in range(1, 31)]
    steps += [{"step": s, "t": 12.0 + s, "pid": 2, "resumed_from": 20} for s in range(21, 51)]
    _write(tmp_path / "steps.jsonl", steps)
    (tmp_path / "kills.jsonl").write_text(json.dumps({"step": 30, "t_kill": 30.5, "ckpt_step": 20, "victim_pid": 9})
                                          + "\n" + json.dumps({"step": 50, "t_kill": 62.5, "ckpt_step": 40,
                                                               "victim_pid": 8}) + "\n{\"step\": 7")  # torn line
    out = bench.analyse_baseline(str(tmp_path))
    first, second = out["kills"]
    assert first == {"step": 30, "recovered": True, "recovery_s": 2.5, "steps_redone": 10, "resumed_from": 20}
    assert second == {"step": 50, "recovered": False}
    assert out["step_s"] == 1.0 and out["last_step"] == 50


def test_summary_takes_ours_and_the_faster_baseline(bench):
    cfg = bench.state_config("small")
    ours = bench.ours_row("small", cfg, {
        "kills": [{"rank": 0}, {"rank": 1}, {"rank": 0}],
        "recoveries": [{"first_step_after_s": 0.4, "steps_redone": 0}, {"first_step_after_s": 0.6, "steps_redone": 0}],
        "joins": [{"join_s": 7.0}, {"join_s": 9.0}], "error": "TimeoutError: third recovery", "lost_samples": 0,
        "duplicated_samples": 0, "samples_trained": 640, "checkpoint_reads": 0, "step_s": 0.02})
    torchrun = bench.baseline_row("torchrun", "small", cfg, {
        "kills": [{"step": 30, "recovered": True, "recovery_s": 3.0, "steps_redone": 10}], "step_s": 0.02,
        "finished": True, "rc": 0})
    ray_train = bench.baseline_row("Ray Train", "small", cfg, {
        "kills": [{"step": 30, "recovered": True, "recovery_s": 7.0, "steps_redone": 10}, {"step": 50, "recovered": False}],
        "step_s": 0.03, "finished": False, "error": "did not finish"})
    s = bench.summarize([ours, torchrun, ray_train])
    assert s["recovery_s"] == pytest.approx(0.5) and s["recovery_s_large"] is None
    assert s["kills_tried"] == 3 and s["kills_unrecovered"] == 1  # the kill without a recovery record
    assert s["baseline_restart_s"] == 3.0 and s["baseline_kills_tried"] == 3 and s["baseline_kills_unrecovered"] == 1
    assert s["steps_redone"] == 0 and s["join_s"] == 8.0 and s["lost_samples"] == 0
    assert ray_train["unrecovered"] == 1 and ray_train["error"] == "did not finish"
    assert cfg["state_bytes"] == 3 * 4 * cfg["params"]
