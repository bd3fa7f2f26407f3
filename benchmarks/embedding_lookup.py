"""Benchmark: dynamic embedding tables on CPU against static and TorchRec/FBGEMM baselines (issue 3).

Workload (the issue's): dim 64, ids drawn Zipf(1.1) from a 10M-id space (rank r -> a raw
int64 id by a hash, so ids are spread over the whole int64 range), batches of 65,536 ids in
bags of 16, a table holding the 2M most frequent ids (``max_capacity`` 2M: slot load factor
0.75; ~96% of the ids of a batch are present). Same ids for every system, in one run:

* **lookup + sum-pooling** (eval): ``DynamicEmbeddingTable.lookup_pooled`` (probe + pool in
  one C++ pass) vs ``nn.EmbeddingBag`` on the ids pre-mapped to rows (absent ids -> a zero
  row; its weight as allocated by torch, and again on 2 MiB pages like the table's) and
  TorchRec's unsharded ``EmbeddingBagCollection`` on the same rows;
* **id -> row remap** (train mode, over a stream of batches): TorchRec
  ``MCHManagedCollisionModule`` (profile + searchsorted remap; its 2M sorted ids loaded
  directly) without an eviction in the window and with eviction every 8 batches, vs
  ``DynamicEmbeddingTable.remap`` (find, admission and insertion of absent ids, version
  stamps) on a table with room for the stream's new ids and on the 2M-row table at capacity
  (LRU eviction of 1% of the rows whenever new ids need room); the bare ``find``;
* **train step** (forward + backward + row-wise Adagrad, over the stream): FBGEMM's
  ``SplitTableBatchedEmbeddingBagsCodegen`` (HOST, CPU, ``EXACT_ROWWISE_ADAGRAD``, fused
  in backward) on pre-mapped rows vs the table at capacity in train mode +
  ``SparseOptimizer.step`` (``rowwise_adagrad``; new ids inserted, LRU eviction), and the
  same step on a table already holding every id of the stream (the static kernel's
  situation); ``nn.EmbeddingBag(sparse=True)`` + SGD for reference;
* **lookup-or-insert of new ids**: batches of 65,536 distinct unseen ids through a training
  lookup (insert, deterministic init of the rows and their optimizer state, stamps) on a
  table with room for them, and the index ``insert`` alone;
* **memory**: index + policy + version bytes per live row beyond the vector.

Systems compared with each other are timed *interleaved*, call by call on the same batch,
so a change of machine load hits all of them alike (the CPU machines are shared); lookups
report the median call, training paths the total over the stream (eviction included).
Run with 2 threads (``--threads``); the load average is recorded with the result.
``--quick`` shrinks the id space and the table 10x.

Summary: lookup_ratio_vs_static (>= 0.5), remap_ratio_vs_torchrec_mch (>= 1.5; the lower of
the with-eviction and without-eviction ratios), train_step_ratio_vs_fbgemm (>= 1.0),
insert_ids_per_s, overhead_bytes_per_row (<= 24), load_factor.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from gauss_plugins.benchmarking import parser, print_table, write_report
from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer
from gauss_plugins.embedding.index import hash_keys
from gauss_plugins.embedding.memory import alloc

DIM, BAG, ZIPF_S = 64, 16, 1.1
# Issue 3's goals for the summary keys (the machine-independent ratios, and memory).
TARGETS = {"lookup_ratio_vs_static": ">= 0.5", "remap_ratio_vs_torchrec_mch": ">= 1.5",
           "train_step_ratio_vs_fbgemm": ">= 1.0", "overhead_bytes_per_row": "<= 24"}
LR, EPS = 0.01, 1e-8


def zipf_sampler(space: int, seed: int):
    ranks = torch.arange(1, space + 1, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-ZIPF_S), 0)
    cdf /= cdf[-1].clone()
    gen = torch.Generator().manual_seed(seed)

    def sample(n: int) -> torch.Tensor:
        return torch.searchsorted(cdf, torch.rand(n, dtype=torch.float64, generator=gen)).clamp_max(space - 1)

    return sample


def ids_of(ranks: torch.Tensor) -> torch.Tensor:
    """Raw int64 ids of Zipf ranks (rank 0 most frequent), spread over int64."""
    return hash_keys(ranks + 0x5EED)


def interleaved(fns: Dict[str, Callable[[int], Any]], calls: int, n_batches: int, warmup: int = 2
                ) -> Dict[str, List[float]]:
    """Seconds of each call of each function, the functions alternating on the same batch
    (the order rotates so none always runs first)."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](i % n_batches)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(calls):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name](i % n_batches)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="calls per system (lookups and training streams)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    space, rows_n = (1_000_000, 200_000) if args.quick else (10_000_000, 2_000_000)
    n_ids = 65_536
    n_batches = 8 if args.quick else 16
    calls = args.repeats or (16 if args.quick else 48)
    load_before = os.getloadavg()
    t_start = time.time()

    sample = zipf_sampler(space, seed=0)
    batches_ranks = [sample(n_ids) for _ in range(n_batches)]
    batches = [ids_of(r) for r in batches_ranks]
    offsets = torch.arange(0, n_ids + 1, BAG, dtype=torch.int64)
    B = offsets.numel() - 1
    present_frac = float(torch.cat(batches_ranks).lt(rows_n).float().mean())
    # static baselines see the same ids pre-mapped to rows: rank r < rows_n -> row r, else the zero row
    mapped = [torch.where(r < rows_n, r, torch.full_like(r, rows_n)) for r in batches_ranks]
    results: List[Dict[str, Any]] = []

    def record(what: str, system: str, ids_per_s: float, **extra) -> float:
        results.append({"what": what, "system": system, "ids_per_s": ids_per_s, **extra})
        return ids_per_s

    def median_rate(ts: List[float]) -> float:
        return n_ids / statistics.median(ts)

    def stream_rate(ts: List[float]) -> float:
        return n_ids * len(ts) / sum(ts)

    # ------------------------------------------------------------------ the dynamic table
    g = torch.Generator().manual_seed(1)
    init = torch.empty(rows_n + 1, DIM).uniform_(-0.01, 0.01, generator=g)
    init[rows_n] = 0
    opt_cfg = OptimizerConfig("rowwise_adagrad", lr=LR, eps=EPS)
    cfg = DynamicTableConfig(name="bench", dim=DIM, initial_capacity=rows_n, max_capacity=rows_n, eviction="lru",
                             optimizer=opt_cfg, backend="auto")
    t0 = time.perf_counter()
    table = DynamicEmbeddingTable(cfg)
    all_ids = ids_of(torch.arange(rows_n))
    table.set(all_ids, init[:rows_n])
    build_s = time.perf_counter() - t0
    backend = type(table.index).__name__
    mem = table.memory_report()
    table.eval()

    # ------------------------------------------------------------------ 1. lookup + pooling
    with torch.no_grad():
        ref = nn.EmbeddingBag(rows_n + 1, DIM, mode="sum", include_last_offset=True, _weight=init.clone())
        # the table keeps its arrays on 2 MiB pages (gauss_plugins.embedding.memory); the static
        # bag is timed on those pages too, so the page size is not all the ratio measures
        w_huge = alloc((rows_n + 1, DIM), torch.float32, "cpu")
        w_huge.copy_(init)
        fns = {
            "static": lambda i: ref(mapped[i], offsets),
            "static_huge": lambda i: nn.functional.embedding_bag(mapped[i], w_huge, offsets, mode="sum",
                                                                 include_last_offset=True),
            "dynamic": lambda i: table.lookup_pooled(batches[i], offsets),
        }
        try:
            from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

            ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name="t", embedding_dim=DIM, num_embeddings=rows_n + 1, feature_names=["f"])], device=torch.device("cpu"))
            ebc.embedding_bags["t"].weight.data.copy_(init)
            lengths = torch.full((B,), BAG, dtype=torch.int64)
            kjts = [KeyedJaggedTensor(keys=["f"], values=m, lengths=lengths) for m in mapped]
            fns["ebc"] = lambda i: ebc(kjts[i])
        except ImportError as exc:
            results.append({"what": "lookup+sum-pool", "system": "torchrec EBC", "skipped": str(exc)})
        ts = interleaved(fns, calls, n_batches)
        static = record("lookup+sum-pool", "nn.EmbeddingBag (pre-mapped rows)", median_rate(ts["static"]))
        static_huge = record("lookup+sum-pool", "nn.EmbeddingBag (pre-mapped rows, weight on 2 MiB pages)",
                             median_rate(ts["static_huge"]))
        dyn = record("lookup+sum-pool", f"DynamicEmbeddingTable.lookup_pooled eval ({backend})", median_rate(ts["dynamic"]))
        ebc_rate = record("lookup+sum-pool", "torchrec EmbeddingBagCollection (pre-mapped rows)",
                          median_rate(ts["ebc"])) if "ebc" in ts else None
        max_err = float((table.lookup_pooled(batches[0], offsets) - ref(mapped[0], offsets)).abs().max())
        find_rate = record("id->row remap", f"index.find ({backend})",
                           median_rate(interleaved({"find": lambda i: table.index.find(batches[i])},
                                                   calls, n_batches)["find"]))

    # ------------------------------------------------------------------ 2. remap (train mode)
    # A table with room for every new id of the stream (no eviction), and the 2M-row table at
    # capacity (LRU eviction). Both see the same stream, interleaved with TorchRec's MCH.
    stream_new = torch.unique(torch.cat([b[r >= rows_n] for b, r in zip(batches, batches_ranks)])).numel()
    roomy = DynamicEmbeddingTable(DynamicTableConfig(
        name="roomy", dim=DIM, initial_capacity=rows_n + stream_new + 1024, max_capacity=rows_n + stream_new + 1024,
        eviction="lru", optimizer=opt_cfg))
    roomy.set(all_ids, init[:rows_n])
    roomy.train()
    table.train()
    mch_rate = mch_evict_rate = None
    fns_free: Dict[str, Callable[[int], Any]] = {"dynamic": lambda i: roomy.remap(batches[i])}
    fns_evict: Dict[str, Callable[[int], Any]] = {"dynamic": lambda i: table.remap(batches[i])}
    try:
        from torchrec.modules.mc_modules import LRU_EvictionPolicy, MCHManagedCollisionModule
        from torchrec.sparse.jagged_tensor import JaggedTensor

        lengths = torch.full((B,), BAG, dtype=torch.int64)
        jts = [{"f": JaggedTensor(values=b, lengths=lengths)} for b in batches]

        def make_mch(interval: int):
            mch = MCHManagedCollisionModule(zch_size=rows_n, device=torch.device("cpu"),
                                            eviction_policy=LRU_EvictionPolicy(), eviction_interval=interval)
            with torch.no_grad():  # its state: the 2M ids sorted, and their rows
                sorted_ids, order = all_ids.sort()
                mch._mch_sorted_raw_ids.copy_(sorted_ids)
                mch._mch_remapped_ids_mapping.copy_(order)
            return mch.train()

        with torch.no_grad():
            mch_free = make_mch(calls + 8)  # its history is coalesced (eviction) only after the window
            check = mch_free(jts[0])["f"].values()
            hit = mapped[0] < rows_n
            assert torch.equal(check[hit], mapped[0][hit])
            mch_evict = make_mch(8)
            fns_free["mch"] = lambda i: mch_free(jts[i])
            fns_evict["mch"] = lambda i: mch_evict(jts[i])
    except ImportError as exc:
        results.append({"what": "id->row remap", "system": "torchrec MCH", "skipped": str(exc)})
    with torch.no_grad():
        ts_free = interleaved(fns_free, calls, n_batches)
        evictions_before = len(table._tombstone_ids)
        ts_evict = interleaved(fns_evict, calls, n_batches)
        eviction_rounds = len(table._tombstone_ids) - evictions_before
    if "mch" in ts_free:
        mch_rate = record("id->row remap", "torchrec MCHManagedCollisionModule train, no eviction in window",
                          stream_rate(ts_free["mch"]))
        mch_evict_rate = record("id->row remap", "torchrec MCHManagedCollisionModule train, eviction every 8 batches",
                                stream_rate(ts_evict["mch"]))
        del mch_free, mch_evict
    remap_noevict_rate = record("id->row remap", f"DynamicEmbeddingTable.remap train ({backend}), no eviction",
                                stream_rate(ts_free["dynamic"]))
    remap_rate = record("id->row remap", f"DynamicEmbeddingTable.remap train ({backend}), LRU eviction at capacity",
                        stream_rate(ts_evict["dynamic"]), eviction_rounds=eviction_rounds)

    # ------------------------------------------------------------------ 3. train step
    def trainer(t: DynamicEmbeddingTable):
        opt = SparseOptimizer(t)

        def step(i):
            t.lookup_pooled(batches[i], offsets).sum().backward()
            opt.step()
            opt.zero_grad()

        return step

    # every id of the stream is in `roomy` by now: its step has no insertion or eviction
    fns_train: Dict[str, Callable[[int], Any]] = {"dynamic": trainer(table), "dynamic_present": trainer(roomy)}
    fbgemm_rate = None
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(rows_n + 1, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=LR, eps=EPS,
            pooling_mode=PoolingMode.SUM, device=torch.device("cpu"))
        tbe.split_embedding_weights()[0].data.copy_(init)
        fns_train["fbgemm"] = lambda i: tbe(mapped[i], offsets).sum().backward()
    except ImportError as exc:
        results.append({"what": "train step", "system": "FBGEMM TBE", "skipped": str(exc)})
    ts_train = interleaved(fns_train, calls, n_batches)
    dyn_train_rate = record("train step (fwd+bwd+rowwise adagrad)",
                            f"DynamicEmbeddingTable + SparseOptimizer ({backend}), LRU eviction at capacity",
                            stream_rate(ts_train["dynamic"]))
    train_present_rate = record("train step (fwd+bwd+rowwise adagrad)",
                                f"DynamicEmbeddingTable + SparseOptimizer ({backend}), all ids present",
                                stream_rate(ts_train["dynamic_present"]))
    if "fbgemm" in ts_train:
        fbgemm_rate = record("train step (fwd+bwd+rowwise adagrad)",
                             "FBGEMM TBE HOST EXACT_ROWWISE_ADAGRAD (pre-mapped rows)", stream_rate(ts_train["fbgemm"]))
        del tbe
    del roomy, fns_train, fns_free
    sparse_bag = nn.EmbeddingBag(rows_n + 1, DIM, mode="sum", include_last_offset=True, sparse=True, _weight=init.clone())
    sgd = torch.optim.SGD(sparse_bag.parameters(), lr=LR)

    def sparse_train(i):
        sparse_bag(mapped[i], offsets).sum().backward()
        sgd.step()
        sgd.zero_grad()

    record("train step (fwd+bwd+SGD)", "nn.EmbeddingBag(sparse=True) + SGD (pre-mapped rows)",
           stream_rate(interleaved({"s": sparse_train}, max(4, calls // 4), n_batches)["s"]))
    del sparse_bag, sgd

    # ------------------------------------------------------------------ 4. insert of new ids
    n_new_batches = 4 if args.quick else 8
    fresh = [ids_of(torch.arange(space + k * n_ids, space + (k + 1) * n_ids)) for k in range(n_new_batches)]
    room = rows_n + n_new_batches * n_ids  # no growth inside the timed window
    ins_table = DynamicEmbeddingTable(DynamicTableConfig(
        name="ins", dim=DIM, initial_capacity=room, max_capacity=room, eviction="lru", optimizer=opt_cfg))
    ins_table.set(all_ids, init[:rows_n])
    ins_table.train()
    with torch.no_grad():
        ins_table.remap(fresh[0])  # warm up
        t0 = time.perf_counter()
        for b in fresh[1:]:
            ins_table.remap(b)
        insert_rate = record("lookup-or-insert of new ids", f"DynamicEmbeddingTable.remap train ({backend})",
                             n_ids * (n_new_batches - 1) / (time.perf_counter() - t0), note="includes row init")
    del ins_table
    idx = type(table.index)(rows_n + n_ids * n_new_batches, torch.device("cpu"))
    t0 = time.perf_counter()
    for b in fresh:
        idx.insert(b)
    record("lookup-or-insert of new ids", f"index.insert only ({backend})", n_ids * n_new_batches / (time.perf_counter() - t0))

    # ------------------------------------------------------------------ report
    print_table(results, ["what", "system", "ids_per_s"])
    summary = {
        "lookup_ratio_vs_static": dyn / static,
        "lookup_ratio_vs_static_hugepages": dyn / static_huge,
        # headline: the less favourable of the like-for-like pairs (with eviction / without)
        "remap_ratio_vs_torchrec_mch": min(remap_rate / mch_evict_rate, remap_noevict_rate / mch_rate) if mch_rate else None,
        "remap_ratio_with_eviction": remap_rate / mch_evict_rate if mch_evict_rate else None,
        "remap_ratio_without_eviction": remap_noevict_rate / mch_rate if mch_rate else None,
        "train_step_ratio_vs_fbgemm": dyn_train_rate / fbgemm_rate if fbgemm_rate else None,
        "train_step_ratio_all_ids_present": train_present_rate / fbgemm_rate if fbgemm_rate else None,
        "insert_ids_per_s": insert_rate,
        "overhead_bytes_per_row": mem["overhead_bytes_per_row"],
        "load_factor": mem["load_factor"],
        "lookup_ids_per_s": dyn,
        "static_embedding_bag_ids_per_s": static,
        "static_embedding_bag_hugepages_ids_per_s": static_huge,
        "torchrec_ebc_ids_per_s": ebc_rate,
        "remap_ids_per_s": remap_rate,
        "remap_no_eviction_ids_per_s": remap_noevict_rate,
        "find_ids_per_s": find_rate,
        "torchrec_mch_ids_per_s": mch_rate,
        "torchrec_mch_evicting_ids_per_s": mch_evict_rate,
        "train_ids_per_s": dyn_train_rate,
        "train_all_present_ids_per_s": train_present_rate,
        "fbgemm_train_ids_per_s": fbgemm_rate,
    }
    results.append({
        "what": "setup", "backend": backend, "threads": torch.get_num_threads(), "id_space": space, "rows": rows_n,
        "ids_per_batch": n_ids, "bag": BAG, "present_fraction": present_frac, "calls_per_system": calls,
        "stream_new_ids": stream_new, "table_build_s": build_s, "pooled_max_abs_err_vs_static": max_err,
        "memory": mem, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.time() - t_start,
    })
    write_report("embedding_lookup", results, summary, args.json, targets=TARGETS)


if __name__ == "__main__":
    main()
