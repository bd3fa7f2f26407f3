"""The benchmark scripts `make bench` runs: flags, skip records, the summary table, helpers.

The scripts themselves take a minute or more each (see `make bench`); here each one's
command line is checked, and every path that must not fail on a CPU machine (the GPU-only
skip, the missing-data skip) is run for real.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from gauss_plugins import benchmarking
from gauss_plugins.benchmarking import meets_target, write_report, write_skip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
MINE = ["embedding_lookup", "hash_table_gpu", "ml100k_seeds"]


@pytest.mark.parametrize("name", MINE)
def test_help_lists_quick_and_json(name, load_benchmark, capsys):
    with pytest.raises(SystemExit) as done:
        load_benchmark(name).main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out


def test_gpu_benchmark_records_a_skip_and_exits_0_without_cuda(tmp_path):
    out = tmp_path / "run" / "hash_table_gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU machine, even on a GPU host
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "hash_table_gpu.py"), "--quick", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert set(record) == {"benchmark", "machine", "skipped"}
    assert record["benchmark"] == "hash_table_gpu" and "CUDA" in record["skipped"]
    assert record["machine"]["torch"]
    assert proc.stdout.strip().splitlines()[-1].startswith("hash_table_gpu: skipped (needs a CUDA device")


def test_ml100k_quick_without_data_records_a_skip(tmp_path, load_benchmark, capsys):
    out = tmp_path / "ml100k_seeds.json"
    rc = load_benchmark("ml100k_seeds").main(["--quick", "--data-path", str(tmp_path / "nowhere" / "ml-100k"), "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert "ML-100K data not found" in record["skipped"] and "gauss data download" in record["skipped"]
    assert not (tmp_path / "nowhere").exists()
    # without --quick the missing data is an error, as before
    assert load_benchmark("ml100k_seeds").main(["--data-path", str(tmp_path / "nowhere" / "ml-100k"),
                                      "--out", str(tmp_path / "x.json")]) == 2
    assert "ml-100k" in capsys.readouterr().err


def test_targets_are_recorded_and_checked(tmp_path, capsys):
    path = tmp_path / "r.json"
    write_report("demo", [], {"ratio": 0.4, "bytes": 20}, str(path), targets={"ratio": ">= 0.5", "bytes": "<= 24"})
    assert json.loads(path.read_text())["targets"] == {"ratio": ">= 0.5", "bytes": "<= 24"}
    with pytest.raises(ValueError, match="targets must read like"):
        write_report("demo", [], {"ratio": 0.4}, str(tmp_path / "bad.json"), targets={"ratio": "at least 0.5"})
    assert not (tmp_path / "bad.json").exists()
    assert meets_target(0.4, ">= 0.5") is False and meets_target(20, "<= 24") is True
    assert meets_target("n/a", ">= 1") is None and meets_target(True, ">= 1") is None


def _summarize(load_benchmark, folder, capsys):
    rc = load_benchmark("summarize").main([str(folder)])
    return rc, capsys.readouterr().out


def test_summary_table_shows_values_targets_skips_and_failures(tmp_path, load_benchmark, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_report("fast", [], {"ratio": 0.4, "note": "x" * 100, "find_keys_per_s": 3e9, "find_target": 2e9},
                 str(run / "fast.json"), targets={"ratio": ">= 0.5"})
    write_skip("gpu_only", "needs a CUDA device", str(run / "gpu_only.json"))
    for name, rc in (("fast", 0), ("gpu_only", 0), ("broken", 1), ("slow", 124)):
        (run / f"{name}.rc").write_text(f"{rc}\n")
        (run / f"{name}.seconds").write_text("7\n")
    capsys.readouterr()
    rc, out = _summarize(load_benchmark, run, capsys)
    assert rc == 1  # two benchmarks failed
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("fast"))
    assert "ratio" in row and "0.4" in row and ">= 0.5" in row and row.endswith("MISSED")
    assert any("find_keys_per_s" in line and ">= 2e+09" in line and line.endswith("met") for line in lines)
    assert any("x" * 37 + "..." in line for line in lines)  # long strings are cut
    assert any(line.startswith("gpu_only") and line.endswith("skipped: needs a CUDA device") for line in lines)
    assert any(line.startswith("broken") and "FAILED: exit status 1" in line for line in lines)
    assert any(line.startswith("slow") and "FAILED: timed out" in line for line in lines)
    assert lines[-1] == "4 benchmarks: 1 ran, 1 skipped, 2 failed (broken, slow); 1 target(s) missed"
    for name in ("broken", "slow"):
        (run / f"{name}.rc").unlink()
        (run / f"{name}.seconds").unlink()
    rc, out = _summarize(load_benchmark, run, capsys)
    assert rc == 0 and out.splitlines()[-1].startswith("2 benchmarks: 1 ran, 1 skipped, 0 failed")
    (run / "fast.json").unlink()  # exit 0 but no record: the script ignored --json
    rc, out = _summarize(load_benchmark, run, capsys)
    assert rc == 1 and "FAILED: wrote no JSON" in out


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (apt-get install redis-server)")
def test_redis_server_helper_starts_kills_and_cleans_up():
    pytest.importorskip("redis")
    with benchmarking.RedisServer() as server:
        client = server.client(socket_timeout=5)
        assert client.ping()
        client.set("k", "v")
        server.kill()
        server.start()  # a restart on the same port comes back empty (no persistence)
        assert server.client(socket_timeout=5).get("k") is None
        workdir, proc = server.workdir, server.proc
    assert proc.poll() is not None and server.proc is None
    assert not os.path.exists(workdir)


def test_redis_server_helper_says_what_to_install(monkeypatch):
    monkeypatch.setattr(benchmarking.shutil, "which", lambda name: None)
    assert "apt-get install redis-server" in benchmarking.redis_skip_reason()
    with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
        benchmarking.RedisServer()


def test_summary_flattens_nested_records_and_flags_other_layouts(tmp_path, load_benchmark, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "compare.json").write_text(json.dumps(
        {"runs": [], "summary": {"hstu": {"test/hr@10": {"mean": 0.25, "std": 0.01, "values": [0.24, 0.26]}}}}))
    (run / "compare.rc").write_text("0")
    capsys.readouterr()
    rc, out = _summarize(load_benchmark, run, capsys)
    assert rc == 0
    assert any(line.startswith("compare") and "(record lacks benchmark, machine, results)" in line
               and line.endswith("NOT THE CONVENTION") for line in out.splitlines())
    assert any("hstu.test/hr@10" in line and "0.25" in line for line in out.splitlines())
