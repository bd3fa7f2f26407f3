"""benchmarks/serving.py follows the benchmark convention (the run itself compiles a package:
`make bench` runs it; here its command line and the pieces it measures with)."""
from __future__ import annotations

import pytest
import torch


def test_help_lists_quick_json_threads(load_benchmark, capsys):
    with pytest.raises(SystemExit) as done:
        load_benchmark("serving").main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--json" in out and "--threads" in out


def test_bad_threads_is_an_error(load_benchmark, capsys):
    assert load_benchmark("serving").main(["--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_mfalcon_comparison_counts_every_candidate(load_benchmark):
    bench = load_benchmark("serving")
    calls = []

    def call(h, lens, c):
        calls.append(c.shape[1])
        return torch.zeros(h.shape[0], c.shape[1])

    out = bench.mfalcon_compare(call, torch.zeros(2, 3, 4), torch.tensor([3, 1]), torch.zeros(2, 10, 4), 4)
    assert calls.count(10) == 4 and calls.count(1) == 5  # 1 + 3 timed full calls; 1 warm-up + 4 single calls
    assert out["timed_single_calls"] == 4 and out["per_candidate_s"] > 0 and out["one_pass_s"] > 0
    assert out["speedup"] == pytest.approx(out["per_candidate_s"] / out["one_pass_s"])


def test_percentile(load_benchmark):
    bench = load_benchmark("serving")
    xs = [float(i) for i in range(1, 101)]
    assert bench.percentile(xs, 0.5) in (50.0, 51.0) and bench.percentile(xs, 0.99) == 99.0
