"""Where the cached GPU step waits for the GPU: every host synchronisation of a few steps of
``benchmarks/lookahead_cache.py``'s Zipf model, counted by the line of this project that
caused it.

``torch.cuda.set_sync_debug_mode("warn")`` makes each synchronising CUDA call (a ``.item()``,
a boolean-mask index, ``torch.unique``, a device-to-host copy, ...) raise a warning; this
tool catches the warnings on the training thread, walks the Python stack at that moment and
files the sync under the innermost frame in ``src/``, ``integrations/`` or ``benchmarks/``
(the site to change) and under the phase of the step it happened in:

* ``cache``: inside the cache's iterator (admission, eviction, installs: ``wrap``'s
  ``next``) or ``step_done``;
* ``train``: the benchmark's training step (the same for every variant);
* ``worker``: the cache's worker thread (off the training thread; listed, not a step's wait).

Variants: ``in_memory`` (every row in the table), ``lookahead`` and ``lru`` at the 10% budget.
Counts are per step over the steps after ``--warmup``. Each variant also runs once without
the debug mode for its step time (wall and training-thread CPU ms, the median after warmup).

    python benchmarks/tools/cache_sync_sites.py [--quick] [--json PATH] [--device cuda|cpu]

On a machine without CUDA it writes ``{"skipped": ...}`` and exits 0 (``--device cpu`` runs
the same loop on the CPU, where nothing synchronises: a check of the tool itself).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT_DIRS = tuple(os.path.join(ROOT, d) + os.sep for d in ("src", "integrations", "benchmarks", "kernels"))
THIS = os.path.abspath(__file__)
NAME = "cache_sync_sites"


def _load_bench():
    spec = importlib.util.spec_from_file_location("lookahead_cache_bench",
                                                  os.path.join(ROOT, "benchmarks", "lookahead_cache.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class SyncCounter:
    """Counts the sync warnings by (phase, project site); a sync on another thread is "worker"."""

    def __init__(self) -> None:
        self.phase = "other"
        self.counting = False
        self.counts: Counter = Counter()
        self.stacks: Dict[tuple, str] = {}
        self._main = threading.get_ident()
        self._old = None

    def _show(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" not in text:
            return self._old(message, category, filename, lineno, file, line)
        if not self.counting:
            return None
        frames = traceback.extract_stack()[:-1]
        site = "torch-internal"
        chain = []
        for fr in frames:
            path = os.path.abspath(fr.filename)
            if path.startswith(PROJECT_DIRS) and path != THIS:
                chain.append(f"{os.path.relpath(path, ROOT)}:{fr.lineno} {fr.name}")
        if chain:
            site = chain[-1]
        # The cache's worker thread (store reads, side-stream copies) waits off the training thread.
        key = (self.phase if threading.get_ident() == self._main else "worker", site)
        self.counts[key] += 1
        self.stacks.setdefault(key, " <- ".join(reversed(chain[-4:])))
        return None

    def __enter__(self) -> "SyncCounter":
        self._old = warnings.showwarning
        warnings.showwarning = self._show
        self._filters = warnings.filters[:]
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._old
        warnings.filters[:] = self._filters


def run(bench, kind: str, trace, rows: int, budget: int, image: str, work: str, device: str, warmup: int,
        counter: Optional[SyncCounter]) -> Dict[str, Any]:
    """One variant over ``trace``: the benchmark's model, table, store and step."""
    from gauss_plugins.cache import CacheConfig, LookaheadCache
    from gauss_plugins.embedding import SparseOptimizer
    from gauss_plugins.embedding.initializers import initial_values

    model = bench.Model(trace[0]["ids"].shape[1]).to(device)
    dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    store = cache = None
    store_dir = None
    if kind == "in_memory":
        table = bench.make_table("items", rows + 1, device)
        all_ids = torch.arange(1, rows + 1, device=device)
        c = table.config
        table.set(all_ids, initial_values(c.initializer, all_ids, bench.DIM, c.seed, c.init_min, c.init_max,
                                          c.init_std))
        batches = iter(trace)
    else:
        store_dir = tempfile.mkdtemp(dir=work)
        store = bench.open_cold(image, os.path.join(store_dir, "ps"), rows)
        # The benchmark's table for a cached run (room over the budget where it gives some).
        table = bench.make_table("items", getattr(bench, "TABLE_HEADROOM", 1) * budget, device)
        cache = LookaheadCache({"items": table}, store,
                               CacheConfig(budget_rows=budget, window=bench.WINDOW, policy=kind),
                               ids_fn=lambda b: {"items": bench.batch_ids(b)})
        batches = cache.wrap(trace)
    sparse_opt = SparseOptimizer(table)
    table.train()
    wall: List[float] = []
    cpu: List[float] = []
    cache_cpu: List[float] = []  # the training thread's CPU time in the cache's calls
    step = 0
    sync = lambda: torch.cuda.synchronize() if device == "cuda" else None  # noqa: E731
    sync()
    t0, c0 = time.perf_counter(), time.thread_time()
    while True:
        if counter is not None:
            counter.counting = step >= warmup
            counter.phase = "cache"
        c_cache = time.thread_time()
        try:
            batch = next(batches)
        except StopIteration:
            break
        c_cache = time.thread_time() - c_cache
        if counter is not None:
            counter.phase = "train"
        # As the benchmark: the loader's batch is on the host, every variant copies it over.
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        bench.train_step(model, table, dense_opt, sparse_opt, on_device)
        if cache is not None:
            if counter is not None:
                counter.phase = "cache"
            c1 = time.thread_time()
            cache.step_done()
            c_cache += time.thread_time() - c1
        cache_cpu.append(c_cache)
        now, c_now = time.perf_counter(), time.thread_time()
        wall.append(now - t0)
        cpu.append(c_now - c0)
        t0, c0 = now, c_now
        step += 1
    if counter is not None:
        counter.counting = False
    stats = cache.stats() if cache is not None else {}
    if cache is not None:
        cache.close()
    if store is not None:
        store.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return {"steps": step, "step_ms": 1e3 * float(np.median(wall[warmup:] or wall)),
            "thread_cpu_ms": 1e3 * float(np.median(cpu[warmup:] or cpu)),
            "cache_cpu_ms": 1e3 * float(np.median(cache_cpu[warmup:] or cache_cpu)),
            "misses_at_use": stats.get("misses_at_use"),
            "stall_ms_per_step": (stats.get("stall_ms", 0.0) / max(1, step)) if stats else 0.0}


