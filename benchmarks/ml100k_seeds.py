"""HSTU vs SASRec on MovieLens 100K: mean ± std over seeds, selected on validation.

    python benchmarks/ml100k_seeds.py                       # 3 seeds, the committed settings
    python benchmarks/ml100k_seeds.py --seeds 0 1 2 3 4 --max-epochs 101
    python benchmarks/ml100k_seeds.py --quick --json run.json   # a few minutes: see below

Both models use the paper's ML-1M configuration (src/gauss_plugins/configs/ml-100k-{hstu,sasrec}.yaml: length
200, dim 50, 2 blocks x 1 head, dropout 0.2, 128 sampled negatives, temperature 0.05, AdamW
1e-3 (0.9, 0.98), batch 128) and the same harness (dynamic-table item embeddings, the paper's
full-corpus evaluation). For each run the epoch with the best validation NDCG@10 is kept and
its test metrics reported; the test set takes no part in any choice. Writes
benchmarks/results/ml100k_hstu_vs_sasrec.json and .md. Resumable (--resume): finished runs
are reused. ML-100K (943 users) cannot separate the two models: the standard error of HR@10
is about .013, so a gap under ~.03 is noise.

``--quick`` (what ``make bench`` runs) checks the whole pipeline in a few minutes on the
2-core CPU: one seed, 1 epoch, sequences cut to the last 50 items, in a temporary folder; it
writes only ``--json`` (the committed table is never touched) and says so in its summary. Its
numbers show that both models train under the same harness, not how they compare. Without the
ML-100K data it records ``{"skipped": ...}`` and exits 0.

``--json PATH`` writes the benchmark convention's record: per-run test/val metrics and fit
time as results, each model's mean test HR@10 / NDCG@10 and the HSTU - SASRec gap (SASRec is
the baseline in the same run) as summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", help="ml-100k folder (default: ml-100k/ in the data folder, see `gauss data list`)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--patience", type=int, default=8, help="validations without improvement before stopping (0: never)")
    p.add_argument("--models", nargs="+", default=["hstu", "sasrec"], choices=["hstu", "sasrec"])
    p.add_argument("--item-embedding", choices=["dynamic", "static"], default="dynamic")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--max-len", type=int, default=None, help="override the configs' sequence length (200)")
    p.add_argument("--workdir", default=None, help="default: runs/ml100k_seeds (--quick: a temporary folder)")
    p.add_argument("--out", default=None, help="aggregate JSON (and .md beside it); default: "
                                               "benchmarks/results/ml100k_hstu_vs_sasrec.json, none with --quick")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. how the runs were scheduled)")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, length 50, temporary folder: a few minutes")
    p.add_argument("--json", metavar="PATH", help="write the benchmark convention's record here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.max_epochs, args.eval_every, args.patience = [0], 1, 1, 0
        args.max_len = args.max_len or 50
        args.threads = args.threads or 2
    if args.out is None and not args.quick:
        args.out = os.path.join(HERE, "results", "ml100k_hstu_vs_sasrec.json")
    with tempfile.TemporaryDirectory(prefix="gauss-ml100k-quick-") as tmp:
        if args.workdir is None:
            args.workdir = tmp if args.quick else os.path.join(REPO, "runs", "ml100k_seeds")
        return _run(args, argv)


def _run(args: argparse.Namespace, argv) -> int:
    from gauss_plugins.benchmarking import machine_info, write_report, write_skip

    from gauss_plugins.train.compare import markdown_table, run_comparison
    from gauss_plugins.train.config import load_config, with_overrides

    configs = {}
    for model in args.models:
        cfg = load_config(f"ml-100k-{model}")
        configs[model] = with_overrides(
            cfg, data__path=args.data_path, train__max_epochs=args.max_epochs, train__eval_every=args.eval_every,
            train__early_stopping_patience=args.patience or None, model__item_embedding=args.item_embedding,
            train__num_threads=args.threads, train__accelerator=args.accelerator, data__max_len=args.max_len)
    protocol = {
        "protocol": ("leave-one-out (last item test, second-to-last validation); full-corpus ranking minus the "
                     "items of the encoder's input window (the paper code's invalid_ids); model selection on "
                     "val/ndcg@10, evaluated every eval_every epochs; test evaluated once on the selected model"),
        "max_epochs": args.max_epochs, "eval_every": args.eval_every, "early_stopping_patience": args.patience,
        "item_embedding": args.item_embedding,
        "noise_note": "943 test users: standard error of HR@10 ~ .013; a gap under ~.03 is noise (PLATFORM.md)",
        "command": "python benchmarks/ml100k_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": args.note,
    }
    protocol["machine"] = machine_info()
    try:
        result = run_comparison(configs, args.seeds, args.workdir, result_path=args.out, resume=args.resume,
                                extra=protocol)
    except FileNotFoundError as exc:
        if args.quick:  # `make bench` on a machine without the data: say why, keep going
            write_skip("ml100k_seeds", f"ML-100K data not found ({exc})", args.json)
            return 0
        print(f"{os.path.basename(__file__)}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{os.path.basename(__file__)}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        _write_convention_record(result, args, write_report)
    if not args.out:
        return 0
    md = [
        "# HSTU vs SASRec on MovieLens 100K",
        "",
        f"Paper ML-1M config, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), up to {args.max_epochs} epochs, "
        f"validated every {args.eval_every}, early stopping patience {args.patience}; item embeddings: "
        f"{args.item_embedding}. Mean ± sample std over seeds of the test metrics of the model selected on "
        "validation NDCG@10. Produced by `python benchmarks/ml100k_seeds.py`; raw runs in the JSON beside this file.",
        "",
        markdown_table(result["summary"], "test"),
        "",
        "Validation metrics of the selected models:",
        "",
        markdown_table(result["summary"], "val"),
        "",
        "ML-100K has 943 users: the standard error of HR@10 is about .013, so a gap under ~.03 between the "
        "models is noise. The models separate on larger data (see benchmarks/ml1m_paper_table.py).",
        "",
    ]
    if args.note:
        md += [f"Note: {args.note}", ""]
    md_path = os.path.splitext(args.out)[0] + ".md"
    tmp = md_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, md_path)
    print(f"wrote {args.out} and {md_path}")
    return 0


def _write_convention_record(result: dict, args: argparse.Namespace, write_report) -> None:
    """The benchmark convention's JSON: SASRec is the baseline measured in the same run."""
    results = [{"model": r["model"], "seed": r["seed"], "fit_s": r.get("fit_s"), "epochs": r.get("epochs_trained"),
                **{k: v for k, v in r["metrics"].items() if k.endswith(("hr@10", "ndcg@10"))}}
               for r in result["runs"]]
    summary = {"mode": (f"quick: {len(args.seeds)} seed, {args.max_epochs} epoch(s), length {args.max_len} "
                        "(pipeline check; not comparable to the committed table)") if args.quick else "full",
               "seeds": len(args.seeds), "max_epochs": args.max_epochs}
    for model, stats in result["summary"].items():
        for metric in ("test/hr@10", "test/ndcg@10"):
            summary[f"{model}_{metric.replace('/', '_')}"] = stats[metric]["mean"]
    if {"hstu", "sasrec"} <= set(result["summary"]):
        summary["hr@10_gap_hstu_minus_sasrec"] = summary["hstu_test_hr@10"] - summary["sasrec_test_hr@10"]
    summary["fit_s_total"] = sum(r.get("fit_s") or 0.0 for r in result["runs"])
    write_report("ml100k_seeds", results, summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
