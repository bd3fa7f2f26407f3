"""Load a ``.pt2`` ranker and measure it: what the ``gauss.serve_bench`` TorchX component runs.

    python -m gauss_integrations.torchx.serve_bench --package model.pt2 [--snapshot rows.gsnp]
        [--batch-sizes 1,16,256] [--history 0] [--candidates 64] [--iters 20] [--threads 0]
        [--runner] [--json out.json]

For each batch size: p50 / p99 latency of one call of the package and the throughput in
requests and candidates per second. Inputs are rows of random snapshot ids (``--snapshot``)
or random rows of the package's dim. ``--runner`` also scores the same requests with the
C++ gauss-runner (built on first use) and reports its throughput (``iters`` batches in one
process, timed by the runner apart from loading the package; fetching rows, parsing and
printing included), its load time and the largest difference from the Python predictor's
scores (``cpp_vs_python_max_abs_diff``). A package with a time bias is fed synthetic event
times (one a minute); gauss-runner does not serve those. Exits non-zero when the package cannot be loaded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from gauss_plugins import benchmarking

Request = Tuple[List[int], List[int]]


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def make_requests(ids: torch.Tensor, count: int, history: int, candidates: int, seed: int) -> List[Request]:
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: ids[torch.randint(0, ids.numel(), (n,), generator=g)].tolist()  # noqa: E731
    return [(pick(history), pick(candidates)) for _ in range(count)]


def score_requests(predictor, requests: Sequence[Request]) -> List[List[float]]:
    """Scores of ``requests`` through the Python Predictor (the batching gauss-runner follows)."""
    from gauss_plugins.export.predictor import Request as PredictorRequest

    reqs = [PredictorRequest(tuple(h), tuple(c), i + 1) for i, (h, c) in enumerate(requests)]
    if not predictor.timed:
        return [s.tolist() for s in predictor.rank(reqs)]
    # A time-bias model: one event a minute before the request, as a steady session would be.
    now = 1_700_000_000
    history_times = [[now - 60 * (len(h) - j) for j in range(len(h))] for h, _ in requests]
    candidate_times = [[now] * len(c) for _, c in requests]
    return [s.tolist() for s in predictor.rank(reqs, history_times, candidate_times)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True)
    p.add_argument("--snapshot")
    p.add_argument("--batch-sizes", default="1,16,256")
    p.add_argument("--history", type=int, default=0, help="history length (0: the package's max_seq_len)")
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runner", action="store_true", help="also time gauss-runner and compare its scores")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(sizes) < 1 or args.iters < 1 or args.candidates < 1 or args.history < 0:
        p.error("batch sizes, --iters and --candidates must be >= 1 and --history >= 0")
    if args.runner and not args.snapshot:
        p.error("--runner needs --snapshot (gauss-runner gathers rows from a snapshot file)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from gauss_plugins.export.aoti import PackageError, load_package
    from gauss_plugins.export.predictor import Predictor
    from gauss_plugins.export.snapshot import Snapshot, read_snapshot

    try:
        package = load_package(args.package)
    except PackageError as exc:
        print(f"serve_bench: {exc}", file=sys.stderr)
        return 2
    if package.timed and args.runner:
        print("serve_bench: this package takes event times (a time-bias model) and gauss-runner serves the "
              "three-input ranker only: drop --runner, or export a model with model.num_time_buckets: 0",
              file=sys.stderr)
        return 2
    history = args.history or package.max_history
    if history > package.max_history:
        p.error(f"--history {history} exceeds the package's max_seq_len {package.max_history}")
    if args.snapshot:
        snap = read_snapshot(args.snapshot)
        if snap.dim != package.dim:
            print(f"serve_bench: {args.snapshot} has dim {snap.dim}, the package {package.dim}", file=sys.stderr)
            return 2
    else:
        # Random rows of the package's dim: latency does not depend on the values.
        snap = Snapshot(torch.arange(4096), torch.randn(4096, package.dim, generator=torch.Generator().manual_seed(0))
                        * 0.1, source="random rows")

    results: List[Dict[str, object]] = []
    max_diff: Optional[float] = None
    for b in sizes:
        requests = make_requests(snap.ids, b, history, args.candidates, seed=b)
        predictor = Predictor(package, snap, batch_size=b)
        score_requests(predictor, requests)  # warm-up (first-call allocations)
        latencies = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            score_requests(predictor, requests)
            latencies.append(time.perf_counter() - t0)
        mean = statistics.fmean(latencies)
        row: Dict[str, object] = {
            "batch": b, "history": history, "candidates": args.candidates,
            "p50_ms": round(1e3 * _percentile(latencies, 0.5), 3), "p99_ms": round(1e3 * _percentile(latencies, 0.99), 3),
            "requests_per_s": round(b / mean, 1), "candidates_per_s": round(b * args.candidates / mean, 1)}
        if args.runner:
            row.update(_runner_row(args, requests, b, predictor))
            diff = row["cpp_vs_python_max_abs_diff"]
            max_diff = diff if max_diff is None else max(max_diff, diff)
        results.append(row)
    benchmarking.print_table(results)
    summary: Dict[str, object] = {
        "package": os.path.abspath(args.package),
        "model_version": package.metadata.get("model_version", ""),
        "best_candidates_per_s": max(r["candidates_per_s"] for r in results),
        "p50_ms_batch_1": next((r["p50_ms"] for r in results if r["batch"] == 1), None)}
    if args.runner:
        summary["cpp_vs_python_max_abs_diff"] = max_diff
    benchmarking.write_report("serve_bench", results, summary, args.json)
    return 0


def _runner_row(args, requests: Sequence[Request], batch: int, predictor) -> Dict[str, object]:
    from gauss_plugins.export.runner import build_runner, run_runner_timed

    binary = build_runner(verbose=True)
    # iters batches in one process; the runner times its serving loop apart from the load.
    many = list(requests) * args.iters
    got, timing = run_runner_timed(args.package, many, snapshot=args.snapshot, batch_size=batch,
                                   threads=args.threads or None, binary=binary)
    want = score_requests(predictor, requests)
    diff = max(abs(x - y) for g, w in zip(got[:len(requests)], want) for x, y in zip(g, w))
    serve_s = max(timing["serve_s"], 1e-9)
    return {"runner_requests_per_s": round(len(many) / serve_s, 1), "runner_load_s": round(timing["load_s"], 3),
            "cpp_vs_python_max_abs_diff": diff}


if __name__ == "__main__":
    sys.exit(main())
