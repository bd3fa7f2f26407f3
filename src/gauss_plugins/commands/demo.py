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
                    "CPU, on MovieLens 100K when the data folder has ml-100k/ ($GAUSS_DATA, else ../shared/data "
                    "beside the checkout, else ~/.cache/gauss_plugins/data, where `gauss data download "
                    "movielens-100k` puts it), else on the synthetic event stream. Works from any folder: the "
                    "configs ship with the package.",
    )
    p.add_argument("--output-dir", default=os.path.join("runs", "demo"), help="where to write (default runs/demo)")
    p.add_argument("--data-path", help="ml-100k folder (default: ml-100k/ in the data folder, see `gauss data list`)")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic stream even if MovieLens is found")
    p.add_argument("--max-epochs", type=int, help="override the demo's 30 epochs")
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--item-embedding", choices=("dynamic", "static"), default=None,
                   help="item embeddings (default: the dynamic table)")
    p.add_argument("--strategy", choices=("single", "gauss"), default="single",
                   help="gauss: train under GaussStrategy, the item table behind the lookahead embedding cache "
                        "with a budget of 70%% of the items (settings of the shipped ml-100k-hstu-gauss config)")
    return p


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.data.locate import locate_dataset
    from gauss_plugins.train.config import load_config, with_overrides
    from gauss_plugins.train.trainers import get_trainer

    started = time.time()
    get_trainer()  # no training loop here: fail now, in one line (cli.main), not after loading data
    data_path = None
    if args.synthetic:
        source, why = "the synthetic event stream", "--synthetic was given"
    elif args.data_path is not None:
        data_path = args.data_path
        if not os.path.isfile(os.path.join(data_path, "u.data")) and not os.path.isfile(data_path):
            print(f"gauss demo: --data-path {data_path} has no u.data (pass the ml-100k folder or its u.data)",
                  file=sys.stderr)
            return 2
        source, why = f"MovieLens 100K at {data_path}", "--data-path"
    else:
        found = locate_dataset("ml-100k")
        if found:
            data_path = found.path
            source, why = f"MovieLens 100K at {data_path}", f"the data folder, from {found.root.source}"
        else:
            source, why = "the synthetic event stream", f"MovieLens 100K was not found: {found.reason}"
    use_movielens = data_path is not None
    print(f"gauss demo: data: {source} ({why})", flush=True)
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
        if args.strategy == "gauss":
            # As the shipped ml-100k-hstu-gauss config: a batch of 64 and one set of negatives per
            # batch read few enough items that a budget below the item count holds a batch.
            items = 1682 if use_movielens else overrides["data__options"]["num_items"]
            overrides.update(train__strategy="gauss", train__batch_size=64, train__cache_budget_rows=int(0.7 * items),
                             train__cache_window=4, loss__shared_negatives=True)
        configs[model] = with_overrides(cfg, **overrides)
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
                            extra={"demo": {"source": source, "why": why, "epochs": epochs}}, summary_table=False)
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
    from gauss_plugins.export.demo import export_and_rank

    hstu_run = next(run for run in result["runs"] if run["model"] == "hstu")
    export_and_rank(os.path.join(out, f"hstu-seed{hstu_run['seed']}"), os.path.join(out, "serving"),
                    log=lambda m: print(m, flush=True))
    print(f"\nwrote {out}/report.json, {out}/training_curves.png, {out}/test_metrics.png, "
          f"{out}/serving/ (the .pt2 ranker and its snapshot) and per-model folders; "
          f"total {time.time() - started:.0f} s")
    return 0