def main(argv=None) -> int:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from gauss_plugins.benchmarking import cuda_skip_reason, machine_info, parser, print_table, write_skip

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--rows", type=int, default=None, help="ids in the Zipf stream (100k; 20k with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per variant (30; 16 with --quick)")
    p.add_argument("--variants", default="in_memory,lookahead,lru")
    args = p.parse_args(argv)
    if args.device == "cuda":
        why = cuda_skip_reason()
        if why is not None:
            write_skip(NAME, why, args.json)
            return 0
    bench = _load_bench()
    rows = args.rows or (20_000 if args.quick else 100_000)
    steps = args.steps or (16 if args.quick else 30)
    warmup = min(6, steps // 2)
    budget = rows // 10
    torch.set_num_threads(1)  # as the benchmark
    trace = bench.zipf_trace(rows, steps)  # on the host, as a loader yields it (pinned: copies wait for nothing)
    if args.device == "cuda":
        trace = [{k: v.pin_memory() for k, v in b.items()} for b in trace]
    work = tempfile.mkdtemp(prefix="gauss-sync-sites-")
    image = os.path.join(work, "image")
    bench.build_cold_store(image, rows)
    results, sites = [], []
    try:
        for kind in [v.strip() for v in args.variants.split(",") if v.strip()]:
            timed = run(bench, kind, trace, rows, budget, image, work, args.device, warmup, None)
            counter = SyncCounter()
            if args.device == "cuda":
                with counter:
                    run(bench, kind, trace, rows, budget, image, work, args.device, warmup, counter)
            counted = max(1, steps - warmup)
            per_phase = Counter()
            for (phase, site), n in counter.counts.items():
                per_phase[phase] += n
                sites.append({"variant": kind, "phase": phase, "site": site, "per_step": n / counted,
                              "stack": counter.stacks[(phase, site)]})
            results.append({"variant": kind, "budget_rows": None if kind == "in_memory" else budget,
                            "syncs_per_step": sum(per_phase.values()) / counted,
                            "cache_syncs_per_step": per_phase["cache"] / counted,
                            "train_syncs_per_step": per_phase["train"] / counted, **timed,
                            "load_average_1m": os.getloadavg()[0]})
            print(f"{kind}: {results[-1]['syncs_per_step']:.1f} syncs/step "
                  f"(cache {results[-1]['cache_syncs_per_step']:.1f}), {timed['step_ms']:.2f} ms/step", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, ["variant", "syncs_per_step", "cache_syncs_per_step", "train_syncs_per_step", "step_ms",
                          "thread_cpu_ms", "cache_cpu_ms", "stall_ms_per_step", "misses_at_use"])
    sites.sort(key=lambda s: (s["variant"], s["phase"], -s["per_step"]))
    for s in sites:
        print(f"{s['variant']:>10} {s['phase']:>5} {s['per_step']:6.2f}/step  {s['site']}")
    summary = {r["variant"] + "_syncs_per_step": r["syncs_per_step"] for r in results}
    summary.update({r["variant"] + "_cache_syncs_per_step": r["cache_syncs_per_step"] for r in results})
    summary.update({"device": args.device, "rows": rows, "steps": steps, "warmup": warmup})
    if args.json:
        from gauss_plugins.train.report import write_json  # atomic

        write_json(args.json, {"benchmark": NAME, "machine": machine_info(), "results": results, "sites": sites,
                               "summary": summary})
    print(f"{NAME}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
