"""gauss-runner (the C++ server of a .pt2 ranker) on a toy package with the agreed signature.

The toy program has the ranker's interface (history [B, N, D], history_len [B], candidates
[B, M, D] -> [B, M]) and depends on every input, on the padding rule and on the candidate
order, so a wrong gather, a wrong length or a shuffled row shows in the scores. The runner's
scores are compared with the same package loaded in Python and fed by
:func:`python_scores`, a direct transcription of the runner's request rules; the real HSTU
ranker against the Python Predictor is in ``test_runner_hstu.py``.

Building the runner (about a minute) and compiling the package (10-30 s) make these slow.
"""
from __future__ import annotations

import os
import struct
import subprocess
import zlib

import pytest
import torch

from gauss_plugins.export.runner import (RunnerBuildError, RunnerError, build_runner, build_skip_reason, find_runner,
                                         run_runner, runner_has_redis)
from gauss_plugins.export.snapshot import write_snapshot

pytestmark = pytest.mark.slow


def skip_unless_required(reason: str) -> None:
    """Skip for a missing tool, except in CI (.ci/run sets GAUSS_RUNNER_REQUIRED after installing them)."""
    if os.environ.get("GAUSS_RUNNER_REQUIRED"):
        pytest.fail(f"{reason}, but GAUSS_RUNNER_REQUIRED is set (CI installs cmake, g++, libhiredis-dev, redis-server)")
    pytest.skip(f"{reason}; CI installs it")

DIM = 6
MAX_HISTORY = 9


class ToyRanker(torch.nn.Module):
    """Masked mean of projected history rows, dotted with each candidate, plus a per-row term."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.weight = torch.nn.Parameter(torch.randn(DIM))

    def forward(self, history, history_len, candidates):
        n = history.shape[1]
        valid = (torch.arange(n) < history_len.unsqueeze(1)).to(history.dtype)
        pooled = (self.proj(history) * valid.unsqueeze(-1)).sum(1) / history_len.clamp(min=1).unsqueeze(1)
        return (candidates * pooled.unsqueeze(1)).sum(-1) + candidates @ self.weight


def toy_metadata(embedding_source: str = "") -> dict:
    return {"gauss_format": "1", "model_version": "toy", "embedding_version": "7", "dim": str(DIM),
            "max_seq_len": str(MAX_HISTORY), "embedding_source": embedding_source, "dtype": "float32",
            "input_names": "history,history_len,candidates", "output_names": "scores"}


def compile_toy(path: str, metadata: dict) -> None:
    Dim = torch.export.Dim
    batch, hist, cand = Dim("batch", min=1), Dim("history", min=1, max=MAX_HISTORY), Dim("candidates", min=1)
    sample = (torch.randn(3, 7, DIM), torch.tensor([7, 2, 0]), torch.randn(3, 5, DIM))
    with torch.no_grad():
        exported = torch.export.export(ToyRanker().eval(), sample, strict=False, dynamic_shapes={
            "history": {0: batch, 1: hist}, "history_len": {0: batch}, "candidates": {0: batch, 1: cand}})
    from torch._inductor import aoti_compile_and_package

    aoti_compile_and_package(exported, package_path=path, inductor_configs={"aot_inductor.metadata": metadata})


@pytest.fixture(scope="session")
def runner():
    reason = build_skip_reason()
    if reason:
        skip_unless_required(reason)
    return build_runner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A package whose metadata names a snapshot beside it (relative path), and the snapshot."""
    folder = tmp_path_factory.mktemp("toy")
    ids = torch.tensor([-5, 0, 3, 11, 2**40, 77, 8, 9, 10, 12, 13, 14]).sort().values
    rows = torch.randn(ids.numel(), DIM, generator=torch.Generator().manual_seed(1))
    write_snapshot(folder / "rows.gsnp", ids, rows)
    package = str(folder / "toy.pt2")
    compile_toy(package, toy_metadata("snapshot:rows.gsnp"))
    from torch._inductor import aoti_load_package

    return {"package": package, "snapshot": str(folder / "rows.gsnp"), "ids": ids, "rows": rows,
            "compiled": aoti_load_package(package), "folder": folder}


