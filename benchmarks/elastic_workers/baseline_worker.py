"""The training loop the two restart-from-checkpoint baselines of ``benchmarks/elastic_recovery.py``
run: ``torchrun --max-restarts`` (``python baseline_worker.py --config JSON`` under torchrun) and
Ray Train's ``TorchTrainer`` with ``FailureConfig`` (:func:`ray_train_loop`).

Both run the same loop: a data-parallel MLP (DDP over gloo) trained with Adam on a
deterministic stream (the batch of step ``s`` is a function of ``s`` only, so a restarted
group sees exactly the samples it would have seen), a checkpoint of model + optimizer every
``ckpt_every`` steps written by rank 0, and, on resume, the latest checkpoint loaded.

The kill is done by rank 0 itself, right after it completed step ``c + kill_offset`` for a
checkpoint step ``c`` (once per such step, at most ``kills`` times): it appends
``{"step", "t_kill", "ckpt_step", "victim_pid"}`` to ``kills.jsonl`` and SIGKILLs the last
rank's process. Doing it from inside the loop places every kill exactly ``kill_offset`` steps
after a checkpoint, however fast the steps are (a poller outside would overshoot on the small
model). Rank 0 also appends ``{"step", "t", "pid", "resumed_from"}`` to ``steps.jsonl`` after
every completed step; the driver reads both files to time the restart.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn


def build_model(cfg: Dict[str, Any]) -> nn.Module:
    """``layers`` Linear(hidden, hidden)+ReLU blocks between an input and a scalar head."""
    torch.manual_seed(0)  # the same initial weights in every process and every system
    hidden, layers = cfg["hidden"], cfg["layers"]
    mods = [nn.Linear(cfg["in_dim"], hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, 1))
    return nn.Sequential(*mods)


def batch_for(step: int, rank: int, world: int, cfg: Dict[str, Any]):
    """Rank ``rank``'s share of the global batch of ``step`` (a function of the step only)."""
    per_rank = cfg["batch"] // world
    g = torch.Generator().manual_seed(1_000_003 * (step + 1))
    x = torch.randn(cfg["batch"], cfg["in_dim"], generator=g)
    y = x[:, :8].sum(dim=1, keepdim=True)  # a learnable target, so the loss falls
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[sl], y[sl]


def _append(path: str, record: Dict[str, Any]) -> None:
    # One short write per line on an O_APPEND file: the driver never sees half a record.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path: str):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train(cfg: Dict[str, Any], rank: int, world: int,
          save: Callable[[Dict[str, Any], int], None], load: Callable[[], Optional[Dict[str, Any]]],
          after_step: Callable[[int], None] = lambda step: None) -> None:
    """The loop both baselines run; ``save``/``load`` are the system's checkpoint path."""
    torch.set_num_threads(1)  # 2 workers on a 2-core machine
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=cfg.get("adam") == "fused" or None)
    start = 0
    state = load()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = int(state["step"])
        del state
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    run_dir = cfg["run_dir"]
    steps_log, kills_log = os.path.join(run_dir, "steps.jsonl"), os.path.join(run_dir, "kills.jsonl")
    killed_steps = {k["step"] for k in _read_jsonl(kills_log)} if rank == 0 else set()
    for step in range(start + 1, cfg["steps"] + 1):
        x, y = batch_for(step, rank, world, cfg)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if step % cfg["ckpt_every"] == 0:
            save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, step)
        else:
            after_step(step)
        if rank != 0:
            continue
        _append(steps_log, {"step": step, "t": time.time(), "pid": os.getpid(), "resumed_from": start,
                            "loss": float(loss.detach())})
        if (step > cfg["ckpt_every"] and step % cfg["ckpt_every"] == cfg["kill_offset"] and step not in killed_steps
                and len(killed_steps) < cfg["kills"]):
            killed_steps.add(step)
            ckpt_step = step - cfg["kill_offset"]
            _append(kills_log, {"step": step, "t_kill": time.time(), "ckpt_step": ckpt_step, "victim_pid": pids[-1]})
            os.kill(pids[-1], signal.SIGKILL)


# ----------------------------------------------------------------------------- torchrun
def _torchrun_main(cfg: Dict[str, Any]) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    path = os.path.join(cfg["run_dir"], "ckpt.pt")

    def save(state: Dict[str, Any], step: int) -> None:
        if rank == 0:
            tmp = path + ".tmp"
            torch.save(state, tmp)
            os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint whole
        dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet

    def load():
        # weights_only: the file is our own, but nothing here needs pickled code objects.
        return torch.load(path, weights_only=True) if os.path.exists(path) else None

    try:
        train(cfg, rank, world, save, load)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- Ray Train
def ray_train_loop(cfg: Dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``: checkpoints go through ``ray.train.report``."""
    import tempfile

    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def save(state: Dict[str, Any], step: int) -> None:
        with tempfile.TemporaryDirectory(dir=cfg["run_dir"]) as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(state, os.path.join(tmp, "ckpt.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # Every rank reports (Ray Train requires it); only rank 0 attaches the files.
            ray.train.report({"step": step}, checkpoint=checkpoint)

    def load():
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)

    train(cfg, rank, world, save, load)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the run's settings as a JSON object")
    cfg = json.loads(p.parse_args(argv).config)
    _torchrun_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
