"""Benchmark: the Triton hash index of dynamic embedding tables on one GPU (issue 3).

Keys are distinct uniform random int64 ids. An index of ``--capacity`` rows
(``ceil(capacity / 0.75)`` slots) is filled in batches of ``--insert-batch`` new keys; find
and insert are then timed at slot load factor 0.5 (the load HierarchicalKV's headline
numbers use) and find again at 0.75 (a full index). Values are a ``[capacity, 64]`` fp32
array (dim 64). Everything is measured in the same run on the same keys:

* ``find``: :class:`TritonHashIndex.find` of ``--find-batch`` present keys (uniform, and
  Zipf(1.1) over the live keys, and half absent) vs the reference
  :class:`TorchHashIndex` (open addressing as torch ops) and vs ``torch.searchsorted`` over
  the sorted live keys plus the row lookup and hit check (a static sorted index);
* ``insert``: a batch of new keys into the index at load 0.5 (state restored before each
  repetition) vs the reference index; plus the rate of the whole fill, and the insert of keys
  already present (lookup-or-insert hits);
* ``find + gather``: keys to their dim-64 value rows: the fused ``find_and_gather`` kernel,
  find then ``index_select``, and ``index_select`` of pre-mapped rows alone (the floor).

Median of ``--repeats`` timings (synchronised wall time). Needs CUDA; on a machine without
one it writes ``{"skipped": "<reason>"}`` with ``--json`` and exits 0::

    python benchmarks/hash_table_gpu.py --json benchmarks/results/hash_table_gpu_h100.json
    python benchmarks/hash_table_gpu.py --sweep   # also time kernel block sizes / warps

Summary: ``find_keys_per_s`` and ``insert_keys_per_s`` (targets 2e9 and 5e8 on an H100),
``find_gather_keys_per_s``, the baselines, and ``load_factor``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import torch

from gauss_plugins.benchmarking import cuda_skip_reason, median_time, parser, print_table, write_report, write_skip
from gauss_plugins.embedding.index import TorchHashIndex

FIND_TARGET, INSERT_TARGET = 2e9, 5e8
DIM = 64
_STATE = ("slot_keys", "slot_rows", "_size", "_tombstones", "_free", "_next_row")


def snapshot(index) -> Dict[str, Any]:
    """A copy of an index's state (both backends keep it in these attributes)."""
    return {name: (v.clone() if torch.is_tensor(v) else v) for name, v in
            ((name, getattr(index, name)) for name in _STATE)}


def restore(index, snap: Dict[str, Any]) -> None:
    for name, value in snap.items():
        setattr(index, name, value.clone() if torch.is_tensor(value) else value)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    return median_time(fn, repeats=repeats, warmup=2, sync=torch.cuda.synchronize)


