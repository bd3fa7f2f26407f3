"""Reproduce the HSTU paper's Table 4 (MovieLens 1M) in one command.

    python benchmarks/ml1m_paper_table.py --parallel            # GPU: the three models at once
    python benchmarks/ml1m_paper_table.py --quick               # a tiny run (1 epoch, len 50)
    # data: --data-path, else $GAUSS_DATA/ml-1m, else ../shared/data/ml-1m, else the user
    # cache (`gauss data download movielens-1m`)

Trains SASRec, HSTU and HSTU-large with src/gauss_plugins/configs/ml-1m-*.yaml (the paper's settings, 101
epochs), selects each on validation NDCG@10, and prints test HR@10 / NDCG@10 beside the
paper's numbers (SASRec .2853/.1603, HSTU .3097/.1720, HSTU-large .3294/.1893), with each
model's mean training-epoch time (validation excluded) and validation-pass time. Writes
benchmarks/results/ml1m_paper_table.json (and .md); ``summary[model]["epoch_seconds"]["mean"]``
is the epoch time. ``--parallel`` runs each model and seed in its own process (on one GPU, or
spread over ``--gpus 0,1``) and merges their results. Use --seeds for several seeds.
``--refit`` retrains each selected model on train + validation items for its selected epoch
count (the paper's code trains on all but the test item) and reports that model's test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

from gauss_plugins.benchmarking import gpu_list

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PAPER = {"sasrec": (0.2853, 0.1603), "hstu": (0.3097, 0.1720), "hstu-large": (0.3294, 0.1893)}
# --quick: one epoch, sequences cut to 50 items, the first 300 users (about a minute on CPU)
QUICK = {"max_epochs": 1, "max_len": 50, "users": 300}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", help="ml-1m folder or sequence file (default: $GAUSS_DATA/ml-1m, "
                                       "../shared/data/ml-1m, the user cache)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default=None, help="default: gpu when CUDA is available")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--max-epochs", type=int, default=None, help="override the configs' 101 epochs")
    p.add_argument("--models", nargs="+", default=list(PAPER), choices=list(PAPER))
    p.add_argument("--item-embedding", choices=["dynamic", "static"], default=None,
                   help="override the configs' item embedding kind (default: the configs', dynamic)")
    p.add_argument("--workdir", default=None, help="run folders (default: runs/ml1m_paper_table[_quick])")
    p.add_argument("--out", "--json", dest="out", default=None,
                   help="result JSON (default: benchmarks/results/ml1m_paper_table[_quick].json); the .md goes beside it")
    p.add_argument("--resume", action="store_true", help="reuse finished runs of the same config")
    p.add_argument("--quick", action="store_true", help="tiny run: 1 epoch, len 50, the first 300 users")
    p.add_argument("--parallel", action="store_true",
                   help="one process per model and seed, all at once (one GPU is fine)")
    p.add_argument("--gpus", type=gpu_list, default=[],
                   help="with --parallel: comma-separated CUDA device numbers the processes are spread over, "
                        "round robin (default: whatever each process sees)")
    p.add_argument("--refit", action="store_true",
                   help="train.refit: after selecting the epoch count on validation, retrain on train+validation "
                        "items for that many epochs and test that model (the paper's code trains on all but the "
                        "test item); the selected model's test is kept as test_selection_run/*")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.workdir = args.workdir or os.path.join(REPO, "runs", f"ml1m_paper_table{suffix}")
    args.out = args.out or os.path.join(HERE, "results", f"ml1m_paper_table{suffix}.json")
    if args.accelerator is None:
        import torch

        args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return args


def _configs(args):
    from gauss_plugins.train.config import load_config, with_overrides

    epochs = args.max_epochs if args.max_epochs is not None else (QUICK["max_epochs"] if args.quick else None)
    return {m: with_overrides(load_config(f"ml-1m-{m}"), data__path=args.data_path,
                              data__max_len=QUICK["max_len"] if args.quick else None,
                              train__accelerator=args.accelerator, train__max_epochs=epochs,
                              train__refit=True if args.refit else None,
                              model__item_embedding=args.item_embedding)
            for m in args.models}


def _first_users(seqs, n: int):
    """The first ``n`` users of ``seqs`` (all their events), for --quick."""
    from gauss_plugins.data.sequences import UserSequences

    n = min(n, seqs.num_users)
    end = int(seqs.offsets[n])
    return UserSequences(seqs.user_ids[:n], seqs.offsets[:n + 1], seqs.items[:end],
                         None if seqs.timestamps is None else seqs.timestamps[:end],
                         name=seqs.name, info={**seqs.info, "subset": f"first {n} users (--quick)"})


def _run_here(args) -> Dict[str, object]:
    from gauss_plugins.train.compare import run_comparison

    configs = _configs(args)
    sequences = None
    if args.quick:
        from gauss_integrations.lightning import load_sequences

        sequences = _first_users(load_sequences(next(iter(configs.values()))), QUICK["users"])
    return run_comparison(configs, args.seeds, args.workdir, result_path=args.out, resume=args.resume,
                          sequences=sequences,
                          extra={"paper_table4_ml1m": {m: {"hr@10": v[0], "ndcg@10": v[1]} for m, v in PAPER.items()},
                                 "how_run": f"one process, models in sequence, accelerator {args.accelerator}"})


def _run_parallel(args, argv: List[str]) -> Dict[str, object]:
    """Each (model, seed) in its own child process (this script with --models M --seeds S), all
    at the same time, spread over ``--gpus``; their JSON files are merged. A failed child fails
    the whole run, naming its log."""
    from gauss_plugins.train.compare import summarize_runs

    child_argv = _without(argv, ("--parallel",), ("--models", "--seeds", "--out", "--json", "--workdir", "--gpus"))
    gpus = args.gpus
    os.makedirs(args.workdir, exist_ok=True)
    children = []
    started = time.time()
    jobs = [(m, seed) for seed in args.seeds for m in args.models]
    for i, (m, seed) in enumerate(jobs):
        out = os.path.join(args.workdir, f"parallel-{m}-seed{seed}.json")
        log_path = os.path.join(args.workdir, f"parallel-{m}-seed{seed}.log")
        cmd = [sys.executable, os.path.abspath(__file__), *child_argv, "--models", m, "--seeds", str(seed),
               "--out", out, "--workdir", args.workdir, "--accelerator", args.accelerator]
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        log = open(log_path, "w")
        children.append((m, out, log_path, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
    failed = []
    for m, out, log_path, log, proc in children:
        if proc.wait() != 0:
            failed.append(f"{m} (exit {proc.returncode}, log {log_path})")
        log.close()
    if failed:
        raise RuntimeError("parallel run failed for " + ", ".join(failed) + ": read the log, fix, and rerun "
                           "with --resume to keep the runs that finished")
    merged: Dict[str, object] = {"runs": [], "configs": {}}
    for m, out, *_ in children:
        with open(out) as f:
            part = json.load(f)
        merged["runs"].extend(part["runs"])
        merged["configs"].update(part["configs"])
        for key in ("data", "paper_table4_ml1m"):
            merged.setdefault(key, part.get(key))
    merged["seeds"] = list(args.seeds)
    merged["summary"] = summarize_runs(merged["runs"], args.models)
    merged["this_invocation_wall_s"] = round(time.time() - started, 1)
    where = f"GPUs {','.join(gpus)}" if gpus else ("one GPU" if args.accelerator == "gpu" else "one CPU machine")
    merged["how_run"] = f"{len(children)} processes in parallel (one per model and seed) on {where}"
    from gauss_plugins.train.report import write_json

    write_json(args.out, merged)
    return merged


def _without(argv: List[str], flags, options) -> List[str]:
    """``argv`` minus the given flags and options (with their values, ``--opt v ...`` or ``--opt=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            if a.startswith("-"):
                skip = False
            else:
                continue
        name = a.split("=", 1)[0]
        if name in flags:
            continue
        if name in options:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _write_markdown(result: Dict[str, object], md_path: str, models: List[str]) -> None:
    from gauss_plugins.train.compare import markdown_table, timing_table

    epochs = sorted({c["train"]["max_epochs"] for c in result.get("configs", {}).values()})
    title = "paper Table 4 settings" if epochs == [101] else f"paper Table 4 settings but {epochs} epochs (not the paper's 101)"
    refit = any(c["train"].get("refit") for c in result.get("configs", {}).values())
    if refit:
        title += ", refit on train + validation items for the epoch count selected on validation"
    text = (f"# MovieLens 1M, {title}\n\n" + markdown_table(result["summary"], "test") + "\n\n"
            "Paper (HR@10 / NDCG@10): SASRec .2853/.1603, HSTU .3097/.1720, HSTU-large .3294/.1893.\n\n")
    if refit:
        text += ("## The selected models before the refit (trained on the training prefixes only)\n\n"
                 + markdown_table(result["summary"], "test_selection_run") + "\n\n")
    text += ("## Time per model\n\n" + timing_table(result["summary"]) + "\n\n"
             f"Run: {result.get('how_run', '')}; wall time {result.get('this_invocation_wall_s')} s.\n")
    tmp = md_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, md_path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    try:
        parallel = args.parallel and len(args.models) * len(args.seeds) > 1
        result = _run_parallel(args, argv) if parallel else _run_here(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"{os.path.basename(__file__)}: {exc}", file=sys.stderr)
        return 2
    print("\nmodel        ours HR@10  paper   ours NDCG@10  paper   epoch s  val s")
    for m in args.models:
        s = result["summary"][m]
        epoch = s.get("epoch_seconds", {}).get("mean", float("nan"))
        val = s.get("val_seconds", {}).get("mean", float("nan"))
        print(f"{m:<12} {s['test/hr@10']['mean']:.4f}      {PAPER[m][0]:.4f}  {s['test/ndcg@10']['mean']:.4f}        "
              f"{PAPER[m][1]:.4f}  {epoch:7.2f}  {val:5.2f}")
    _write_markdown(result, os.path.splitext(args.out)[0] + ".md", args.models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
