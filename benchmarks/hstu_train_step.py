"""Benchmark: one training step of the ML-1M HSTU model, dynamic item table vs nn.Embedding.

One step is what the trainer does per batch: the sampled-softmax forward, backward, the dense
AdamW step and the item table's sparse optimizer step (a no-op for the static table, whose
rows AdamW trains). The model is ``configs/ml-1m-hstu.yaml`` (batch 128, len 200, dim 50,
2 blocks, 128 negatives); the two variants differ only in ``model.item_embedding`` and see
the same batches, in the same process, interleaved step by step so that clock drift and
other load hit both alike. A third variant, ``dynamic_listed_step``, is the dynamic table with
its sync-free optimizer step turned off (``table.sync_free_step = False``: the touched rows
are listed with a device-to-host sync, as before issue 9's change), the baseline of that
change measured in the same run (CUDA only; ``--no-listed-step`` leaves it out).

Data: the ML-1M sequence file (``ml-1m_seq.txt``) from ``--data-path``, ``ml-1m/`` in the
data folder (``$GAUSS_DATA``, else ``../shared/data``, else the user cache) when present,
else synthetic ML-1M-shaped sequences (3706 items, Zipf-like popularity, lengths 20..201 as
in ML-1M).

Timings: the median of per-step wall times, each step between two ``cuda.synchronize()``
calls (``step_ms_*``), and the mean over a run of back-to-back steps without per-step sync
(``pipelined_step_ms_*``, what an epoch sees). A ``torch.profiler`` table of the top CUDA and
CPU ops of a few steps of each variant is written beside the JSON. The evaluation pass
(full-corpus ranking of 6040 users) is timed once per variant.

    python benchmarks/hstu_train_step.py --json benchmarks/results/hstu_train_step_h200.json   # GPU
    python benchmarks/hstu_train_step.py --quick        # CPU: a tiny model, same code path

Summary: ``step_ms_dynamic``, ``step_ms_static``, ``dynamic_vs_static_step_ratio`` (issue 9
target: <= 1.1); on CUDA ``host_syncs_per_step_*`` and ``host_sync_sites_*`` (file:line of the
Python call that synced, with counts, from CUDA's sync debug mode); with the third variant
``step_ms_dynamic_listed_step`` and ``sync_free_vs_listed_step_ratio``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from gauss_plugins.benchmarking import parser, print_table, write_report

NUM_ITEMS = 3706        # ML-1M's item count (ids 1..3706 in the sequence file)
NUM_USERS = 6040
SEQ_FILE = "ml-1m_seq.txt"
VARIANTS = ("dynamic", "static")
LISTED = "dynamic_listed_step"  # the dynamic table with its sync-free step off (the baseline of that change)


# ---------------------------------------------------------------- data
def find_seq_file(data_path: Optional[str]) -> Optional[str]:
    """The ML-1M sequence file: ``--data-path`` (the file or its folder), else ``ml-1m/`` in
    the data folder every command uses (:func:`gauss_plugins.data.locate.locate_dataset`)."""
    from gauss_plugins.data.locate import locate_dataset

    candidates = []
    if data_path:
        candidates.append(data_path if data_path.endswith(".txt") else os.path.join(data_path, SEQ_FILE))
    found = locate_dataset("ml-1m")
    if found:
        candidates.append(os.path.join(found.path, SEQ_FILE))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    if data_path:
        raise FileNotFoundError(f"--data-path {data_path}: no {SEQ_FILE} there; pass the file or its folder")
    return None


def load_sequences(path: Optional[str], seed: int) -> List[np.ndarray]:
    """One int64 array of item ids per user, oldest first."""
    if path is not None:
        seqs = []
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2:
                    seqs.append(np.array(parts[1:], dtype=np.int64))
        return seqs
    rng = np.random.default_rng(seed)
    # ML-1M: every user has >= 20 ratings, the median about 96, a long tail past 200.
    lengths = np.clip(np.exp(rng.normal(4.6, 0.9, NUM_USERS)), 20, 2000).astype(np.int64)
    popularity = 1.0 / np.arange(1, NUM_ITEMS + 1) ** 0.9
    popularity /= popularity.sum()
    return [rng.choice(NUM_ITEMS, size=int(n), p=popularity).astype(np.int64) + 1 for n in lengths]


def make_batches(seqs: List[np.ndarray], batch_size: int, max_len: int, count: int, device: torch.device,
                 seed: int) -> List[Dict[str, torch.Tensor]]:
    """``count`` training batches as the trainer builds them (train split: the last item of each
    user is held out; each example is the user's last ``max_len + 1`` training items)."""
    from gauss_plugins.train.batching import collate_train

    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        users = rng.choice(len(seqs), size=batch_size, replace=False)
        examples = []
        for u in users:
            items = seqs[u][:-2][-(max_len + 1):]  # drop the test and validation items
            examples.append({"ids": items[:-1], "timestamps": np.zeros(len(items) - 1, np.int64),
                             "targets": items[1:]})
        batch = collate_train(examples)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


# ---------------------------------------------------------------- the model and one step
def build(kind: str, args, device: torch.device, num_items: int, seed: int):
    from gauss_plugins.models.builder import build_model
    from gauss_plugins.train.config import load_config, with_overrides

    item_kind = "dynamic" if kind == LISTED else kind
    config = with_overrides(load_config("ml-1m-hstu"), model__item_embedding=item_kind, data__max_len=args.max_len,
                            model__dim=args.dim, loss__num_negatives=args.negatives)
    torch.manual_seed(seed)
    model = build_model(config, num_items=num_items, device=device).to(device)
    if kind == LISTED:
        model.item_embeddings.table.sync_free_step = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    dense = torch.optim.AdamW(params, lr=config.optim.lr, betas=tuple(config.optim.betas),
                              weight_decay=config.optim.weight_decay)
    return model, dense


def make_step(model, dense) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """The trainer's step (RetrievalModule.training_step + optimizer_step), minus logging."""
    items = model.item_embeddings

    def step(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.sampled_softmax_loss(batch["ids"], batch["lengths"], batch["targets"], batch["timestamps"])
        loss = out["loss"]
        loss.backward()
        dense.step()
        items.sparse_step()
        dense.zero_grad(set_to_none=True)
        items.sparse_zero_grad()
        return loss.detach()

    return step


def phase_times(model, dense, batches, device: torch.device, steps: int) -> Dict[str, float]:
    """Median ms of each phase of a step (forward + backward, dense step, sparse step), with a
    sync between phases: where a variant's extra time goes."""
    items = model.item_embeddings
    sync = sync_fn(device)
    phases: Dict[str, List[float]] = {"fwd_bwd_ms": [], "dense_step_ms": [], "sparse_step_ms": []}
    for i in range(steps):
        batch = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        out = model.sampled_softmax_loss(batch["ids"], batch["lengths"], batch["targets"], batch["timestamps"])
        out["loss"].backward()
        sync()
        t1 = time.perf_counter()
        dense.step()
        dense.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        items.sparse_step()
        items.sparse_zero_grad()
        sync()
        t3 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[key].append(1e3 * dt)
    return {k: statistics.median(v) for k, v in phases.items()}


def host_syncs_per_step(step, batch, device: torch.device) -> Tuple[Optional[int], Dict[str, int]]:
    """Device-to-host synchronisations in one step, counted by CUDA's sync debug mode, and
    where they come from: ``file:line`` of the Python call that synced -> count."""
    if device.type != "cuda":
        return None, {}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    sites: Dict[str, int] = {}
    for w in syncs:
        site = f"{os.path.basename(w.filename)}:{w.lineno}"
        sites[site] = sites.get(site, 0) + 1
    return len(syncs), dict(sorted(sites.items()))


def sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@torch.no_grad()
def eval_pass_seconds(model, seqs: List[np.ndarray], max_len: int, batch_size: int, device: torch.device) -> float:
    """Wall time of one validation pass: corpus vectors, queries of every user, full-corpus
    scores and ranks minus the history window (what RetrievalModule does each epoch)."""
    from gauss_plugins.models.metrics import RetrievalMetrics
    from gauss_plugins.train.batching import collate_eval

    model.eval()
    sync = sync_fn(device)
    examples = []
    for items in seqs:
        history = items[:-2][-max_len:]
        examples.append({"ids": history, "timestamps": np.zeros(len(history), np.int64),
                         "target": np.int64(items[-2]), "exclude": history})
    batches = [collate_eval(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    metrics = RetrievalMetrics()
    sync()
    t0 = time.perf_counter()
    corpus = model.corpus_vectors()
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        queries = model.query(batch["ids"], batch["lengths"], batch["timestamps"])
        metrics.update(model.score_corpus(queries, corpus), batch["target"], batch["exclude"])
    metrics.compute()
    sync()
    model.train()
    return time.perf_counter() - t0


def profile_table(steps: Dict[str, Callable[[Dict[str, torch.Tensor]], torch.Tensor]], batches, device: torch.device,
                  repeats: int, rows: int = 25) -> str:
    """torch.profiler's top ops (by CUDA time on GPU, and by CPU time) over ``repeats`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = sync_fn(device)
    parts = []
    for name, step in steps.items():
        sync()
        with profile(activities=activities) as prof:
            for i in range(repeats):
                step(batches[i % len(batches)])
            sync()
        averages = prof.key_averages()
        parts.append(f"=== {name} item table: {repeats} steps ===")
        if device.type == "cuda":
            parts.append("--- top ops by total CUDA (device) time ---")
            parts.append(averages.table(sort_by="device_time_total", row_limit=rows))
        parts.append("--- top ops by self CPU time ---")
        parts.append(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(parts)


def profile_path(json_path: Optional[str]) -> Optional[str]:
    """Beside the JSON: ``hstu_train_step_h200.json`` -> ``hstu_train_step_profile_h200.txt``
    (None without a JSON path: a run that writes no record leaves no file behind)."""
    if not json_path:
        return None
    folder, name = os.path.split(json_path)
    root = os.path.splitext(name)[0]
    if root.startswith("hstu_train_step"):
        return os.path.join(folder, "hstu_train_step_profile" + root[len("hstu_train_step"):] + ".txt")
    return os.path.join(folder, root + "_profile.txt")


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--data-path", default=None, help="ML-1M sequence file or its folder (default: synthetic if absent)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first")
    p.add_argument("--profile", default=None, help="profile table path (default: beside the JSON)")
    p.add_argument("--no-eval", action="store_true", help="skip timing the evaluation pass")
    p.add_argument("--no-listed-step", action="store_true",
                   help=f"leave out the {LISTED} variant (the dynamic table's step with its host sync)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = device.type != "cuda"
    if tiny and not args.quick:
        print("hstu_train_step: no CUDA device; the real step is GPU-only. Run with --quick for the tiny CPU "
              "version (same code path).", file=sys.stderr)
        if args.json:
            write_report("hstu_train_step", [], {"skipped": "no CUDA device (use --quick for a tiny CPU run)"},
                         args.json)
        return 0
    # The paper's ML-1M shapes on GPU; a tiny version of the same step on CPU.
    args.batch, args.max_len, args.dim, args.negatives = (16, 50, 50, 32) if tiny else (128, 200, 50, 128)
    steps = args.steps or (6 if args.quick else 100)
    warmup = args.warmup or (2 if args.quick else 20)

    seq_file = find_seq_file(args.data_path)
    seqs = load_sequences(seq_file, seed=0)
    num_items = int(max(int(s.max()) for s in seqs))
    batches = make_batches(seqs, args.batch, args.max_len, count=8, device=device, seed=1)
    sync = sync_fn(device)

    # The listed-step baseline only differs on CUDA: on CPU the sync-free step is off anyway.
    variants = VARIANTS + (LISTED,) if device.type == "cuda" and not args.no_listed_step else VARIANTS
    models, step_fns = {}, {}
    for kind in variants:
        models[kind] = build(kind, args, device, num_items, seed=0)
        step_fns[kind] = make_step(*models[kind])
    # Warm-up: first lookups insert the items' rows, kernels compile, the allocator settles.
    for i in range(warmup):
        for kind in variants:
            step_fns[kind](batches[i % len(batches)])
    sync()

    times: Dict[str, List[float]] = {k: [] for k in variants}
    for i in range(steps):
        batch = batches[i % len(batches)]
        order = variants if i % 2 == 0 else variants[::-1]
        for kind in order:
            sync()
            t0 = time.perf_counter()
            step_fns[kind](batch)
            sync()
            times[kind].append(time.perf_counter() - t0)
    pipelined = {}
    for kind in variants:
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            step_fns[kind](batches[i % len(batches)])
        sync()
        pipelined[kind] = (time.perf_counter() - t0) / steps

    phases = {kind: phase_times(*models[kind], batches, device, steps=max(3, steps // 4)) for kind in variants}
    syncs, sync_sites = {}, {}
    for kind in variants:
        syncs[kind], sync_sites[kind] = host_syncs_per_step(step_fns[kind], batches[0], device)

    eval_s = {}
    if not args.no_eval:
        users = seqs if not tiny else seqs[:256]
        for kind in VARIANTS:
            eval_s[kind] = eval_pass_seconds(models[kind][0], users, args.max_len, 256, device)

    prof_path = args.profile or profile_path(args.json)
    if prof_path:
        text = profile_table({k: step_fns[k] for k in VARIANTS}, batches, device, repeats=3 if args.quick else 10)
        header = (f"hstu_train_step profile: device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
                  f"torch {torch.__version__}, batch {args.batch}, len {args.max_len}, dim {args.dim}, "
                  f"negatives {args.negatives}, data {'ML-1M ' + SEQ_FILE if seq_file else 'synthetic'}\n")
        write_text(prof_path, header + text + "\n")

    steps_per_epoch = -(-len(seqs) // args.batch)
    results = []
    for kind in variants:
        results.append({
            "item_embedding": kind,
            "step_ms_median": 1e3 * statistics.median(times[kind]),
            "step_ms_p10": 1e3 * float(np.percentile(times[kind], 10)),
            "step_ms_p90": 1e3 * float(np.percentile(times[kind], 90)),
            "pipelined_step_ms": 1e3 * pipelined[kind],
            **phases[kind],
            "host_syncs_per_step": syncs[kind],
            "eval_pass_s": eval_s.get(kind),
            "train_epoch_s_estimate": pipelined[kind] * steps_per_epoch,
        })
    print_table(results)
    print(f"profile table: {prof_path}" if prof_path else "profile table: not written (pass --json or --profile)")
    dyn, sta = results[0], results[1]
    summary: Dict[str, Any] = {
        "device": device.type,
        "data": "ml-1m" if seq_file else "synthetic",
        "table_backend": type(models["dynamic"][0].item_embeddings.table.index).__name__,
        "shape": f"batch {args.batch}, len {args.max_len}, dim {args.dim}, negatives {args.negatives}",
        "step_ms_dynamic": round(dyn["step_ms_median"], 3),
        "step_ms_static": round(sta["step_ms_median"], 3),
        "dynamic_vs_static_step_ratio": round(dyn["step_ms_median"] / sta["step_ms_median"], 3),
        "pipelined_step_ms_dynamic": round(dyn["pipelined_step_ms"], 3),
        "pipelined_step_ms_static": round(sta["pipelined_step_ms"], 3),
        "pipelined_ratio": round(dyn["pipelined_step_ms"] / sta["pipelined_step_ms"], 3),
    }
    summary["sparse_step_ms_dynamic"] = round(dyn["sparse_step_ms"], 3)
    if LISTED in variants:
        listed = results[2]
        summary["step_ms_dynamic_listed_step"] = round(listed["step_ms_median"], 3)
        summary["sparse_step_ms_dynamic_listed_step"] = round(listed["sparse_step_ms"], 3)
        summary["sync_free_vs_listed_step_ratio"] = round(dyn["step_ms_median"] / listed["step_ms_median"], 3)
        summary["pipelined_sync_free_vs_listed_ratio"] = round(dyn["pipelined_step_ms"] / listed["pipelined_step_ms"], 3)
    if device.type == "cuda":
        for kind in variants:
            summary[f"host_syncs_per_step_{kind}"] = syncs[kind]
        for kind in variants:
            summary[f"host_sync_sites_{kind}"] = sync_sites[kind]
    if eval_s:
        summary["eval_pass_s_dynamic"] = round(eval_s["dynamic"], 4)
        summary["eval_pass_s_static"] = round(eval_s["static"], 4)
    write_report("hstu_train_step", results, summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
