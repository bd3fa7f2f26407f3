"""``gauss train``: train and evaluate a retrieval model from a YAML config.

    gauss train --config ml-1m-hstu --output-dir runs/ml1m-hstu [--dataset ml-1m] [--data-path PATH]
        [--max-epochs N] [--accelerator cpu|gpu] [--seed S]

``--config`` is a YAML file or the name of a shipped config (``gauss_plugins/configs``). The
training loop comes from the registry (a ``trainer`` component; the ``lightning`` extra
provides one), so the core imports no training framework.

Writes ``metrics.json`` (``val/`` and ``test/`` HR/NDCG@10/50/200), ``report.json``,
``model.safetensors`` and a plot into the output folder.
"""
from __future__ import annotations

import argparse
import sys

DATASETS = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "seqfile", "synthetic")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train an HSTU / SASRec retrieval model and write metrics.json, a checkpoint and plots",
        description="Train a sequential retrieval model (HSTU or SASRec) as configured in a YAML file; "
                    "command-line options override the file.",
    )
    p.add_argument("--config", required=True, help="YAML experiment config file, or the name of a shipped one "
                                                   "(demo-hstu, ml-100k-hstu, ml-1m-hstu, ml-1m-sasrec, ...)")
    p.add_argument("--dataset", help=f"dataset: {', '.join(DATASETS)} or any registered dataset plugin "
                                     "(default: the config's data.dataset)")
    p.add_argument("--data-path", help="rating file / folder / sequence file (default: the config's, else the "
                                       "dataset's folder in the data folder: see `gauss data list`)")
    p.add_argument("--output-dir", required=True, help="folder for metrics.json, report.json, model.safetensors, plots")
    p.add_argument("--max-epochs", type=int, help="override train.max_epochs")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), help="override train.accelerator")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--mode", choices=("epoch", "streaming"), help="override train.mode")
    p.add_argument("--item-embedding", choices=("dynamic", "static"),
                   help="override model.item_embedding (dynamic table by default; static = nn.Embedding)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="override train.refit: after selecting the epoch count on validation, retrain on "
                        "train+validation items for that many epochs and test that model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.train.config import load_config, with_overrides
    from gauss_plugins.train.trainers import get_trainer

    run_experiment = get_trainer()  # raises TrainerUnavailableError (one line, see cli.main) before any work
    try:
        config = load_config(args.config)
        if args.dataset and args.dataset != config.data.dataset and config.data.options:
            # data.options belong to the config's own dataset (e.g. the synthetic stream's sizes)
            print(f"gauss train: --dataset {args.dataset} replaces {config.data.dataset}; ignoring its data.options",
                  file=sys.stderr)
            config = with_overrides(config, data__options={})
        config = with_overrides(config, data__dataset=args.dataset, data__path=args.data_path,
                                train__max_epochs=args.max_epochs, train__accelerator=args.accelerator,
                                train__seed=args.seed, train__mode=args.mode, train__refit=args.refit,
                                model__item_embedding=args.item_embedding)
    except (OSError, ValueError, KeyError) as exc:
        print(f"gauss train: {exc}", file=sys.stderr)
        return 2
    from gauss_plugins.train.report import format_table

    try:
        metrics = run_experiment(config, args.output_dir, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"gauss train: {exc}", file=sys.stderr)
        return 2
    ks = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")
    rows = [{"split": s, **{k: metrics[f"{s}/{k}"] for k in ks}} for s in ("val", "test")]
    print(format_table(rows, ["split", *ks]))
    return 0
