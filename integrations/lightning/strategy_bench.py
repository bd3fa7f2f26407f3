"""Throughput of :class:`~gauss_integrations.lightning.strategy.GaussStrategy` with W CPU
processes (gloo; NCCL with ``accelerator="gpu"``) against one: the ``scaling_2_workers`` figures
of ``benchmarks/lookahead_cache.py``.

::

    from gauss_integrations.lightning.strategy_bench import scaling
    scaling(rows=20_000, steps=40, budget_rows=2_000)
    # {"batches_per_s_1": ..., "batches_per_s_2": ..., "scaling_2_workers": ..., "misses_at_use": 0, ...}

    python -m gauss_integrations.lightning.strategy_bench --world 2 --out result.json   # one measurement

Each measurement is a fresh ``python -m`` process tree (Lightning's launcher starts the module
again for the other ranks), one torch thread per process, so W processes use W cores. The
trace: a Zipf(1.05) stream over ``rows`` item ids (popularity not ordered by id), sequences
of 64 positions, 32 sequences a global batch, each process ``32 / W`` of them (Lightning's
DistributedSampler; W = 1 gets the same sampler, so both runs see the same global batches):
strong scaling. ``per_worker_batch=True`` is weak scaling, the usual data-parallel throughput
figure: each process trains 32 sequences a step, so the global batch is ``32 W``; throughput
is sequences a second either way.
The model: one lookup per position in a dim-64 item table (row-wise Adagrad) behind the
lookahead cache, then (``model="hstu"`` only) the main job's HSTU encoder (2 blocks, one head),
a two-layer MLP, a sampled softmax of the next item against 256 ids drawn from the batch's own
items (drawn before the step, as the cache requires), AdamW on the dense weights. With the MLP
alone the cache's bookkeeping, which every replica repeats for the global batch, is about half
of a one-process step, which caps what two processes can gain; the HSTU step is mostly compute.
A step is timed from one batch's start to the next on every rank, after ``warmup`` steps; the
gloo all-reduces of every step make the ranks move together, so the slowest rank's median step
sets the throughput. Each rank also records its process CPU time per step (the cache's
worker thread included): with one process the worker has the second core to itself, with
two it shares the cores with the other rank.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

DIM = 64
SEQ_LEN = 64
GLOBAL_SEQS = 32
NEGATIVES = 256

__all__ = ["scaling", "measure"]


def _trace(rows: int, steps: int, seed: int = 0) -> torch.Tensor:
    """``[steps * GLOBAL_SEQS, SEQ_LEN + 1]`` item ids (1-based) of a Zipf(1.05) stream."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, rows + 1) ** 1.05
    p /= p.sum()
    perm = rng.permutation(rows)
    seqs = perm[rng.choice(rows, size=(steps * GLOBAL_SEQS, SEQ_LEN + 1), p=p)] + 1
    return torch.from_numpy(seqs).long()


MODELS = ("mlp", "hstu")


