"""The benchmark convention's JSON record."""
from __future__ import annotations

import json

from gauss_plugins.benchmarking import median_time, write_report


def test_report_has_the_convention_keys(tmp_path, capsys):
    path = tmp_path / "sub" / "r.json"
    write_report("demo", [{"x": 1}], {"ratio": 1.5}, str(path))
    data = json.loads(path.read_text())
    assert set(data) == {"benchmark", "machine", "results", "summary"}
    assert data["machine"]["torch"] and data["machine"]["date"] and data["summary"] == {"ratio": 1.5}
    assert capsys.readouterr().out.strip().splitlines()[-1] == "demo: ratio=1.5"
    assert not list(path.parent.glob("*.tmp*"))


def test_median_time_is_a_median():
    calls = []
    t = median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and t >= 0
