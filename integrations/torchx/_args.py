"""Command lines of the gauss TorchX components (kept out of :mod:`.components`, where TorchX
would list every function as a component)."""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torchx.specs as specs

_MODES = ("epoch", "streaming")
_ITEM_EMBEDDINGS = ("dynamic", "static")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


def _optional_int(name: str, value) -> Optional[int]:
    # TorchX hands Optional[int] component arguments over as strings.
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be an integer, got {value!r}") from None


def train_args(config: str, output_dir: str, *, dataset: Optional[str], data_path: Optional[str],
               max_epochs: Optional[int], seed: Optional[int], accelerator: str, mode: Optional[str],
               item_embedding: Optional[str]) -> List[str]:
    """``gauss train`` arguments; bad values are refused here, before anything is scheduled."""
    if accelerator not in ("cpu", "gpu"):
        raise ValueError(f"--accelerator must be cpu or gpu, got {accelerator!r}")
    if mode is not None and mode not in _MODES:
        raise ValueError(f"--mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if item_embedding is not None and item_embedding not in _ITEM_EMBEDDINGS:
        raise ValueError(f"--item_embedding must be one of {', '.join(_ITEM_EMBEDDINGS)}, got {item_embedding!r}")
    max_epochs, seed = _optional_int("max_epochs", max_epochs), _optional_int("seed", seed)
    if max_epochs is not None:
        _positive("max_epochs", max_epochs)
    args = ["train", "--config", config, "--output-dir", output_dir, "--accelerator", accelerator,
            "--no-progress"]  # a scheduler's log is no terminal: progress bars would only flood it
    for flag, value in (("--dataset", dataset), ("--data-path", data_path), ("--max-epochs", max_epochs),
                        ("--seed", seed), ("--mode", mode), ("--item-embedding", item_embedding)):
        if value is not None:
            args += [flag, str(value)]
    return args


def check_workers(j: str, config: str, nnodes_and_procs) -> None:
    """Refuse several workers for a config that trains in one process.

    ``gauss train`` joins torchrun's process group only through a data-parallel strategy
    (``train.strategy`` in the config); without one every worker would train the whole model
    alone and all of them would write the same output folder.
    """
    _, max_nnodes, nproc, _ = nnodes_and_procs(j)
    workers = int(max_nnodes) * int(nproc)
    if workers <= 1:
        return
    from gauss_plugins.train.config import load_config

    try:
        train = load_config(config).train
    except FileNotFoundError:
        # A remote job may name a config that exists only in its image: nothing to check here.
        print(f"gauss.train: config {config!r} is not readable here, so whether it trains data-parallel over "
              f"{workers} workers (train.strategy: gauss) is not checked before submitting", file=sys.stderr)
        return
    strategy = getattr(train, "strategy", None)
    if strategy in (None, "", "single"):
        raise ValueError(f"-j {j} starts {workers} workers, but config {config!r} trains in one process (its train "
                         "section sets no data-parallel `strategy`): every worker would train the whole model and "
                         "write the same output folder. Use -j 1x1, or a config with `strategy: gauss`")


def export_args(checkpoint: str, out: str, *, config: Optional[str], snapshot: Optional[str],
                tolerance: float) -> List[str]:
    """``gauss export`` arguments (the export itself runs the parity check and fails on drift)."""
    if not out.endswith(".pt2"):
        raise ValueError(f"--out must name a .pt2 file, got {out!r}")
    if snapshot is not None and not snapshot.endswith(".gsnp"):
        raise ValueError(f"--snapshot must name a .gsnp file, got {snapshot!r}")
    if not tolerance >= 0:
        raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
    args = ["export", "--checkpoint", checkpoint, "--out", out, "--tolerance", repr(float(tolerance))]
    if config is not None:
        args += ["--config", config]
    if snapshot is not None:
        args += ["--snapshot", snapshot]
    return args


def serve_bench_args(package: str, *, snapshot: Optional[str], batch_sizes: str, history: int, candidates: int,
                     iters: int, threads: int, runner: bool, json: Optional[str]) -> List[str]:
    """Arguments of :mod:`gauss_integrations.torchx.serve_bench`."""
    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise ValueError(f"--batch_sizes must be comma-separated integers, got {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch_sizes must all be >= 1, got {batch_sizes!r}")
    _positive("candidates", candidates)
    _positive("iters", iters)
    if history < 0 or threads < 0:
        raise ValueError("--history and --threads must be >= 0 (0: the package's max_seq_len / torch's default)")
    if runner and snapshot is None:
        raise ValueError("--runner True needs --snapshot: the C++ runner gathers rows from a snapshot file")
    args = ["--package", package, "--batch-sizes", ",".join(map(str, sizes)), "--history", str(history),
            "--candidates", str(candidates), "--iters", str(iters), "--threads", str(threads)]
    if snapshot is not None:
        args += ["--snapshot", snapshot]
    if runner:
        args.append("--runner")
    if json is not None:
        args += ["--json", json]
    return args


def python_app(name: str, module: str, args: List[str], *, image: str, cpu: int, memMB: int, h: Optional[str],
               env: Optional[Dict[str, str]]) -> specs.AppDef:
    """One process running ``python -m module args`` (what ``utils.python`` builds, with resources)."""
    return specs.AppDef(name=name, roles=[specs.Role(
        name=name, image=image, entrypoint="python", args=["-m", module, *args], env=dict(env or {}),
        resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB, h=h))])