def _module(lr: float = 0.05, model: str = "mlp", cache: bool = True):
    import pytorch_lightning as pl

    from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig

    class BenchModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.table = None  # made in configure_model, on the rank's device
            # The no-cache control replaces the table by fixed features of the ids (no
            # parameters): the same dense model and loss under plain DDP, the ceiling of
            # data-parallel scaling for this model, batch and machine.
            self.register_buffer("freqs", torch.linspace(0.001, 1.0, DIM), persistent=False)
            self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
            self.encoder = None
            if model == "hstu":  # the main job's encoder (what benchmarks/lookahead_cache.py trains)
                from gauss_plugins.hstu import HSTUConfig
                from gauss_plugins.hstu.modules import PaddedHSTUEncoder

                self.encoder = PaddedHSTUEncoder(HSTUConfig(dim=DIM, num_blocks=2, num_heads=1, max_seq_len=SEQ_LEN,
                                                            dropout=0.0, num_time_buckets=0))
            self.step_starts: List[float] = []
            self.cpu_starts: List[float] = []

        def configure_model(self) -> None:
            if cache and self.table is None:  # a table is not moved with the module: make it where the rank trains
                self.table = DynamicEmbeddingTable(DynamicTableConfig(
                    name="items", dim=DIM, initializer="normal", init_std=0.05,
                    device=self.trainer.strategy.root_device, optimizer=OptimizerConfig(name="rowwise_adagrad", lr=lr)))

        def gauss_prepare_batch(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
            items = torch.unique(batch)
            pick = torch.randint(0, items.numel(), (NEGATIVES,)).to(items.device)
            return {"ids": batch[:, :-1], "targets": batch[:, 1:], "negatives": items[pick]}

        def gauss_cache_ids(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {"items": torch.cat([batch["ids"].reshape(-1), batch["targets"].reshape(-1), batch["negatives"]])}

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.step_starts.append(time.perf_counter())
            self.cpu_starts.append(time.process_time())  # the whole process: the cache's worker too

        def rows(self, ids: torch.Tensor) -> torch.Tensor:
            if self.table is not None:
                return self.table(ids)
            return torch.sin(ids.unsqueeze(-1).to(torch.float32) * self.freqs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if not isinstance(batch, dict):  # plain DDP (the control) does not call gauss_prepare_batch
                batch = self.gauss_prepare_batch(batch)
            x = self.rows(batch["ids"])
            if self.encoder is not None:
                x = self.encoder(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
            q = self.mlp(x).reshape(-1, DIM)
            pos = (q * self.rows(batch["targets"]).reshape(-1, DIM)).sum(-1, keepdim=True)
            neg = q @ self.rows(batch["negatives"]).T
            logits = torch.cat([pos, neg], dim=1) / 0.1
            return -torch.log_softmax(logits, dim=1)[:, 0].mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)  # the tables train through the sparse optimizer

    return BenchModule()


def measure(world: int, rows: int, steps: int, budget_rows: int, window: int, warmup: int, out: str,
            store_dir: Optional[str] = None, prefetch: bool = True, model: str = "mlp",
            accelerator: str = "cpu", per_worker_batch: bool = False, cache: bool = True,
            partitioned: bool = True) -> None:
    """One measurement in this process tree (rank 0 writes ``out``). Call it from a fresh
    process: Lightning starts ``sys.argv`` again for ranks 1..W-1."""
    import pytorch_lightning as pl

    from gauss_integrations.lightning.strategy import GaussStrategy

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if GLOBAL_SEQS % world:
        raise ValueError(f"world must divide the global batch of {GLOBAL_SEQS} sequences, got {world}")
    store_dir = store_dir or tempfile.mkdtemp(prefix=f"gauss-strategy-bench-w{world}-")
    module = _module(model=model, cache=cache)
    if cache:
        strategy = GaussStrategy(budget_rows=budget_rows, window=window, store_dir=store_dir, gather_on_end=False,
                                 prefetch=prefetch, partitioned=partitioned)
    else:
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(start_method="popen")
    trainer = pl.Trainer(max_epochs=1, accelerator=accelerator, devices=world, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    # Fixed global batch (strong scaling): each of W processes trains GLOBAL_SEQS / W sequences a
    # step. per_worker_batch (weak scaling, the usual data-parallel throughput figure): each
    # trains GLOBAL_SEQS, the global batch is W times larger and the stream W times longer.
    local = GLOBAL_SEQS if per_worker_batch else GLOBAL_SEQS // world
    data = torch.utils.data.DataLoader(_trace(rows, steps * (world if per_worker_batch else 1)), batch_size=local,
                                       shuffle=False)
    trainer.fit(module, data)
    # Every rank reports its own step times and CPU time: throughput is set by the slowest
    # rank (the collectives make them move together), and CPU seconds per step show whether
    # a rank computed or waited.
    starts, cpu = module.step_starts, module.cpu_starts
    if len(starts) <= warmup + 1:
        raise ValueError(f"{len(starts)} steps leave nothing to time after {warmup} warm-up steps")
    steps_ms = [1e3 * (b - a) for a, b in zip(starts[warmup:-1], starts[warmup + 1:])]
    stats = strategy.cache_stats() if cache else {}
    result = {"world": world, "rank": trainer.global_rank, "steps_timed": len(steps_ms),
              "seconds": starts[-1] - starts[warmup], "step_ms_median": float(np.median(steps_ms)),
              "step_ms_mean": float(np.mean(steps_ms)), "cpu_seconds": cpu[-1] - cpu[warmup],
              "cpu_ms_per_step": 1e3 * (cpu[-1] - cpu[warmup]) / len(steps_ms),
              "misses_at_use": stats.get("misses_at_use"), "stall_ms": stats.get("stall_ms"),
              "prefetched_rows": stats.get("prefetched_rows"), "budget_rows": budget_rows, "window": window,
              "prefetch": prefetch, "model": model, "accelerator": accelerator,
              "global_batch_seqs": local * world, "per_worker_batch": per_worker_batch, "cache": cache,
              "partitioned": partitioned}
    path = out if trainer.global_rank == 0 else f"{out}.rank{trainer.global_rank}"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def scaling(rows: int = 20_000, steps: int = 40, budget_rows: int = 2_000, window: int = 8, warmup: int = 5,
            worlds=(1, 2), timeout_s: float = 600, prefetch: bool = True, model: str = "mlp",
            accelerator: str = "cpu", per_worker_batch: bool = False, cache: bool = True,
            partitioned: bool = True) -> Dict[str, Any]:
    """Global batches per second with each world size in ``worlds`` (fresh processes each) and
    ``scaling_2_workers`` = throughput at 2 over 1. Throughput is one over the slowest rank's
    median step time (``_wall``: steps over the timed span, bursts of other tenants included);
    each run records every rank's step times, CPU ms per step (its cache worker included) and
    the load average. ``prefetch=False``: the cache reads rows on the training thread (no
    worker thread competing for the cores). ``partitioned=False``: every replica caches the global
    batch's rows (GaussStrategy(partitioned=False), the design before the partitioned caches)."""
    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gauss-strategy-bench-") as work:
        for world in worlds:
            path = os.path.join(work, f"w{world}.json")
            env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
            for key in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                        "LOCAL_WORLD_SIZE"):
                env.pop(key, None)  # a job of its own: Lightning picks a free port
            cmd = [sys.executable, "-m", "gauss_integrations.lightning.strategy_bench", "--world", str(world),
                   "--rows", str(rows), "--steps", str(steps), "--budget-rows", str(budget_rows), "--window",
                   str(window), "--warmup", str(warmup), "--out", path,
                   "--store-dir", os.path.join(work, f"store{world}"), "--model", model,
                   "--accelerator", accelerator] + \
                ([] if prefetch else ["--no-prefetch"]) + (["--per-worker-batch"] if per_worker_batch else []) + \
                ([] if cache else ["--no-cache"]) + ([] if partitioned else ["--replicated"])
            proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0 or not os.path.exists(path):
                raise RuntimeError(f"the {world}-process GaussStrategy run failed (exit {proc.returncode}):\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            ranks = []
            for rank in range(world):
                with open(path if rank == 0 else f"{path}.rank{rank}") as f:
                    ranks.append(json.load(f))
            # The slowest rank sets the pace; the median step is robust to other tenants' bursts.
            slowest = max(r["step_ms_median"] for r in ranks)
            seqs = ranks[0]["global_batch_seqs"]
            out[world] = {"world": world, "batches_per_s": 1e3 / slowest, "step_ms_median": slowest,
                          "global_batch_seqs": seqs, "sequences_per_s": seqs * 1e3 / slowest,
                          "batches_per_s_wall": min(r["steps_timed"] / r["seconds"] for r in ranks),
                          "cpu_ms_per_step_per_rank": [r["cpu_ms_per_step"] for r in ranks],
                          "misses_at_use": sum(int(r["misses_at_use"] or 0) for r in ranks),
                          "load_average_1m": os.getloadavg()[0], "ranks": ranks}
    result: Dict[str, Any] = {f"batches_per_s_{w}": out[w]["batches_per_s"] for w in worlds}
    result["misses_at_use"] = sum(out[w]["misses_at_use"] for w in worlds)
    result["runs"] = [out[w] for w in worlds]
    if 1 in out and 2 in out:
        # Throughput in sequences a second: with a fixed global batch that is batches a second.
        result["scaling_2_workers"] = out[2]["sequences_per_s"] / out[1]["sequences_per_s"]
        result["scaling_2_workers_wall"] = (out[2]["batches_per_s_wall"] * out[2]["global_batch_seqs"]
                                            / (out[1]["batches_per_s_wall"] * out[1]["global_batch_seqs"]))
    result["per_worker_batch"] = per_worker_batch
    result["cache"] = cache
    result["partitioned"] = partitioned
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--budget-rows", type=int, default=2_000)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--store-dir", default=None)
    p.add_argument("--no-prefetch", action="store_true", help="read rows on the training thread")
    p.add_argument("--model", choices=MODELS, default="mlp",
                   help="mlp: a two-layer MLP per position (light: the cache's work is a large share of a step); "
                        "hstu: the main job's HSTU encoder (2 blocks) before it")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: one GPU per process, NCCL (the fast tier in GPU memory)")
    p.add_argument("--per-worker-batch", action="store_true",
                   help=f"each process trains {GLOBAL_SEQS} sequences a step (weak scaling); default: the global "
                        f"batch of {GLOBAL_SEQS} is split across the processes (strong scaling)")
    p.add_argument("--no-cache", action="store_true",
                   help="the control: fixed features of the ids instead of the table, plain DDP, no cache")
    p.add_argument("--replicated", action="store_true",
                   help="every replica caches the global batch's rows (default: each caches the rows it owns)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    measure(args.world, args.rows, args.steps, args.budget_rows, args.window, args.warmup, args.out, args.store_dir,
            prefetch=not args.no_prefetch, model=args.model, accelerator=args.accelerator,
            per_worker_batch=args.per_worker_batch, cache=not args.no_cache, partitioned=not args.replicated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
