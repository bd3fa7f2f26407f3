"""Serving an HSTU ranker: eager vs AOTInductor .pt2, M-FALCON vs one pass per candidate, the retrieval head.

The model: an ML-1M-size HSTU retrieval model, randomly initialised (3706 items, dim 50,
2 blocks x 1 head, d_qk = d_v = 25, position bias, no time bias: configs/ml-1m-hstu before
session 3 set the paper code's d_qk = d_v = 50; kept at 25 so the committed records compare),
with ``max_len`` 201 so that a history of 200 items fits beside the candidates' slot. Rows
are drawn from a snapshot of the model's item table, as serving does.

(a) **eager vs AOTI** at batch 1, 16 and 256 users, each with a 200-item history and
    ``candidates`` candidates: the eager :class:`RankerProgram` (``torch.no_grad``) and the
    compiled package (through :class:`LoadedPackage`, input checks included) on the same
    inputs; per-call latency p50/p99 and users/s. ``aoti_speedup_vs_eager`` is the eager /
    AOTI p50 ratio at the batch size where it is smallest.
(b) **M-FALCON**: 1024 candidates per user scored in one call (candidates attend to the
    history and themselves) vs one call per candidate (``[history ; candidate]`` each time,
    what a ranker without the M-FALCON mask has to do); both through the AOTI package;
    ``mfalcon_speedup`` is the candidates/s ratio. With a CUDA device the same comparison
    runs on the GPU with the eager program (``mfalcon_speedup_gpu``).
(c) **retrieval head** (the default export: the training score ``<query, item>``, one
    history encode shared by every candidate): its own ``.pt2``, the same users and 1024
    candidates as (b) in one call; ``retrieval_cand_per_s`` and
    ``retrieval_vs_mfalcon_one_pass`` (its candidates/s over M-FALCON's one pass).
    Parts (a) and (b) use the M-FALCON head, as the committed record was measured.

``parity_max_abs_diff``: both exports' parity checks (random inputs), every call of (a) and
the call of (c), largest |eager - AOTI|. ``cpp_vs_python_max_abs_diff``: the C++ runner (when
:func:`gauss_plugins.export.runner.find_runner` finds a build) against the Python predictor
on the same requests and snapshot; null with the reason otherwise (``--quick`` uses a
runner that is already built; a full run builds it).

``--threads N`` sets torch's intra-op threads for both paths (and the compiled kernels'
OpenMP count, fixed at compile time). The committed record used ``--threads 1``: on the
shared 2-core machines, two OpenMP threads competing with other processes made every
figure swing by 10x between runs.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from gauss_plugins.benchmarking import cuda_skip_reason, parser, print_table, write_report
from gauss_plugins.export.aoti import export_aoti, load_package
from gauss_plugins.export.checkpoint import item_rows
from gauss_plugins.export.predictor import Predictor, Request
from gauss_plugins.export.program import build_ranker
from gauss_plugins.export.snapshot import read_snapshot, write_snapshot

NAME = "serving"
NUM_ITEMS, DIM, HISTORY = 3706, 50, 200
TARGETS = {"aoti_speedup_vs_eager": ">= 1.5", "parity_max_abs_diff": "<= 1e-5", "mfalcon_speedup": ">= 20"}


def build_model(seed: int = 0):
    from gauss_plugins.models.builder import build_model as build
    from gauss_plugins.train.config import ExperimentConfig, with_overrides

    config = with_overrides(ExperimentConfig(name="serving-bench"), data__max_len=HISTORY + 1, model__dim=DIM,
                            model__num_blocks=2, model__num_heads=1, model__attention_dim=25, model__linear_dim=25,
                            model__num_time_buckets=0, model__item_embedding="static")
    torch.manual_seed(seed)
    return build(config, num_items=NUM_ITEMS).eval()


def latencies(fn, repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def percentile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def requests_for(batch: int, candidates: int, g: torch.Generator) -> List[Request]:
    out = []
    for _ in range(batch):
        items = torch.randperm(NUM_ITEMS, generator=g)[:HISTORY + candidates] + 1
        out.append(Request(tuple(items[:HISTORY].tolist()), tuple(items[HISTORY:].tolist())))
    return out


def padded_inputs(snapshot, reqs: List[Request]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = snapshot.lookup(torch.tensor([r.history for r in reqs]))
    c = snapshot.lookup(torch.tensor([r.candidates for r in reqs]))
    return h, torch.full((len(reqs),), HISTORY, dtype=torch.int64), c


def mfalcon_compare(call, h, lens, c, per_candidate_repeats: int) -> Dict[str, float]:
    """One call with every candidate vs one call per candidate (a sample of them, timed)."""
    m = c.shape[1]
    one_pass = statistics.median(latencies(lambda: call(h, lens, c), 3, 1))
    sample = min(m, per_candidate_repeats)
    per: List[float] = []
    call(h, lens, c[:, :1])  # warm-up
    for j in range(sample):
        t0 = time.perf_counter()
        call(h, lens, c[:, j:j + 1])
        per.append(time.perf_counter() - t0)
    per_candidate_s = statistics.mean(per) * m  # every candidate costs one call
    users = h.shape[0]
    return {"one_pass_s": one_pass, "per_candidate_s": per_candidate_s,
            "one_pass_cand_per_s": users * m / one_pass, "per_candidate_cand_per_s": users * m / per_candidate_s,
            "speedup": per_candidate_s / one_pass, "timed_single_calls": sample}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=32, help="candidates per user in part (a) (default 32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for eager and the compiled package (default: torch's default)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"serving: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        # before compiling: the compiled kernels take their OpenMP thread count from it
        torch.set_num_threads(args.threads)
    repeats = {1: 30, 16: 10, 256: 3} if args.quick else {1: 100, 16: 30, 256: 8}
    per_candidate_calls = 64 if args.quick else 256
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build_model()
    program = build_ranker(model, "mfalcon")
    work = tempfile.mkdtemp(prefix="gauss-serving-bench-")
    results: List[Dict[str, Any]] = []
    summary: Dict[str, Any] = {}

    ids, rows, version = item_rows(model)
    snap_path = os.path.join(work, "rows.gsnp")
    write_snapshot(snap_path, ids, rows)
    snapshot = read_snapshot(snap_path)
    pkg_path = os.path.join(work, "ranker.pt2")
    t0 = time.perf_counter()
    exported = export_aoti(program, pkg_path, model_version="random-init ml-1m size", embedding_version=version,
                           embedding_source=f"snapshot:{snap_path}", row_std=float(rows.std()))
    export_total_s = time.perf_counter() - t0
    package = load_package(pkg_path)
    print(f"exported in {export_total_s:.1f} s (export {exported.export_s} s, compile {exported.compile_s} s); "
          f"parity on random inputs: {exported.parity.max_abs_diff:.3g}", flush=True)
    parity = exported.parity.max_abs_diff

    # (a) eager vs AOTI
    speedups = {}
    with torch.no_grad():
        for batch in (1, 16, 256):
            h, lens, c = padded_inputs(snapshot, requests_for(batch, args.candidates, g))
            parity = max(parity, float((program(h, lens, c) - package(h, lens, c)).abs().max()))
            n = repeats[batch]
            t_eager = latencies(lambda: program(h, lens, c), n, 2)
            t_aoti = latencies(lambda: package(h, lens, c), n, 2)
            for name, ts in (("eager", t_eager), ("aoti", t_aoti)):
                results.append({"part": "a", "path": name, "batch": batch, "history": HISTORY,
                                "candidates": args.candidates, "calls": n, "p50_ms": 1e3 * percentile(ts, 0.5),
                                "p99_ms": 1e3 * percentile(ts, 0.99),
                                "users_per_s": batch / statistics.mean(ts)})
            speedups[batch] = percentile(t_eager, 0.5) / percentile(t_aoti, 0.5)
            print(f"  batch {batch}: eager p50 {1e3 * percentile(t_eager, 0.5):.2f} ms, AOTI p50 "
                  f"{1e3 * percentile(t_aoti, 0.5):.2f} ms ({speedups[batch]:.2f}x)", flush=True)

        # (b) M-FALCON: 1024 candidates per user
        users = 1 if args.quick else 4
        h, lens, c = padded_inputs(snapshot, requests_for(users, 1024, g))
        mf = mfalcon_compare(package, h, lens, c, per_candidate_calls)
        results.append({"part": "b", "path": "aoti", "batch": users, "history": HISTORY, "candidates": 1024, **mf})
        print(f"  M-FALCON: one pass {mf['one_pass_s'] * 1e3:.1f} ms vs {mf['per_candidate_s'] * 1e3:.0f} ms "
              f"for one call per candidate ({mf['speedup']:.1f}x)", flush=True)

    # (c) the retrieval head on the same users and candidates
    retrieval_program = build_ranker(model, "retrieval")
    retrieval_path = os.path.join(work, "ranker_retrieval.pt2")
    exported_r = export_aoti(retrieval_program, retrieval_path, model_version="random-init ml-1m size",
                             embedding_version=version, embedding_source=f"snapshot:{snap_path}",
                             row_std=float(rows.std()))
    retrieval_package = load_package(retrieval_path)
    with torch.no_grad():
        parity = max(parity, exported_r.parity.max_abs_diff,
                     float((retrieval_program(h, lens, c) - retrieval_package(h, lens, c)).abs().max()))
        ts = latencies(lambda: retrieval_package(h, lens, c), 3, 1)
    retrieval_s = statistics.median(ts)
    retrieval_rate = users * c.shape[1] / retrieval_s
    results.append({"part": "c", "path": "aoti-retrieval", "batch": users, "history": HISTORY, "candidates": 1024,
                    "one_pass_s": retrieval_s, "one_pass_cand_per_s": retrieval_rate,
                    "vs_mfalcon_one_pass": retrieval_rate / mf["one_pass_cand_per_s"]})
    print(f"  retrieval head: one pass {retrieval_s * 1e3:.1f} ms ({retrieval_rate:.3g} candidates/s, "
          f"{retrieval_rate / mf['one_pass_cand_per_s']:.1f}x M-FALCON's one pass)", flush=True)

    gpu_reason = cuda_skip_reason()
    if gpu_reason is None:
        gpu_program = build_ranker(build_model().cuda(), "mfalcon")
        hc, lc, cc = (t.cuda() for t in (h, lens, c))

        def gpu_call(*a):
            out = gpu_program(*a)
            torch.cuda.synchronize()
            return out

        with torch.no_grad():
            mfg = mfalcon_compare(gpu_call, hc, lc, cc, per_candidate_calls)
        results.append({"part": "b", "path": "eager-cuda", "batch": users, "history": HISTORY, "candidates": 1024, **mfg})
        summary["mfalcon_speedup_gpu"] = round(mfg["speedup"], 2)
    else:
        summary["mfalcon_speedup_gpu"] = None
        summary["mfalcon_speedup_gpu_skipped"] = gpu_reason

    # C++ runner vs the Python predictor, same requests and snapshot
    cpp_diff: Optional[float] = None
    cpp_reason = ""
    try:
        from gauss_plugins.export import runner
    except ImportError as exc:
        cpp_reason = f"gauss_plugins.export.runner is not importable ({exc})"
    else:
        binary = runner.find_runner()
        if binary is None and not args.quick:  # a full run builds it (about a minute, cached)
            try:
                binary = runner.build_runner()
            except runner.RunnerBuildError as exc:
                cpp_reason = f"gauss-runner could not be built here: {str(exc).splitlines()[0]}"
        if binary is None:
            cpp_reason = cpp_reason or "gauss-runner is not built here (--quick does not build it; " \
                                       "gauss_plugins.export.runner.build_runner() does)"
        else:
            reqs = requests_for(16, args.candidates, g) + [Request((5, 6, 7), (8,)), Request((), (9, 10))]
            python_scores = Predictor(package, snapshot).rank(reqs)
            cpp_scores = runner.run_runner(pkg_path, [(r.history, r.candidates) for r in reqs], snapshot=snap_path,
                                           binary=binary)
            # The runner prints %.9g: compare with the Python scores printed the same way.
            cpp_diff = max(abs(float("%.9g" % a) - b) for py, cc in zip(python_scores, cpp_scores)
                           for a, b in zip(py.tolist(), cc))
    print_table([r for r in results if r["part"] == "a"])
    print()
    print_table([r for r in results if r["part"] == "b"])
    print()
    print_table([r for r in results if r["part"] == "c"])
    summary.update({
        "aoti_speedup_vs_eager": round(min(speedups.values()), 3),
        "aoti_speedup_by_batch": {str(k): round(v, 3) for k, v in speedups.items()},
        "parity_max_abs_diff": parity,
        "mfalcon_speedup": round(mf["speedup"], 2),
        "retrieval_cand_per_s": round(retrieval_rate),
        "retrieval_vs_mfalcon_one_pass": round(retrieval_rate / mf["one_pass_cand_per_s"], 2),
        "cpp_vs_python_max_abs_diff": cpp_diff,
        "export_s": round(export_total_s, 1), "compile_s": exported.compile_s,
        "retrieval_compile_s": exported_r.compile_s, "threads": torch.get_num_threads(),
    })
    if cpp_diff is None:
        summary["cpp_vs_python_skipped"] = cpp_reason
    write_report(NAME, results, summary, args.json, targets=TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