def python_scores(compiled, ids, rows, requests, batch_size=64):
    """The runner's request rules, written out in Python (see main.cpp's header)."""
    table = {int(i): r for i, r in zip(ids, rows)}
    out = []
    for start in range(0, len(requests), batch_size):
        group = requests[start:start + batch_size]
        hists = [list(h)[-MAX_HISTORY:] for h, _ in group]
        n = max([1] + [len(h) for h in hists])
        m = max(len(c) for _, c in group)
        history = torch.zeros(len(group), n, DIM)
        candidates = torch.zeros(len(group), m, DIM)
        for b, (h, (_, c)) in enumerate(zip(hists, group)):
            for j, i in enumerate(h):
                history[b, j] = table[i]
            for j, i in enumerate(c):
                candidates[b, j] = table[i]
        lens = torch.tensor([len(h) for h in hists], dtype=torch.int64)
        scores = compiled(history, lens, candidates)
        out += [scores[b, :len(c)].tolist() for b, (_, c) in enumerate(group)]
    return out


REQUESTS = [([0, 3, 11], [77, 8, 9, -5]),
            ([], [3, 2**40]),                                   # empty history: history_len 0
            ([8, 9, 10, 12, 13, 14, 0, 3, 11, 77, -5], [12]),  # longer than max_seq_len: the last 9 count
            ([2**40], [0, 3, 11, 77, 8, 9, 10, 12, 13, 14]),
            ([3, 3, 3], [3, 3])]                                # repeats are fine


def assert_close(a, b, tol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        assert max(abs(p - q) for p, q in zip(x, y)) <= tol, (x, y)


# ---------------------------------------------------------------------- build
def test_build_is_cached_and_reports_redis(runner):
    assert os.access(runner, os.X_OK)
    assert find_runner() == runner
    assert build_runner() == runner  # the cache: same path, no rebuild
    has_redis = runner_has_redis(runner)
    assert has_redis == any(os.path.exists(p) for p in ("/usr/include/hiredis/hiredis.h",
                                                          "/usr/local/include/hiredis/hiredis.h"))


def test_build_without_cmake_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither cmake nor a compiler here
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RunnerBuildError, match="cmake is not on PATH: install it"):
        build_runner(build_dir=str(tmp_path / "b"))
    assert not (tmp_path / "b" / "gauss-runner").exists()


# ---------------------------------------------------------------------- scores
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_snapshot_scores_equal_python(runner, toy, batch_size):
    got = run_runner(toy["package"], REQUESTS, snapshot=toy["snapshot"], batch_size=batch_size, binary=runner)
    want = python_scores(toy["compiled"], toy["ids"], toy["rows"], REQUESTS, batch_size)
    assert_close(got, want)
    eager = ToyRanker().eval()
    with torch.no_grad():
        assert_close(got, python_scores(eager, toy["ids"], toy["rows"], REQUESTS, batch_size), tol=1e-5)


