"""TorchX components: the main job (``gauss.train``), ``gauss.export`` and ``gauss.serve_bench``.

TorchX finds them through the ``torchx.components`` entry point group of this distribution
(``gauss = "gauss_integrations.torchx.components"``). TorchX loads its own built-ins only
when *no* package declares that group, so the distribution also declares
``_torchx = "torchx.components"``: ``dist.ddp``, ``utils.echo``... keep their names beside
ours (a leading ``_`` means "no prefix" to TorchX).

Every component runs a ``gauss`` CLI subcommand, so what runs under TorchX is exactly what
runs on a shell. ``train`` follows ``dist.ddp``'s conventions (``-j NNODESxNPROC``,
``--cpu/--gpu/--memMB`` or ``-h``, ``--rdzv_port``) because it *is* a ``dist.ddp`` app:
torchrun starts the workers and ``gauss train`` picks the process group up from torchrun's
environment.

Every function in this module is a component to TorchX (it lists all of them), so helpers
live in :mod:`gauss_integrations.torchx._args` and nothing else is imported by name here.
"""
from typing import Dict, Optional

import gauss_plugins._optional as _optional

_optional.require("torchx", "torchx", "the gauss TorchX components")

import torchx  # noqa: E402  (after the require above: a missing extra gets the pip line)
import torchx.components.dist as _dist  # noqa: E402
import torchx.specs as specs  # noqa: E402

from gauss_integrations.torchx import _args  # noqa: E402


def train(
    config: str,
    output_dir: str,
    dataset: Optional[str] = None,
    data_path: Optional[str] = None,
    max_epochs: Optional[int] = None,
    seed: Optional[int] = None,
    accelerator: str = "cpu",
    mode: Optional[str] = None,
    item_embedding: Optional[str] = None,
    image: str = torchx.IMAGE,
    j: str = "1x1",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """The main job: ``gauss train`` (HSTU / SASRec retrieval) as a ``dist.ddp`` app under torchrun.

    Writes metrics.json, report.json and model.safetensors into ``output_dir`` (the checkpoint
    ``gauss.export`` reads).

    Args:
        config: YAML experiment config file, or the name of a shipped one (demo-hstu, ml-1m-hstu, ...)
        output_dir: folder for metrics.json, report.json, model.safetensors and plots
        dataset: override the config's dataset (ml-100k, ml-1m, synthetic, ...)
        data_path: rating file / folder / sequence file
        max_epochs: override train.max_epochs
        seed: override train.seed
        accelerator: cpu or gpu
        mode: override train.mode (epoch or streaming)
        item_embedding: dynamic or static item table
        image: image to run in (ignored by the local_cwd scheduler)
        j: {nnodes}x{nproc_per_node} as in dist.ddp; more than one worker needs a data-parallel strategy in the config
        cpu: cpus per replica
        gpu: gpus per replica
        memMB: memory per replica in MB
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        env: environment variables for the workers
        max_retries: scheduler retries
        rdzv_port: rendezvous port on rank 0's host (multi-node only)
    """
    _args.check_workers(j, config, _dist.parse_nnodes)
    args = _args.train_args(config, output_dir, dataset=dataset, data_path=data_path, max_epochs=max_epochs,
                            seed=seed, accelerator=accelerator, mode=mode, item_embedding=item_embedding)
    return _dist.ddp(*args, m="gauss_plugins.cli", image=image, name="gauss-train", h=h, cpu=cpu, gpu=gpu,
                     memMB=memMB, j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port)


def export(
    checkpoint: str,
    out: str,
    config: Optional[str] = None,
    snapshot: Optional[str] = None,
    tolerance: float = 1e-5,
    image: str = torchx.IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """A trained checkpoint -> an AOTInductor ``.pt2`` ranker, with the parity check (``gauss export``).

    The export fails (non-zero exit, nothing written at ``out``) when the compiled package's
    scores differ from eager PyTorch by more than the tolerance.

    Args:
        checkpoint: a `gauss train` output folder or its model.safetensors
        out: the .pt2 package to write
        config: the experiment config (default: the one stored in the checkpoint)
        snapshot: also freeze the item-embedding rows into this .gsnp snapshot
        tolerance: largest |eager - compiled| score difference the parity check accepts
        image: image to run in (ignored by the local_cwd scheduler)
        cpu: cpus
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, memMB)
        env: environment variables
    """
    args = _args.export_args(checkpoint, out, config=config, snapshot=snapshot, tolerance=tolerance)
    return _args.python_app("gauss-export", "gauss_plugins.cli", args, image=image, cpu=cpu, memMB=memMB, h=h,
                            env=env)


def serve_bench(
    package: str,
    snapshot: Optional[str] = None,
    batch_sizes: str = "1,16,256",
    history: int = 0,
    candidates: int = 64,
    iters: int = 20,
    threads: int = 0,
    runner: bool = False,
    json: Optional[str] = None,
    image: str = torchx.IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Load a ``.pt2`` ranker and measure its latency (p50/p99) and throughput per batch size.

    Args:
        package: the .pt2 written by gauss export
        snapshot: score real rows from this .gsnp snapshot (default: random rows of the package's dim)
        batch_sizes: comma-separated request batch sizes
        history: history length per request (0: the package's max_seq_len)
        candidates: candidates per request
        iters: timed calls per batch size
        threads: intra-op threads (0: torch's default)
        runner: also time the C++ gauss-runner on the same requests (builds it if needed; needs a snapshot)
        json: write the results as JSON to this path
        image: image to run in (ignored by the local_cwd scheduler)
        cpu: cpus
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, memMB)
        env: environment variables
    """
    args = _args.serve_bench_args(package, snapshot=snapshot, batch_sizes=batch_sizes, history=history,
                                  candidates=candidates, iters=iters, threads=threads, runner=runner, json=json)
    return _args.python_app("gauss-serve-bench", "gauss_integrations.torchx.serve_bench", args, image=image, cpu=cpu,
                            memMB=memMB, h=h, env=env)
