"""The gauss TorchX components through the real ``torchx`` CLI (local_cwd scheduler).

One chain, as a user runs it: ``gauss.train`` on a tiny synthetic config, ``gauss.export``
of its checkpoint (parity check, snapshot), ``gauss.serve_bench`` of the package with the
C++ runner beside the Python predictor. Each step is a separate ``torchx run`` process that
finds the components through this distribution's ``torchx.components`` entry point.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torchx", reason="the torchx extra is not installed: pip install 'gauss-plugins[torchx]'")
pytest.importorskip("pytorch_lightning", reason="gauss train needs the lightning extra")

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
TORCHX = os.path.join(BIN, "torchx")

# Small enough for a few seconds of training; no time bias, so the three-input ranker (and
# the C++ runner) serves it.
TINY = """
name: tiny-torchx
data:
  dataset: synthetic
  max_len: 12
  options: {num_users: 60, num_items: 80, mean_length: 15, num_topics: 4, seed: 1}
model: {arch: hstu, dim: 16, num_blocks: 1, num_heads: 1, attention_dim: 8, linear_dim: 8, dropout: 0.1,
        num_time_buckets: 0}
loss: {num_negatives: 16}
train: {max_epochs: 1, batch_size: 16, eval_every: 1}
"""


def torchx(cwd, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # The scheduler starts `python` / `torchrun` from PATH: this interpreter's first. The
    # working folder is a temporary one, as a user's project folder would be.
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([TORCHX, *args], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def test_builtins_lists_gauss_components_beside_torchx_ones(tmp_path):
    proc = torchx(tmp_path, "builtins")
    assert proc.returncode == 0, proc.stderr
    for name in ("gauss.train", "gauss.export", "gauss.serve_bench", "dist.ddp", "utils.echo"):
        assert name in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchx")
    (work / "tiny.yaml").write_text(TINY)
    train = torchx(work, "run", "-s", "local_cwd", "gauss.train", "--config", "tiny.yaml", "--output_dir", "run",
                   "--max_epochs", "1", "--seed", "3")
    export = serve = None
    if train.returncode == 0:
        export = torchx(work, "run", "-s", "local_cwd", "gauss.export", "--checkpoint", "run", "--out", "model.pt2",
                        "--snapshot", "items.gsnp")
    if export is not None and export.returncode == 0:
        serve = torchx(work, "run", "-s", "local_cwd", "gauss.serve_bench", "--package", "model.pt2", "--snapshot",
                       "items.gsnp", "--batch_sizes", "1,4", "--candidates", "16", "--iters", "3", "--runner", "True",
                       "--json", "bench.json")
    return {"work": work, "train": train, "export": export, "serve": serve}


def test_train_component_runs_gauss_train(chain):
    proc, work = chain["train"], chain["work"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr + proc.stdout
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/hr@10"] <= 1.0
    report = json.loads((work / "run" / "report.json").read_text())
    assert report["config"]["train"]["seed"] == 3 and report["config"]["train"]["max_epochs"] == 1
    assert (work / "run" / "model.safetensors").stat().st_size > 0


def test_export_component_writes_a_parity_checked_package(chain):
    proc, work = chain["export"], chain["work"]
    assert proc is not None, "gauss.train failed first"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "parity check: max |eager - compiled|" in out and "passed" in out
    assert (work / "model.pt2").stat().st_size > 0 and (work / "items.gsnp").stat().st_size > 0


def test_serve_bench_component_times_python_and_cpp(chain):
    proc, work = chain["serve"], chain["work"]
    assert proc is not None, "an earlier step of the chain failed"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / "bench.json").read_text())
    assert [r["batch"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["candidates_per_s"] > 0
        assert row["runner_requests_per_s"] > 0
    # The C++ runner and the Python predictor score the same requests identically.
    assert report["summary"]["cpp_vs_python_max_abs_diff"] <= 1e-6
    assert "machine" in report


@pytest.mark.parametrize("args, message", [
    (["gauss.train", "--config", "tiny.yaml", "--output_dir", "r", "--j", "1x2"],
     "starts 2 workers, but config 'tiny.yaml' trains in one process"),
    (["gauss.train", "--config", "tiny.yaml", "--output_dir", "r", "--max_epochs", "zero"],
     "--max_epochs must be an integer"),
    (["gauss.export", "--checkpoint", "run", "--out", "model.bin"], "--out must name a .pt2 file"),
    (["gauss.export", "--checkpoint", "run", "--out", "m.pt2", "--tolerance", "-1"], "--tolerance must be >= 0"),
    (["gauss.serve_bench", "--package", "m.pt2", "--runner", "True"], "--runner True needs --snapshot"),
    (["gauss.serve_bench", "--package", "m.pt2", "--batch_sizes", "1,x"], "--batch_sizes must be comma-separated"),
])
def test_bad_arguments_fail_before_anything_runs(tmp_path, args, message):
    (tmp_path / "tiny.yaml").write_text(TINY)
    proc = torchx(tmp_path, "run", "-s", "local_cwd", "--dryrun", *args, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_two_workers_train_one_data_parallel_model(tmp_path):
    # `strategy: gauss` trains one model over all workers: the ddp app starts two under
    # torchrun, they join one process group (gloo), and rank 0 alone writes the outputs.
    (tmp_path / "dp.yaml").write_text(TINY.replace("train: {max_epochs: 1,", "train: {strategy: gauss, max_epochs: 1,"))
    proc = torchx(tmp_path, "run", "-s", "local_cwd", "gauss.train", "--config", "dp.yaml", "--output_dir", "r",
                  "--j", "1x2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SUCCEEDED" in out and "MEMBER: 2/2" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["world_size"] == 2 and report["config"]["train"]["strategy"] == "gauss"
    assert out.count("wrote r/metrics.json") == 1  # one writer


def test_config_only_in_a_remote_image_is_submitted_with_a_warning(tmp_path):
    proc = torchx(tmp_path, "run", "-s", "local_cwd", "--dryrun", "gauss.train", "--config", "/image/only.yaml",
                  "--output_dir", "r", "--j", "2x2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is not readable here" in proc.stderr


def test_missing_torchx_extra_names_the_install(monkeypatch):
    from gauss_plugins._optional import MissingExtraError

    monkeypatch.setitem(sys.modules, "torchx", None)  # `import torchx` now fails as if not installed
    monkeypatch.delitem(sys.modules, "gauss_integrations.torchx.components", raising=False)
    with pytest.raises(MissingExtraError, match=r'pip install "gauss-plugins\[torchx\]"'):
        importlib.import_module("gauss_integrations.torchx.components")
