"""The lookahead embedding cache against the whole table in memory, LRU / LFU caches and a
store-only table: the same model and the same steps under each.

Traces
* ``zipf``: a synthetic stream of Zipf(1.05) item ids over ``--rows`` ids (100k; 20k with
  ``--quick``): sequences of 64 positions, 32 a batch. At a 10% budget the stream has 10x
  more ids than the cache holds.
* ``ml100k``: MovieLens-100K (found through :func:`gauss_plugins.data.locate.locate_dataset`)
  batched as training batches it (:class:`~gauss_plugins.train.batching.TrainExamples`, 200
  positions, 128 users a batch, shuffled each epoch; 12 steps, 5 with ``--quick``). ML-100K has 1,682 items and one batch
  reads most of them, so a 10% or 25% budget cannot hold one batch: the budget is raised to
  the largest batch's distinct items and the JSON says so (``effective_budget_rows``). The
  Zipf stream is where the budgets bind, and the summary comes from it.

Model (one step, the main job's): one lookup of the batch's distinct items in the item
table (dim 64, row-wise Adagrad), an HSTU encoder (2 blocks, one head, position bias) over
the padded sequences, a sampled softmax of each next item against 256 of the batch's items,
backward, Adam on the encoder, the sparse step.

Variants
(a) ``in_memory``: every row in the table (no store);
(b) ``lookahead``: :class:`~gauss_plugins.cache.LookaheadCache`, window 8, budget 10% / 25% of rows
    (the table's ``max_capacity`` is twice the budget, ``TABLE_HEADROOM``: the cache still holds at
    most the budget, and the table's hash index is not filled to its limit, where a GPU index
    rebuilds its slots every few evictions; the same for (c) and (d));
(c) ``lru`` and (d) ``lfu``: the same cache with the fetch-on-miss baseline policies, same budgets;
(e) ``tierps_only``: every step fetches its rows from TierPS and writes them all back.
The batches stay on the host, as a loader yields them (pinned on a GPU run): the cache
reads their ids there, and every variant, in-memory included, copies each batch to the
device in its step (session 6; before, the trace was moved to the device up front and the
cache read its ids back from the GPU). Every store variant starts from the same cold store: :class:`~gauss_plugins.stores.tierps.TierPS`
holding every row (initial values, zero optimizer state) on its disk tier, reopened with a
RAM tier of 2% of the rows, so reads go through the disk tier's segment files (the OS page
cache holds them: this is the disk tier's code path, not a cold SSD).

Step time, two ways. ``step_ms``: wall time from batch to batch (the median of the
round-robin runs); on a shared 2-core machine other tenants move it by tens of percent.
``critical_path_ms``: the training thread's CPU time per step plus the time it waited for
rows (``stall_ms``): what a step costs the training thread when the cache's worker has a
core of its own. It leaves out the worker's CPU and any wait for the GIL, so it is the
optimistic one; both are reported, the contract's keys use wall time.

Summary keys (Zipf trace, 10% budget): ``misses_at_use`` (every lookahead run; must be 0),
``step_time_ratio_vs_in_memory`` (target <= 1.1), ``speedup_vs_lru`` (target >= 1.5),
``speedup_vs_lfu``, ``max_abs_diff_vs_in_memory`` (rows after training through the cache
against the in-memory run) with ``max_abs_diff_in_memory_rerun`` beside it (the in-memory run
against itself, with ``--reps`` >= 2: 0 on a deterministic device; on a GPU whose kernels sum
with atomics, how far two identical runs drift). ``cold_*``: the same stream with a cold disk tier (each store
variant's TierPS segment files dropped from the page cache, POSIX_FADV_DONTNEED, after the
store opens and before the run: every variant starts equally cold; pages a run touches stay
cached for the rest of it).

``scaling_2_workers``: sequences a second of two processes over one, through the Lightning
``GaussStrategy``'s runner (:mod:`gauss_integrations.lightning.strategy_bench`: gloo,
partitioned caches: each process caches only the rows it owns, ids exchanged by all_gather,
borrowed rows and their gradients by all-to-all; one torch thread per process, the slowest
rank's median step, every rank's CPU ms per step recorded), at the 25% budget. The headline
figure also has ``scaling_2_workers_replicated`` beside it: the earlier design (every process
caches the global batch's rows, row gradients all-reduced), against the same one-process run.
The headline key is the main job's model (HSTU) with a fixed per-worker
batch (weak scaling: each process trains 32 sequences a step); the record also has
``scaling_2_workers_<model>_<batching>`` for the light MLP model and for a fixed global batch
of 32 split across the processes (strong scaling). Without Lightning, this script's own
2-process gloo run measures the HSTU fixed-global-batch figure; the record names the runner.
Each figure has its control beside it (``..._ddp_control``): the same dense model and batches
under plain DDP with no table and no cache (fixed features of the ids), measured in the same
run: the scaling this model, batch size and machine allow at all.

Parts (``--only zipf,cold,ml100k,scaling``; default all): ``--only scaling --quick`` re-measures
the scaling figures alone in a few minutes. ``--device cuda``: the tables (the fast tier) and
the model on the GPU, TierPS on the host, the prefetch's host-to-device copies on a side CUDA
stream; a machine without CUDA writes ``{"skipped": ...}`` and exits 0; two-process scaling
on CUDA needs two GPUs (one NCCL rank a device).

The JSON is written after every part (and every scaling figure) with ``"complete": false`` in
its summary, so a run cut by a time limit still leaves what it finished; the last write has
the whole record (``"complete": true``).

A PNG beside the JSON plots the lookahead run at 10% (hits at use, stall ms, window per
step) against the LRU run's stall (``<json>.png``; the cold trace: ``<json>_cold.png``).
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from gauss_plugins.benchmarking import machine_info, parser, print_table, write_report, write_skip

DIM = 64
STATE_DIM = 1            # row-wise Adagrad: one accumulator a row
WINDOW = 8
NEGATIVES = 256
SEQ_LEN, SEQS_PER_BATCH = 64, 32
NAME = "lookahead_cache"
TABLE_HEADROOM = 2       # a cached table's max_capacity over the budget (the cache holds <= budget rows)


# ---------------------------------------------------------------- traces
def zipf_trace(rows: int, steps: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, rows + 1) ** 1.05
    p /= p.sum()
    perm = rng.permutation(rows)  # popularity is not ordered by id
    out = []
    for _ in range(steps):
        seq = perm[rng.choice(rows, size=(SEQS_PER_BATCH, SEQ_LEN + 1), p=p)] + 1
        ids = torch.from_numpy(seq[:, :-1].copy()).long()
        out.append({"ids": ids, "targets": torch.from_numpy(seq[:, 1:].copy()).long()})
    return out


def ml100k_trace(steps: int, seed: int = 0) -> Tuple[Optional[List[Dict[str, torch.Tensor]]], int, str]:
    from gauss_plugins.data.loaders import load_movielens_100k
    from gauss_plugins.data.locate import locate_dataset
    from gauss_plugins.data.split import leave_one_out
    from gauss_plugins.train.batching import TrainExamples, collate_train

    found = locate_dataset("ml-100k")
    if found.path is None:
        return None, 0, found.reason
    seqs = load_movielens_100k(found.path)
    train = TrainExamples(leave_one_out(seqs).train, max_len=200)
    rng = np.random.default_rng(seed)
    out: List[Dict[str, torch.Tensor]] = []
    while len(out) < steps:
        order = rng.permutation(len(train))
        for s in range(0, len(order), 128):
            b = collate_train([train[int(i)] for i in order[s:s + 128]])
            out.append({"ids": b["ids"], "targets": b["targets"]})
            if len(out) == steps:
                break
    return out, int(seqs.max_item_id) + 1, found.path


def batch_ids(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    both = torch.cat([batch["ids"].reshape(-1), batch["targets"].reshape(-1)])
    return both[both > 0]


# ---------------------------------------------------------------- model
class Model(nn.Module):
    """The main job's encoder: HSTU (2 blocks, one head, dim 64, position bias, no dropout:
    every variant then computes the same thing)."""

    def __init__(self, max_len: int):
        super().__init__()
        from gauss_plugins.hstu import HSTUConfig
        from gauss_plugins.hstu.modules import PaddedHSTUEncoder

        torch.manual_seed(0)
        self.encoder = PaddedHSTUEncoder(HSTUConfig(dim=DIM, num_blocks=2, num_heads=1, max_seq_len=max_len,
                                                    dropout=0.0, num_time_buckets=0))


def make_table(name: str, capacity: int, device: str = "cpu"):
    from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig

    return DynamicEmbeddingTable(DynamicTableConfig(
        name=name, dim=DIM, optimizer=OptimizerConfig("rowwise_adagrad", lr=0.05),
        initial_capacity=min(capacity, 1 << 16), max_capacity=capacity, device=device))


def train_step(model, table, dense_opt, sparse_opt, batch, reduce: Optional[Callable] = None,
               uniq: Optional[torch.Tensor] = None) -> float:
    """One step; ``uniq`` (the global batch's distinct ids) and ``reduce`` (an all-reduce
    of a gradient) make it one replica's share of a data-parallel step."""
    ids, targets = batch["ids"], batch["targets"]
    valid = ids > 0                                  # right-padded sequences
    mask = targets > 0
    local = torch.cat([ids[valid], targets[mask]])
    if uniq is None:
        uniq = torch.unique(local)
    emb = table(uniq)                                # the one lookup of the step
    if reduce is not None:
        emb.register_hook(lambda g: reduce(g))
    pos = torch.searchsorted(uniq, local)
    n_hist = int(valid.sum())
    x = torch.zeros(*ids.shape, DIM, device=emb.device).index_put((valid,), emb.index_select(0, pos[:n_hist]))
    h = model.encoder(x, valid)[mask]
    t = emb.index_select(0, pos[n_hist:])
    gen = torch.Generator().manual_seed(int(targets.sum()) & 0xFFFF)  # on the CPU: the same draws on any device
    neg = emb.index_select(0, torch.randint(0, uniq.numel(), (NEGATIVES,), generator=gen).to(emb.device))
    logits = torch.cat([(h * t).sum(-1, keepdim=True), h @ neg.T], dim=1)
    loss = nn.functional.cross_entropy(logits, torch.zeros(h.shape[0], dtype=torch.long, device=logits.device),
                                       reduction="sum")
    scale = 1.0 / max(1, int(mask.sum())) if reduce is None else 1.0 / batch["global_positions"]
    (loss * scale).backward()
    if reduce is not None:
        for p in model.parameters():
            if p.grad is not None:
                reduce(p.grad)
    dense_opt.step()
    sparse_opt.step()
    dense_opt.zero_grad()
    return float(loss.detach())


