"""The demo's last step on a model with a time bias: export (the timed program, five
inputs, retrieval head), parity, and ranking real users' held-out items through the .pt2
with event times, each rank equal to the one under the evaluation's score."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from export_cases import tiny_config, write_checkpoint  # noqa: E402

from gauss_plugins.export.aoti import load_package  # noqa: E402
from gauss_plugins.export.demo import export_and_rank  # noqa: E402

pytestmark = pytest.mark.slow  # one AOTInductor compile


def test_export_and_rank_with_times(tmp_path):
    from gauss_plugins.train.config import with_overrides

    config = with_overrides(tiny_config(num_time_buckets=8), data__dataset="synthetic", data__path=None,
                            data__options={"num_users": 20, "num_items": 40, "mean_length": 15, "seed": 0})
    write_checkpoint(str(tmp_path / "run"), config, num_items=40, seen=40)
    lines = []
    out = export_and_rank(str(tmp_path / "run"), str(tmp_path / "serving"), log=lines.append, users=3, candidates=5)
    text = "\n".join(lines)
    assert "parity check" in text and "passed" in text and "(retrieval head, with event times)" in text
    assert out["parity_max_abs_diff"] <= 1e-5 and out["served_max_abs_diff"] <= 1e-5
    assert len(out["held_out_ranks"]) == 3 and all(1 <= r <= 5 for r in out["held_out_ranks"] + out["retrieval_ranks"])
    assert out["held_out_ranks"] == out["retrieval_ranks"] and out["ranks_agree"]
    assert "ranks equal the evaluation's for all 3 users" in text
    meta = load_package(out["package"]).metadata
    assert meta["head"] == "retrieval"
    assert meta["input_names"] == "history,history_len,candidates,history_time,candidate_time"