def test_source_from_metadata_blank_and_comment_lines_and_text_format(runner, toy, tmp_path):
    text = "\n# a comment\n0 3 11 | 77 8 9 -5\n   \n | 3 1099511627776\r\n"
    requests_file = tmp_path / "requests.txt"
    requests_file.write_text(text)
    # No --snapshot: the package's embedding_source names rows.gsnp beside the package.
    proc = subprocess.run([runner, "--package", toy["package"], "--input", str(requests_file)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and len(lines[0].split()) == 4 and len(lines[1].split()) == 2
    want = python_scores(toy["compiled"], toy["ids"], toy["rows"], REQUESTS[:2])
    assert lines[0] == " ".join("%.9g" % s for s in want[0])  # the shared "%.9g" output format
    assert_close([[float(x) for x in line.split()] for line in lines], want)


def test_print_metadata(runner, toy):
    proc = subprocess.run([runner, "--package", toy["package"], "--print-metadata"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    # AOTInductor adds its own keys (AOTI_CPU_ISA, ...) beside ours.
    assert {k: meta.get(k) for k in toy_metadata()} == toy_metadata("snapshot:rows.gsnp")


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text, message", [
    ("0 3 | 12345\n", "item id 12345 is not in snapshot"),
    ("0 3 12 | 8\n0 x | 8\n", "line 2: history id 'x' is not a 64-bit integer"),
    ("0 3 | 8 99999999999999999999\n", "candidate id '99999999999999999999' is not a 64-bit integer"),
    ("0 3 8\n", "line 1: expected '<history ids> | <candidate ids>'"),
    ("0 | 3 | 8\n", "exactly one '|'"),
    ("0 3 |\n", "line 1: no candidate ids"),
])
def test_bad_requests_are_named(runner, toy, text, message):
    with pytest.raises(RunnerError, match=message) as err:
        run_runner(toy["package"], text, snapshot=toy["snapshot"], binary=runner)
    assert err.value.returncode == 1


def test_corrupted_snapshot_is_refused(runner, toy, tmp_path):
    data = bytearray(open(toy["snapshot"], "rb").read())
    data[40] ^= 0xFF
    bad = tmp_path / "bad.gsnp"
    bad.write_bytes(bytes(data))
    with pytest.raises(RunnerError, match="CRC-32 mismatch .* export the snapshot again") as err:
        run_runner(toy["package"], REQUESTS, snapshot=str(bad), binary=runner)
    assert err.value.returncode == 2
    short = tmp_path / "short.gsnp"
    short.write_bytes(bytes(data[:-9]))
    with pytest.raises(RunnerError, match="do not match the header"):
        run_runner(toy["package"], REQUESTS, snapshot=str(short), binary=runner)
    # A well-formed snapshot of another width.
    other = tmp_path / "other.gsnp"
    write_snapshot(other, toy["ids"], torch.zeros(toy["ids"].numel(), DIM + 1))
    with pytest.raises(RunnerError, match=f"rows of dim {DIM + 1} but the package expects dim {DIM}"):
        run_runner(toy["package"], REQUESTS, snapshot=str(other), binary=runner)


def test_snapshot_bytes_follow_the_documented_layout(toy):
    """The runner parses these bytes itself: pin the layout it relies on."""
    data = open(toy["snapshot"], "rb").read()
    magic, n, dim, code = struct.unpack_from("<8sQII", data)
    assert (magic, n, dim, code) == (b"GSNP0001", toy["ids"].numel(), DIM, 0)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])


def test_corrupted_or_foreign_package_is_refused(runner, toy, tmp_path):
    truncated = tmp_path / "trunc.pt2"
    truncated.write_bytes(open(toy["package"], "rb").read()[:2000])
    notzip = tmp_path / "notzip.pt2"
    notzip.write_bytes(b"hello world, not a package")
    for path, message in ((truncated, "could not be loaded as an AOTInductor package"),
                          (notzip, "not a .pt2 package"), (tmp_path / "missing.pt2", "cannot be opened")):
        with pytest.raises(RunnerError, match=message) as err:
            run_runner(str(path), REQUESTS, snapshot=toy["snapshot"], binary=runner)
        assert err.value.returncode == 2


def test_package_without_gauss_metadata_is_refused(runner, toy, tmp_path):
    meta = toy_metadata()
    meta["input_names"] = "history,history_len,candidates,history_time,candidate_time"
    path = str(tmp_path / "timed.pt2")
    compile_toy(path, meta)
    with pytest.raises(RunnerError, match="serves the three-input ranker only"):
        run_runner(path, REQUESTS, snapshot=toy["snapshot"], binary=runner)
    # No embedding source anywhere: say which flags to pass.
    meta = toy_metadata()
    path = str(tmp_path / "nosource.pt2")
    compile_toy(path, meta)
    with pytest.raises(RunnerError, match="names no embedding source .* pass --snapshot"):
        run_runner(path, REQUESTS, binary=runner)