# ---------------------------------------------------------------- the cold store
def build_cold_store(path: str, rows: int) -> None:
    from gauss_plugins.embedding.initializers import initial_values
    from gauss_plugins.stores.tierps import TierPS

    t = make_table("items", 16)
    store = TierPS(dim=DIM, state_dim=STATE_DIM, path=path, ram_bytes=64 << 20)
    chunk = 100_000
    for s in range(1, rows + 1, chunk):
        ids = torch.arange(s, min(rows + 1, s + chunk))
        vals = initial_values(t.config.initializer, ids, DIM, t.config.seed, t.config.init_min, t.config.init_max,
                              t.config.init_std)
        store.put(ids, vals, torch.zeros(ids.numel(), STATE_DIM))
        store.flush()
    store.close()


def open_cold(image: str, path: str, rows: int, drop_page_cache: bool = False):
    from gauss_plugins.stores.tierps import TierPS

    shutil.copytree(image, path)
    ram_rows = max(256, rows // 50)
    store = TierPS(dim=DIM, state_dim=STATE_DIM, path=path, ram_bytes=ram_rows * (4 * (DIM + STATE_DIM) + 25))
    if drop_page_cache:  # after the open: replaying the log on open reads every segment
        drop_cached_pages(path)
    return store


def page_cache_skip_reason() -> Optional[str]:
    if not hasattr(os, "posix_fadvise"):
        return "os.posix_fadvise is not available on this platform: the page cache cannot be dropped per file"
    return None


def drop_cached_pages(path: str) -> int:
    """Write the files under ``path`` to disk and ask the kernel to drop their cached pages
    (POSIX_FADV_DONTNEED), so the next reads of them go to the device: a cold disk tier for
    every variant alike. Returns the bytes dropped."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


# ---------------------------------------------------------------- one variant
def run_variant(kind: str, budget: int, trace, rows: int, image: str, work: str, warmup: int,
                device: str = "cpu", cold: bool = False) -> Dict[str, Any]:
    from gauss_plugins.cache import CacheConfig, LookaheadCache
    from gauss_plugins.embedding import SparseOptimizer
    from gauss_plugins.embedding.initializers import initial_values

    model = Model(trace[0]["ids"].shape[1]).to(device)
    dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    store = cache = None
    if kind == "in_memory":
        table = make_table("items", rows + 1, device)
        all_ids = torch.arange(1, rows + 1, device=device)
        table.set(all_ids, initial_values(table.config.initializer, all_ids, DIM, table.config.seed,
                                          table.config.init_min, table.config.init_max, table.config.init_std))
        batches: Iterator = iter(trace)
    else:
        store_dir = tempfile.mkdtemp(dir=work)  # a fresh copy of the cold store for every run
        store = open_cold(image, os.path.join(store_dir, "ps"), rows, drop_page_cache=cold)
        if kind == "tierps_only":
            table = make_table("items", max(batch_ids(b).unique().numel() for b in trace), device)
            table.attach_store(store)
            batches = iter(trace)
        else:
            # Room in the table (not in the cache: the budget caps the rows) so its hash index
            # is not filled to its limit: a full index rebuilds its slots at every few evictions.
            table = make_table("items", TABLE_HEADROOM * budget, device)
            cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=budget, window=WINDOW, policy=kind),
                                   ids_fn=lambda b: {"items": batch_ids(b)})
            batches = cache.wrap(trace)
    sparse_opt = SparseOptimizer(table)
    table.train()
    times: List[float] = []
    cpu: List[float] = []  # the training thread's CPU time per step (no waits, no other tenants)
    t_prev, c_prev = time.perf_counter(), time.thread_time()
    for batch in batches:
        # The loader's batch is on the host (the cache reads its ids there); every variant
        # copies it to the device the same way, as a training loop does.
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        train_step(model, table, dense_opt, sparse_opt, on_device)  # float(loss): the step is done on any device
        if cache is not None:
            cache.step_done()
        elif kind == "tierps_only":  # nothing stays in the fast tier
            table.evict(ids=table.index.keys_and_rows()[0])
        now = time.perf_counter()
        times.append(now - t_prev)  # from batch to batch: waits for rows included
        t_prev = now
        c_now = time.thread_time()
        cpu.append(c_now - c_prev)
        c_prev = c_now
    stats = cache.stats() if cache is not None else {}
    # The rows after training, wherever they live, for the comparison with in_memory.
    probe = torch.arange(1, rows + 1, max(1, rows // 5000), device=device)
    if cache is not None:
        cache.flush()
    elif kind == "tierps_only":
        pass  # every row was written back at its step
    if store is not None:
        values, present = table.get(probe)
        got = store.lookup(probe[~present].cpu())
        values[~present] = got.values.to(values.device)
    else:
        values = table.get(probe)[0]
    if cache is not None:
        cache.close()
    if store is not None:
        store.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    steady = times[warmup:] or times
    stalls = [s["stall_ms"] / 1e3 for s in stats["per_step"]] if stats else [0.0] * len(cpu)
    critical = [c + w for c, w in zip(cpu, stalls)][warmup:] or [c + w for c, w in zip(cpu, stalls)]
    positions = sum(int((b["targets"] > 0).sum()) for b in trace[warmup:]) or 1
    row = {"variant": kind, "budget_rows": budget if kind not in ("in_memory", "tierps_only") else None,
           "step_ms": 1e3 * float(np.mean(steady)), "positions_per_s": positions / float(np.sum(steady)),
           "critical_path_ms": 1e3 * float(np.mean(critical)),
           "misses_at_use": stats.get("misses_at_use"), "hits_at_use": stats.get("hits_at_use"),
           "prefetched_rows": stats.get("prefetched_rows"), "stall_ms": stats.get("stall_ms"),
           "evicted_rows": stats.get("evicted_rows"), "written_back_rows": stats.get("written_back_rows"),
           "mean_window": float(np.mean([s["window"] for s in stats["per_step"]])) if stats else None}
    return {"row": row, "values": values.cpu(), "per_step": stats.get("per_step", [])}


def run_trace(name: str, trace, rows: int, fractions, work: str, warmup: int, reps: int,
              budget_floor: int = 0, device: str = "cpu", cold: bool = False,
              kinds=("lookahead", "lru", "lfu")) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Every variant on ``trace``, ``reps`` times round robin. ``cold``: each store variant's
    TierPS files leave the page cache before its run (the same cold start for all)."""
    # The trace stays on the host, as a loader yields it (pinned on a GPU run, so each step's
    # copy to the device waits for nothing); every variant moves each batch in its step.
    if device != "cpu":
        trace = [{k: v.pin_memory() for k, v in b.items()} for b in trace]
    image = os.path.join(work, f"{name}-image")
    build_cold_store(image, rows)
    variants: List[Tuple[str, Optional[float], int]] = [("in_memory", None, 0)]
    budgets = {}
    for f in fractions:
        budgets[f] = max(int(f * rows), budget_floor)
        variants += [(k, f, budgets[f]) for k in kinds]
    variants.append(("tierps_only", None, 0))
    results, detail = [], {}
    step_ms: Dict[Tuple[str, Optional[float]], List[float]] = {}
    critical_ms: Dict[Tuple[str, Optional[float]], List[float]] = {}
    rerun_diff: List[float] = []  # in_memory against its own first run: the noise floor of the comparison
    # Round robin over the variants, `reps` times: load from other jobs on the machine
    # then hits every variant alike, and the median of each variant's runs is reported.
    for rep in range(reps):
        for kind, frac, budget in variants:
            out = run_variant(kind, budget, trace, rows, image, work, warmup, device=device, cold=cold)
            step_ms.setdefault((kind, frac), []).append(out["row"]["step_ms"])
            critical_ms.setdefault((kind, frac), []).append(out["row"]["critical_path_ms"])
            print(f"  {name} {kind} budget={budget or '-'} run {rep + 1}/{reps}: {out['row']['step_ms']:.1f} ms/step",
                  flush=True)
            if rep > 0 and kind == "in_memory":
                rerun_diff.append(float((out["values"] - detail[("in_memory", None)]["values"]).abs().max()))
            if rep == 0:
                out["row"]["trace"] = name
                out["row"]["budget_fraction"] = frac
                results.append(out["row"])
                detail[(kind, frac)] = out
    for key, out in detail.items():
        runs = step_ms[key]
        out["row"]["step_ms_runs"] = runs
        out["row"]["step_ms"] = float(np.median(runs))
        out["row"]["critical_path_ms_runs"] = critical_ms[key]
        out["row"]["critical_path_ms"] = float(np.median(critical_ms[key]))
        out["row"]["positions_per_s"] *= runs[0] / out["row"]["step_ms"]
    ref = detail[("in_memory", None)]["values"]
    for (kind, frac), out in detail.items():
        out["row"]["max_abs_diff_vs_in_memory"] = float((out["values"] - ref).abs().max())
    # A deterministic device gives 0 here; a nonzero figure (e.g. atomics in a GPU kernel's
    # backward) is how far two identical runs drift apart, the scale to read the others against.
    detail[("in_memory", None)]["row"]["max_abs_diff_in_memory_rerun"] = max(rerun_diff) if rerun_diff else None
    return results, {"detail": detail, "budgets": budgets}


# ---------------------------------------------------------------- two workers (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank: int, world: int, port: int, trace, rows: int, budget: int, image: str, work: str,
               warmup: int, out_path: str) -> None:
    import torch.distributed as dist

    from gauss_plugins.cache import CacheConfig, LookaheadCache
    from gauss_plugins.embedding import SparseOptimizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def local(batch):  # this rank's share of the global batch (rows of sequences)
            n = batch["ids"].shape[0]
            lo, hi = rank * n // world, (rank + 1) * n // world
            return {"ids": batch["ids"][lo:hi], "targets": batch["targets"][lo:hi],
                    "global_positions": int((batch["targets"] > 0).sum())}

        def exchange(ids: torch.Tensor) -> torch.Tensor:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([ids.numel()]))
            width = int(max(s.item() for s in sizes))
            padded = torch.full((width,), -1, dtype=torch.int64)
            padded[: ids.numel()] = ids
            parts = [torch.empty(width, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(parts, padded)
            return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

        def reduce(g: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(g)
            return g

        model = Model(trace[0]["ids"].shape[1])
        dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        store = open_cold(image, os.path.join(work, f"dp{world}-rank{rank}"), rows)
        table = make_table("items", budget)
        table.synchronized_replicas = world > 1
        cache = LookaheadCache({"items": table}, store, CacheConfig(budget_rows=budget, window=WINDOW),
                               ids_fn=lambda b: {"items": batch_ids(b)}, exchange=exchange if world > 1 else None)
        sparse_opt = SparseOptimizer(table)
        table.train()
        times, t_prev = [], None
        for i, batch in enumerate(cache.wrap([local(b) for b in trace])):
            if i == warmup:
                dist.barrier()
                t_prev = time.perf_counter()
            uniq = cache.batch_ids()["items"] if world > 1 else None  # the global batch's ids, as cached
            train_step(model, table, dense_opt, sparse_opt, batch, reduce=reduce if world > 1 else None, uniq=uniq)
            cache.step_done()
            if t_prev is not None and i >= warmup:
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
        misses = cache.stats()["misses_at_use"]
        cache.close()
        store.close()
        if rank == 0:
            with open(out_path, "w") as f:
                f.write(f"{sum(times)} {len(times)} {misses}\n")
    finally:
        dist.destroy_process_group()


def scaling_2_workers(trace, rows: int, budget: int, image: str, work: str, warmup: int) -> Dict[str, Any]:
    import torch.multiprocessing as mp

    out = {}
    for world in (1, 2):
        path = os.path.join(work, f"dp{world}.txt")
        mp.spawn(_dp_worker, args=(world, _free_port(), trace, rows, budget, image, work, warmup, path),
                 nprocs=world, join=True)
        total, steps, misses = open(path).read().split()
        out[world] = {"batches_per_s": int(steps) / float(total), "misses_at_use": int(misses)}
    return {"batches_per_s_1": out[1]["batches_per_s"], "batches_per_s_2": out[2]["batches_per_s"],
            "scaling_2_workers": out[2]["batches_per_s"] / out[1]["batches_per_s"],
            "misses_at_use": out[1]["misses_at_use"] + out[2]["misses_at_use"]}


# ---------------------------------------------------------------- plot
def plot(per_step_la: List[Dict[str, float]], per_step_lru: List[Dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    steps = np.arange(len(per_step_la))
    axes[0].plot(steps, [s["hits_at_use"] for s in per_step_la], label="lookahead hits at use")
    axes[0].plot(steps, [s["misses_at_use"] for s in per_step_la], label="lookahead misses at use")
    axes[0].plot(np.arange(len(per_step_lru)), [s["misses_at_use"] for s in per_step_lru], label="LRU misses", alpha=0.7)
    axes[0].set_ylabel("rows")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [s["stall_ms"] for s in per_step_la], label="lookahead")
    axes[1].plot(np.arange(len(per_step_lru)), [s["stall_ms"] for s in per_step_lru], label="LRU (fetch on miss)", alpha=0.7)
    axes[1].set_ylabel("stall ms")
    axes[1].legend(fontsize=8)
    axes[2].step(steps, [s["window"] for s in per_step_la], where="post")
    axes[2].set_ylabel("window (batches)")
    axes[2].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main
PARTS = ("zipf", "cold", "ml100k", "scaling")


def _parts(spec: Optional[str]) -> List[str]:
    if not spec:
        return list(PARTS)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise SystemExit(f"--only takes a comma-separated list of {', '.join(PARTS)}; got {spec!r}")
    return parts


def write_partial(json_path: Optional[str], results: List[Dict[str, Any]], summary: Dict[str, Any]) -> None:
    """The record so far (atomic), so a run cut by a time limit still leaves its finished parts."""
    if json_path:
        from gauss_plugins.train.report import write_json

        write_json(json_path, {"benchmark": NAME, "machine": machine_info(), "results": results,
                               "summary": dict(summary, complete=False)})


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="ids in the Zipf stream (100k; 20k with --quick)")
    p.add_argument("--steps", type=int, default=None, help="Zipf steps per variant (60; 30 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="runs of each variant, round robin (3; 2 with --quick)")
    p.add_argument("--only", default=None, metavar="PARTS",
                   help=f"run only these parts (comma-separated: {', '.join(PARTS)}); default all. "
                        f"'--only scaling' re-measures scaling_2_workers alone")
    p.add_argument("--scaling-models", default=None,
                   help="models of the two-process run (comma-separated: hstu, mlp; default hstu,mlp, with "
                        "--quick hstu); the first one gives scaling_2_workers")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: tables (the fast tier) and the model on the GPU, TierPS on the host, prefetch "
                        "copies on a side CUDA stream")
    p.add_argument("--no-ml100k", action="store_true", help="skip the ML-100K trace")
    p.add_argument("--no-scaling", action="store_true", help="skip the two-process run")
    args = p.parse_args(argv)
    parts = _parts(args.only)
    if args.no_ml100k and "ml100k" in parts:
        parts.remove("ml100k")
    if args.no_scaling and "scaling" in parts:
        parts.remove("scaling")
    device = args.device
    if device == "cuda":
        from gauss_plugins.benchmarking import cuda_skip_reason

        why = cuda_skip_reason()
        if why is not None:
            write_skip(NAME, why, args.json)
            return 0
    spec = args.scaling_models or ("hstu" if args.quick else "hstu,mlp")
    scaling_models = [m.strip() for m in spec.split(",") if m.strip()]
    if not scaling_models or any(m not in ("hstu", "mlp") for m in scaling_models):
        raise SystemExit(f"--scaling-models takes hstu and/or mlp, got {spec!r}")
    rows = args.rows or (20_000 if args.quick else 100_000)
    steps = args.steps or (30 if args.quick else 60)
    warmup = 3 if args.quick else 5
    reps = args.reps or (2 if args.quick else 3)
    # One torch thread, as in each process of the two-worker run: the worker thread of the
    # cache and the training thread then share the machine's cores as they would per rank.
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="gauss-lookahead-bench-")
    summary: Dict[str, Any] = {"device": device, "parts": parts, "load_average_1m_start": os.getloadavg()[0]}
    results: List[Dict[str, Any]] = []
    try:
        zipf = zipf_trace(rows, steps)
        if "zipf" in parts or "cold" in parts:
            print(f"zipf: {rows} ids, {steps} steps of {SEQS_PER_BATCH}x{SEQ_LEN} positions, "
                  f"{int(np.mean([batch_ids(b).unique().numel() for b in zipf]))} distinct ids a batch "
                  f"(device {device})", flush=True)
        if "zipf" in parts:
            res, info = run_trace("zipf", zipf, rows, (0.10, 0.25), work, warmup, reps, device=device)
            results += res
            d = info["detail"]
            ms = {k: d[k]["row"]["step_ms"] for k in d}
            cp = {k: d[k]["row"]["critical_path_ms"] for k in d}
            summary.update({
                "misses_at_use": int(sum(r["misses_at_use"] for r in res if r["variant"] == "lookahead")),
                "step_time_ratio_vs_in_memory": ms[("lookahead", 0.10)] / ms[("in_memory", None)],
                "speedup_vs_lru": ms[("lru", 0.10)] / ms[("lookahead", 0.10)],
                "speedup_vs_lfu": ms[("lfu", 0.10)] / ms[("lookahead", 0.10)],
                "speedup_vs_tierps_only": ms[("tierps_only", None)] / ms[("lookahead", 0.10)],
                "critical_path_ratio_vs_in_memory": cp[("lookahead", 0.10)] / cp[("in_memory", None)],
                "critical_path_speedup_vs_lru": cp[("lru", 0.10)] / cp[("lookahead", 0.10)],
                "critical_path_speedup_vs_lfu": cp[("lfu", 0.10)] / cp[("lookahead", 0.10)],
                "stall_ms_per_step_lookahead": d[("lookahead", 0.10)]["row"]["stall_ms"] / steps,
                "stall_ms_per_step_lru": d[("lru", 0.10)]["row"]["stall_ms"] / steps,
                "max_abs_diff_vs_in_memory": max(r["max_abs_diff_vs_in_memory"] for r in res
                                                 if r["variant"] != "in_memory"),
                "max_abs_diff_in_memory_rerun": d[("in_memory", None)]["row"]["max_abs_diff_in_memory_rerun"],
            })
            if args.json:
                plot(d[("lookahead", 0.10)]["per_step"], d[("lru", 0.10)]["per_step"],
                     os.path.splitext(args.json)[0] + ".png",
                     f"Zipf stream, {rows} ids, budget {info['budgets'][0.10]} rows (10%), window {WINDOW}, {device}")
            write_partial(args.json, results, summary)
        if "cold" in parts:
            why = page_cache_skip_reason()
            if why is not None:
                results.append({"trace": "zipf_cold", "skipped": why})
                print(f"zipf_cold: skipped ({why})")
            else:
                # The same stream with TierPS's segment files dropped from the page cache before
                # each store variant's run: a miss then reads the device, as on a cold SSD.
                res, info_c = run_trace("zipf_cold", zipf, rows, (0.10,), work, warmup, reps, device=device,
                                        cold=True)
                results += res
                dc = info_c["detail"]
                msc = {k: dc[k]["row"]["step_ms"] for k in dc}
                summary["misses_at_use"] = summary.get("misses_at_use", 0) + int(
                    sum(r["misses_at_use"] for r in res if r["variant"] == "lookahead"))
                summary.update({
                    "cold_speedup_vs_lru": msc[("lru", 0.10)] / msc[("lookahead", 0.10)],
                    "cold_speedup_vs_lfu": msc[("lfu", 0.10)] / msc[("lookahead", 0.10)],
                    "cold_speedup_vs_tierps_only": msc[("tierps_only", None)] / msc[("lookahead", 0.10)],
                    "cold_step_time_ratio_vs_in_memory": msc[("lookahead", 0.10)] / msc[("in_memory", None)],
                    "cold_stall_ms_per_step_lookahead": dc[("lookahead", 0.10)]["row"]["stall_ms"] / steps,
                    "cold_stall_ms_per_step_lru": dc[("lru", 0.10)]["row"]["stall_ms"] / steps,
                })
                if args.json:
                    plot(dc[("lookahead", 0.10)]["per_step"], dc[("lru", 0.10)]["per_step"],
                         os.path.splitext(args.json)[0] + "_cold.png",
                         f"Zipf stream, cold page cache, {rows} ids, budget {info_c['budgets'][0.10]} rows (10%), "
                         f"window {WINDOW}, {device}")
            write_partial(args.json, results, summary)
        if "ml100k" in parts:
            # An HSTU step over 128 x 200 positions takes about 2 s on one CPU thread: few
            # steps and one run of each variant (so this trace's ratios carry more noise).
            ml_steps = 5 if args.quick else 12
            trace, items, where = ml100k_trace(ml_steps)
            if trace is None:
                results.append({"trace": "ml100k", "skipped": where})
                print(f"ml100k: skipped ({where})")
            else:
                need = max(batch_ids(b).unique().numel() for b in trace)
                print(f"ml100k ({where}): {items - 1} items, {ml_steps} steps, one batch needs up to {need} rows",
                      flush=True)
                res, info_ml = run_trace("ml100k", trace, items - 1, (0.10, 0.25), work, 1, 1, budget_floor=need,
                                         device=device)
                for r in res:
                    r["effective_budget_rows"] = r["budget_rows"]
                results += res
                dm = info_ml["detail"]
                summary["misses_at_use"] = summary.get("misses_at_use", 0) + int(
                    sum(r["misses_at_use"] for r in res if r["variant"] == "lookahead"))
                summary["ml100k_step_time_ratio_vs_in_memory"] = (dm[("lookahead", 0.10)]["row"]["step_ms"]
                                                                  / dm[("in_memory", None)]["row"]["step_ms"])
                summary["ml100k_speedup_vs_lru"] = (dm[("lru", 0.10)]["row"]["step_ms"]
                                                    / dm[("lookahead", 0.10)]["row"]["step_ms"])
            write_partial(args.json, results, summary)
        if "scaling" in parts:
            # The 25% budget: a per-worker-batch step of two processes caches the rows of a
            # global batch twice the size (both runs get the same budget).
            sc = run_scaling(zipf, rows, steps, int(0.25 * rows), warmup, work, device, scaling_models, results,
                             lambda done: write_partial(args.json, results, dict(summary, **done)))
            summary["misses_at_use"] = summary.get("misses_at_use", 0) + sc.pop("scaling_misses_at_use", 0)
            summary.update(sc)
        print_table([r for r in results if "step_ms" in r],
                    ["trace", "variant", "budget_fraction", "budget_rows", "step_ms", "critical_path_ms",
                     "misses_at_use", "stall_ms", "prefetched_rows", "mean_window", "max_abs_diff_vs_in_memory"])
        scaling_rows = [r for r in results if r.get("variant") == "data_parallel"]
        if scaling_rows:
            print_table(scaling_rows, ["model", "batching", "batches_per_s_1_worker", "batches_per_s_2_workers",
                                       "scaling_2_workers", "scaling_2_workers_replicated",
                                       "scaling_2_workers_ddp_control", "cpu_ms_per_step_1",
                                       "cpu_ms_per_step_2", "cpu_ms_per_step_2_replicated",
                                       "load_average_1m"])
        summary["load_average_1m"] = os.getloadavg()[0]
        summary["complete"] = True
        write_report(NAME, results, summary, args.json,
                     targets={"misses_at_use": "<= 0", "step_time_ratio_vs_in_memory": "<= 1.1",
                              "speedup_vs_lru": ">= 1.5", "scaling_2_workers": ">= 1.9"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


SCALING_MODES = (("per_worker_batch", True), ("global_batch", False))


def run_scaling(zipf, rows: int, steps: int, budget: int, warmup: int, work: str, device: str,
                models: List[str], results: List[Dict[str, Any]],
                on_figure: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Two processes against one, for each model and two batchings (a record each in
    ``results``): ``per_worker_batch`` (weak scaling: each process trains 32 sequences a step,
    the usual data-parallel throughput figure) and ``global_batch`` (strong scaling: the 32
    sequences of a step split across the processes). Summary keys: ``scaling_2_workers`` is the
    first model's per-worker-batch figure; the others are ``scaling_2_workers_<model>_<batching>``.
    Throughput is sequences a second, from the slowest rank's median step. On CUDA it needs two
    GPUs (NCCL does not put two ranks on one device): with fewer, the record says so.
    ``on_figure(keys so far)`` runs after each figure (the caller writes the partial record)."""
    out: Dict[str, Any] = {}
    if device == "cuda" and torch.cuda.device_count() < 2:
        why = f"needs 2 GPUs for 2 NCCL ranks; this machine has {torch.cuda.device_count()}"
        results.append({"trace": "zipf", "variant": "data_parallel", "skipped": why})
        print(f"scaling: skipped ({why})")
        out["scaling_2_workers_skipped"] = why
        return out
    try:  # the Lightning strategy's own data-parallel runner, when Lightning is installed
        from gauss_integrations.lightning.strategy_bench import scaling as strategy_scaling
    except ImportError as exc:
        strategy_scaling, why = None, f"{type(exc).__name__}: {exc}"
    for i, model in enumerate(models):
        for batching, per_worker in SCALING_MODES:
            key = "scaling_2_workers" if (i, per_worker) == (0, True) else f"scaling_2_workers_{model}_{batching}"
            if strategy_scaling is not None:
                sc = strategy_scaling(rows=rows, steps=steps, budget_rows=budget, window=WINDOW, warmup=warmup,
                                      model=model, accelerator="gpu" if device == "cuda" else "cpu",
                                      per_worker_batch=per_worker)
                runner = ("GaussStrategy (Lightning DDP, gloo/NCCL, popen launcher; partitioned caches, rows "
                          "and row gradients by all-to-all): gauss_integrations.lightning.strategy_bench.scaling")
                cpu1 = sc["runs"][0]["cpu_ms_per_step_per_rank"]
                cpu2 = sc["runs"][1]["cpu_ms_per_step_per_rank"]
                replicated = None
                if key == "scaling_2_workers":
                    # Before/after in one run: the replicated caches' two processes against the
                    # same one-process run (world 1 is the same in both designs).
                    rep = strategy_scaling(rows=rows, steps=steps, budget_rows=budget, window=WINDOW,
                                           warmup=warmup, model=model,
                                           accelerator="gpu" if device == "cuda" else "cpu",
                                           per_worker_batch=per_worker, worlds=(2,), partitioned=False)
                    replicated = {"scaling_2_workers": rep["runs"][0]["sequences_per_s"]
                                  / sc["runs"][0]["sequences_per_s"],
                                  "cpu_ms_per_step_2": rep["runs"][0]["cpu_ms_per_step_per_rank"],
                                  "misses_at_use": rep["misses_at_use"], "run": rep["runs"][0]}
                    out[key + "_replicated"] = replicated["scaling_2_workers"]
                    out["scaling_misses_at_use"] = out.get("scaling_misses_at_use", 0) + rep["misses_at_use"]
            elif model == "hstu" and device == "cpu" and not per_worker:
                image = os.path.join(work, "zipf-image")
                if not os.path.isdir(image):  # the zipf part did not run: build the same cold store
                    build_cold_store(image, rows)
                sc = scaling_2_workers(zipf, rows, budget, image, work, warmup)
                runner = (f"this benchmark's own 2-process gloo run (exchange by all_gather, row gradients "
                          f"all-reduced, a TierPS replica per process); the strategy runner is unavailable ({why})")
                cpu1 = cpu2 = replicated = None
                replicated = None
            else:
                results.append({"trace": "zipf", "variant": "data_parallel", "model": model, "batching": batching,
                                "skipped": f"the strategy runner is unavailable ({why})"})
                continue
            out[key] = sc["scaling_2_workers"]
            out["scaling_misses_at_use"] = out.get("scaling_misses_at_use", 0) + sc["misses_at_use"]
            control = None
            if strategy_scaling is not None:
                # The ceiling: the same dense model and batches under plain DDP, without table or
                # cache (fixed features of the ids), on this machine now.
                ctl = strategy_scaling(rows=rows, steps=steps, budget_rows=budget, window=WINDOW, warmup=warmup,
                                       model=model, accelerator="gpu" if device == "cuda" else "cpu",
                                       per_worker_batch=per_worker, cache=False)
                control = ctl["scaling_2_workers"]
                out[key + "_ddp_control"] = control
            load = os.getloadavg()[0]
            before = "" if replicated is None else \
                f", replicated caches {replicated['scaling_2_workers']:.3f}"
            print(f"  scaling {model} {batching}: {sc['scaling_2_workers']:.3f}{before}, plain DDP without the cache "
                  f"{control if control is None else round(control, 3)} (load {load:.1f})", flush=True)
            results.append({"trace": "zipf", "variant": "data_parallel", "model": model, "batching": batching,
                            "budget_rows": budget, "devices": device,
                            "batches_per_s_1_worker": sc["batches_per_s_1"],
                            "batches_per_s_2_workers": sc["batches_per_s_2"],
                            "scaling_2_workers": sc["scaling_2_workers"],
                            "scaling_2_workers_wall": sc.get("scaling_2_workers_wall"),
                            "cpu_ms_per_step_1": cpu1, "cpu_ms_per_step_2": cpu2,
                            "scaling_2_workers_ddp_control": control,
                            "scaling_2_workers_replicated": None if replicated is None else
                            replicated["scaling_2_workers"],
                            "cpu_ms_per_step_2_replicated": None if replicated is None else
                            replicated["cpu_ms_per_step_2"],
                            "replicated_run": None if replicated is None else replicated["run"],
                            "load_average_1m": load, "runner": runner, "runs": sc.get("runs")})
            if on_figure is not None:
                on_figure(out)
    return out


if __name__ == "__main__":
    sys.exit(main())
