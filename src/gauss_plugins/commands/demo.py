"""``gauss demo`` (what ``make demo`` runs): HSTU vs SASRec on MovieLens 100K, or on the
synthetic stream when no MovieLens data is around; prints a metrics table and writes a plot
and a JSON report. Sized to finish in about 5 minutes on a 2-core CPU."""
from __future__ import annotations

import argparse
import os
import sys
import time



def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="HSTU vs SASRec on MovieLens 100K (or synthetic data): metrics table, plot, JSON report (~5 min on CPU)",
        description="Train HSTU and the SASRec baseline with the paper's settings, shortened to a few minutes on a "
                    "CPU, on MovieLens 100K when ../shared/data/ml-100k or $GAUSS_DATA has it, else on the synthetic "
                    "event stream.",
    )
    p.add_argument("--output-dir", default=os.path.join("runs", "demo"), help="where to write (default runs/demo)")
    p.add_argument("--data-path", help="ml-100k folder (default: $GAUSS_DATA, then ../shared/data)")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic stream even if MovieLens is found")
    p.add_argument("--max-epochs", type=int, help="override the demo's 30 epochs")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--item-embedding", choices=("dynamic", "static"), default=None,
                   help="item embeddings (default: the dynamic table)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.data.download import find_data_dir
    from gauss_plugins.train.config import load_config, with_overrides

    started = time.time()
    data_path = args.data_path
    if data_path is None and not args.synthetic:
        data_path = find_data_dir("ml-100k")
    use_movielens = data_path is not None and not args.synthetic
    if use_movielens and not os.path.isfile(os.path.join(data_path, "u.data")) and not os.path.isfile(data_path):
        print(f"gauss demo: {data_path} has no u.data", file=sys.stderr)
        return 2
    configs = {}
    for model in ("hstu", "sasrec"):
        cfg = load_config(f"demo-{model}")
        overrides = dict(train__max_epochs=args.max_epochs, train__accelerator=args.accelerator,
                         model__item_embedding=args.item_embedding)
        if use_movielens:
            overrides["data__path"] = data_path
        else:
            # The synthetic stream: 1000 users, 2000 items, ~60 events each (seconds per epoch).
            overrides.update(data__dataset="synthetic", data__path=None,
                             data__options={"num_users": 1000, "num_items": 2000, "mean_length": 60, "seed": 0})
        configs[model] = with_overrides(cfg, **overrides)
    source = f"MovieLens 100K at {data_path}" if use_movielens else "the synthetic event stream (no MovieLens found)"
    epochs = configs["hstu"].train.max_epochs
    print(f"gauss demo: HSTU vs SASRec on {source}.\n"
          f"  Paper settings (dim 50, 2 blocks x 1 head, 128 sampled negatives, temperature 0.05, AdamW 1e-3), "
          f"shortened to run in about 2 minutes (5 at most) on a 2-core CPU: max length {configs['hstu'].data.max_len}, "
          f"{epochs} epochs, one seed (shipped configs demo-hstu, demo-sasrec).\n"
          f"  Too short and too small to rank the models: see benchmarks/ml100k_seeds.py for the seed-averaged "
          f"comparison.", flush=True)
    from gauss_plugins.train.compare import run_comparison
    from gauss_plugins.train.report import METRIC_KEYS, format_table, plot_comparison, plot_history
    import json

    out = args.output_dir
    result = run_comparison(configs, [configs["hstu"].train.seed], out, result_path=os.path.join(out, "report.json"),
                            progress=True, log=lambda m: print(m, flush=True),
                            extra={"demo": {"source": source, "epochs": epochs}}, summary_table=False)
    histories = {}
    metrics = {}
    for run in result["runs"]:
        label = run["model"]
        with open(os.path.join(out, f"{label}-seed{run['seed']}", "report.json")) as f:
            histories[label] = json.load(f)["history"]
        metrics[label] = run["metrics"]
    plot_history(histories, os.path.join(out, "training_curves.png"), title="gauss demo: HSTU vs SASRec")
    plot_comparison(metrics, os.path.join(out, "test_metrics.png"), title=f"test metrics ({source.split(' at ')[0]})")
    rows = [{"model": label, **{k: m[f"test/{k}"] for k in METRIC_KEYS}} for label, m in metrics.items()]
    print("\nTest metrics (leave-one-out, full-corpus ranking minus history; selected on validation NDCG@10):")
    print(format_table(rows, ["model", *METRIC_KEYS]))
    print(f"\nwrote {out}/report.json, {out}/training_curves.png, {out}/test_metrics.png "
          f"and per-model folders; total {time.time() - started:.0f} s")
    return 0