def test_bad_flags(runner, toy):
    for args, message in ((["--batch-size", "0"], "--batch-size needs a positive integer"),
                          (["--frobnicate"], "unknown argument '--frobnicate'"),
                          (["--snapshot", "a", "--redis", "redis://h:1/p"], "not both")):
        proc = subprocess.run([runner, "--package", toy["package"], *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ---------------------------------------------------------------------- Redis
@pytest.fixture
def redis_rows(toy):
    from gauss_plugins.benchmarking import RedisServer, redis_skip_reason

    reason = redis_skip_reason()
    if reason:
        skip_unless_required(reason)
    from gauss_integrations.redis.store import RedisWePS

    with RedisServer() as server:
        store = RedisWePS(DIM, state_dim=2, port=server.port, prefix="gauss", model="toy", table="items")
        store.put(toy["ids"], toy["rows"], torch.randn(toy["ids"].numel(), 2))
        yield server
        store.close()


def test_redis_scores_equal_snapshot_scores(runner, toy, redis_rows):
    if not runner_has_redis(runner):
        skip_unless_required("gauss-runner was built without hiredis (apt-get install libhiredis-dev)")
    url = f"redis://127.0.0.1:{redis_rows.port}/gauss:toy:items"
    got = run_runner(toy["package"], REQUESTS, redis=url, state_dim=2, binary=runner)
    assert_close(got, python_scores(toy["compiled"], toy["ids"], toy["rows"], REQUESTS))
    with pytest.raises(RunnerError, match=r"item id 4242 is not in Redis .* \(no key gauss:toy:items:0000000000001092\)"):
        run_runner(toy["package"], "0 | 4242\n", redis=url, state_dim=2, binary=runner)
    with pytest.raises(RunnerError, match="holds 32 bytes, expected 24 .* pass the store's --state-dim"):
        run_runner(toy["package"], REQUESTS, redis=url, state_dim=0, binary=runner)
    with pytest.raises(RunnerError, match="cannot connect to Redis at 127.0.0.1:1 .*start the server"):
        run_runner(toy["package"], REQUESTS, redis="redis://127.0.0.1:1/gauss:toy:items", binary=runner)


def test_redis_with_password_from_the_environment(runner, toy, monkeypatch):
    from gauss_plugins.benchmarking import RedisServer, redis_skip_reason

    reason = redis_skip_reason()
    if reason:
        skip_unless_required(reason)
    if not runner_has_redis(runner):
        skip_unless_required("gauss-runner was built without hiredis (apt-get install libhiredis-dev)")
    from gauss_integrations.redis.store import RedisWePS

    with RedisServer(extra_args=("--requirepass", "s3cret")) as server:
        store = RedisWePS(DIM, port=server.port, password="s3cret", prefix="gauss", model="toy", table="items")
        try:
            store.put(toy["ids"], toy["rows"])
        finally:
            store.close()
        url = f"redis://127.0.0.1:{server.port}/gauss:toy:items"
        monkeypatch.delenv("GAUSS_REDIS_PASSWORD", raising=False)
        with pytest.raises(RunnerError, match="NOAUTH.*set GAUSS_REDIS_PASSWORD") as err:
            run_runner(toy["package"], REQUESTS, redis=url, binary=runner)
        assert err.value.returncode == 2
        monkeypatch.setenv("GAUSS_REDIS_PASSWORD", "wrong")
        with pytest.raises(RunnerError, match="AUTH failed .* check GAUSS_REDIS_PASSWORD"):
            run_runner(toy["package"], REQUESTS, redis=url, binary=runner)
        monkeypatch.setenv("GAUSS_REDIS_PASSWORD", "s3cret")
        got = run_runner(toy["package"], REQUESTS, redis=url, binary=runner)
    assert_close(got, python_scores(toy["compiled"], toy["ids"], toy["rows"], REQUESTS))