def timed_from(index, snap, fn: Callable[[], Any], repeats: int) -> float:
    """Median time of ``fn`` (which mutates ``index``), restoring ``snap`` before each run."""
    times = []
    for _ in range(repeats + 1):
        restore(index, snap)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # the first run also compiles
    return times[len(times) // 2]


def zipf_ranks(n_items: int, count: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """``count`` ranks in ``[0, n_items)`` drawn with P(r) ~ (r + 1) ** -alpha."""
    w = torch.arange(1, n_items + 1, device="cuda", dtype=torch.float64).pow(-alpha)
    cdf = torch.cumsum(w, 0)
    u = torch.rand(count, device="cuda", dtype=torch.float64, generator=gen) * cdf[-1]
    return torch.searchsorted(cdf, u).clamp_max(n_items - 1)


def fill(index, keys: torch.Tensor, batch: int) -> List[float]:
    """Insert ``keys`` in batches; returns each batch's seconds."""
    times = []
    for start in range(0, keys.numel(), batch):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        index.insert(keys[start:start + batch])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=1 << 24, help="index capacity in rows")
    p.add_argument("--find-batch", type=int, default=1 << 22)
    p.add_argument("--insert-batch", type=int, default=1 << 20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time BLOCK/num_warps variants of the kernels")
    args = p.parse_args(argv)
    reason = cuda_skip_reason()
    if reason:
        return write_skip("hash_table_gpu", f"{reason}; the Triton index runs only on GPUs (the CPU index is "
                                            f"measured by benchmarks/embedding_lookup.py)", args.json)
    from gauss_kernels.hash_table.triton_index import TritonHashIndex

    if args.quick:
        args.capacity, args.find_batch, args.insert_batch, args.repeats = 1 << 20, 1 << 18, 1 << 16, 5
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(0)
    tri = TritonHashIndex(args.capacity, dev)
    ref = TorchHashIndex(args.capacity, dev)
    n_slots = tri.num_slots
    n_half, n_full = n_slots // 2, args.capacity
    # Distinct random keys over the whole int64 range, in random order, plus spare keys that
    # are never inserted (the absent queries and the new keys of the insert timing).
    universe = torch.unique(torch.randint(-(2**63), 2**63 - 1, (int(n_full * 1.3) + 2 * args.insert_batch,),
                                          device=dev, generator=gen, dtype=torch.int64))
    universe = universe[torch.randperm(universe.numel(), device=dev, generator=gen)]
    # Separate, aligned copies: triton specialises on pointer alignment, and a slice at an
    # odd offset would compile a second variant of each kernel inside a timing.
    live, spare = universe[:n_full].clone(), universe[n_full:].clone()
    rows: List[Dict[str, Any]] = []

    def record(op: str, impl: str, keys: int, seconds: float, **extra: Any) -> float:
        rate = keys / seconds
        rows.append({"op": op, "impl": impl, "keys": keys, "ms": seconds * 1e3, "keys_per_s": rate, **extra})
        return rate

    # Compile the kernels (and warm the reference) outside every timing.
    for warm in (TritonHashIndex(1024, dev), TorchHashIndex(1024, dev)):
        warm.insert(spare[:500]), warm.find(spare[:700]), warm.remove(spare[:10]), warm.rehash(2048)

    # ---- fill to load 0.5: Triton and reference, same keys, same batches
    fill_t = fill(tri, live[:n_half], args.insert_batch)
    record("fill 0->0.5", "triton", n_half, sum(fill_t), batch_ms=[round(t * 1e3, 3) for t in fill_t])
    fill_r = fill(ref, live[:n_half], args.insert_batch)
    record("fill 0->0.5", "torch_index", n_half, sum(fill_r))
    expect = tri.find(live[:n_half])
    assert torch.equal(expect, torch.arange(n_half, device=dev)), "fill: rows are not the insertion order"
    assert torch.equal(ref.find(live[:n_half]), expect)
    snap_t, snap_r = snapshot(tri), snapshot(ref)

    # ---- find at load 0.5
    q_hit = live[:n_half][torch.randint(0, n_half, (args.find_batch,), device=dev, generator=gen)]
    q_zipf = live[:n_half][zipf_ranks(n_half, args.find_batch, 1.1, gen)]
    q_half = torch.where(torch.rand(args.find_batch, device=dev, generator=gen) < 0.5, q_hit,
                         spare[torch.randint(0, spare.numel(), (args.find_batch,), device=dev, generator=gen)])
    sorted_keys, order = live[:n_half].sort()
    sorted_rows = order  # row of live[i] is i

    def searchsorted_find(q):
        pos = torch.searchsorted(sorted_keys, q).clamp_max(n_half - 1)
        return torch.where(sorted_keys[pos] == q, sorted_rows[pos], -1)

    assert torch.equal(searchsorted_find(q_half), tri.find(q_half))
    nb = args.find_batch
    find_rate = record("find", "triton", nb, timed(lambda: tri.find(q_hit), args.repeats), load=0.5, keys_drawn="uniform hits")
    ref_find = record("find", "torch_index", nb, timed(lambda: ref.find(q_hit), args.repeats), load=0.5, keys_drawn="uniform hits")
    ss_find = record("find", "searchsorted", nb, timed(lambda: searchsorted_find(q_hit), args.repeats), load=0.5, keys_drawn="uniform hits")
    zipf_rate = record("find", "triton", nb, timed(lambda: tri.find(q_zipf), args.repeats), load=0.5, keys_drawn="zipf1.1 hits")
    record("find", "searchsorted", nb, timed(lambda: searchsorted_find(q_zipf), args.repeats), load=0.5, keys_drawn="zipf1.1 hits")
    half_rate = record("find", "triton", nb, timed(lambda: tri.find(q_half), args.repeats), load=0.5, keys_drawn="50% absent")
    record("find", "torch_index", nb, timed(lambda: ref.find(q_half), args.repeats), load=0.5, keys_drawn="50% absent")

    # ---- find + gather of dim-64 rows
    values = torch.randn(args.capacity, DIM, device=dev)
    r_hit = tri.find(q_hit)
    _, out = tri.find_and_gather(q_hit, values)
    assert torch.equal(out, values.index_select(0, r_hit)), "find_and_gather disagrees with index_select"
    fg_rate = record("find+gather d64", "triton fused", nb, timed(lambda: tri.find_and_gather(q_hit, values), args.repeats))
    fg_two = record("find+gather d64", "triton find + index_select", nb,
                    timed(lambda: values.index_select(0, tri.find(q_hit)), args.repeats))
    record("find+gather d64", "torch_index find + index_select", nb,
           timed(lambda: values.index_select(0, ref.find(q_hit)), args.repeats))
    record("find+gather d64", "searchsorted + index_select", nb,
           timed(lambda: values.index_select(0, searchsorted_find(q_hit)), args.repeats))
    gather_only = record("gather d64", "index_select (rows given)", nb,
                         timed(lambda: values.index_select(0, r_hit), args.repeats))

    # ---- insert at load 0.5: new keys (state restored each time), and present keys
    new_keys = spare[: args.insert_batch]
    ib = args.insert_batch
    ins_rate = record("insert new", "triton", ib, timed_from(tri, snap_t, lambda: tri.insert(new_keys), args.repeats), load=0.5)
    ref_ins = record("insert new", "torch_index", ib, timed_from(ref, snap_r, lambda: ref.insert(new_keys), args.repeats), load=0.5)
    restore(tri, snap_t), restore(ref, snap_r)
    q_ins = q_hit[:ib]
    record("insert present", "triton", ib, timed(lambda: tri.insert(q_ins), args.repeats), load=0.5)
    record("insert present", "torch_index", ib, timed(lambda: ref.insert(q_ins), args.repeats), load=0.5)
    assert len(tri) == n_half

    sweep_rows: List[Dict[str, Any]] = []
    if args.sweep:
        base = (TritonHashIndex.BLOCK, TritonHashIndex.NUM_WARPS)
        for block in (32, 64, 128, 256, 512, 1024):
            for warps in (1, 2, 4, 8):
                if not 32 * warps <= block <= 256 * warps:
                    continue
                TritonHashIndex.BLOCK, TritonHashIndex.NUM_WARPS = block, warps
                f = nb / timed(lambda: tri.find(q_hit), args.repeats)
                i = ib / timed_from(tri, snap_t, lambda: tri.insert(new_keys), args.repeats)
                sweep_rows.append({"BLOCK": block, "num_warps": warps, "find_keys_per_s": f, "insert_keys_per_s": i})
        TritonHashIndex.BLOCK, TritonHashIndex.NUM_WARPS = base
        restore(tri, snap_t)

    # ---- fill to full capacity (load 0.75), find there
    fill_rest = fill(tri, live[n_half:].clone(), args.insert_batch)
    record("fill 0.5->0.75", "triton", n_full - n_half, sum(fill_rest), batch_ms=[round(t * 1e3, 3) for t in fill_rest])
    q_full = live[torch.randint(0, n_full, (nb,), device=dev, generator=gen)]
    assert torch.equal(tri.find(live), torch.arange(n_full, device=dev))
    find_full = record("find", "triton", nb, timed(lambda: tri.find(q_full), args.repeats), load=round(len(tri) / n_slots, 3),
                       keys_drawn="uniform hits")

    print_table(rows, ["op", "impl", "keys", "ms", "keys_per_s", "load", "keys_drawn", "batch_ms"])
    if sweep_rows:
        print()
        print_table(sweep_rows)
    summary = {
        "find_keys_per_s": find_rate,
        "insert_keys_per_s": ins_rate,
        "find_gather_keys_per_s": fg_rate,
        "find_keys_per_s_zipf": zipf_rate,
        "find_keys_per_s_half_absent": half_rate,
        "find_keys_per_s_load075": find_full,
        "fill_keys_per_s": n_full / (sum(fill_t) + sum(fill_rest)),
        "torch_index_find_keys_per_s": ref_find,
        "torch_index_insert_keys_per_s": ref_ins,
        "searchsorted_find_keys_per_s": ss_find,
        "find_then_index_select_keys_per_s": fg_two,
        "index_select_keys_per_s": gather_only,
        "find_target": FIND_TARGET,
        "insert_target": INSERT_TARGET,
        "load_factor": 0.5,
        "capacity": args.capacity,
        "dim": DIM,
    }
    results = rows + [dict(r, op="sweep") for r in sweep_rows]
    return write_report("hash_table_gpu", results, summary, args.json,
                        targets={"find_keys_per_s": f">= {FIND_TARGET:g}", "insert_keys_per_s": f">= {INSERT_TARGET:g}"})


if __name__ == "__main__":
    main()
