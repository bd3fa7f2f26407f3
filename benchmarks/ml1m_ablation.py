"""ML-1M ablation: config variants trained at once (one `gauss train` process each), every run
selected on validation, test reported at the selected epoch (issue #9).

    GAUSS_DATA=$PWD/.devdata python benchmarks/ml1m_ablation.py --timeout-s 540 \\
        --json benchmarks/results/ml1m_ablation_s3_h200.json        # GPU: the default variants
    python benchmarks/ml1m_ablation.py --quick                        # CPU check: 2 variants, 1 epoch, 300 users, len 50
    python benchmarks/ml1m_ablation.py --list                         # the variants and their overrides
    python benchmarks/ml1m_ablation.py --variants hstu-s42 hstu-d25-s42 --max-epochs 20

A variant is a shipped config plus ``section.key`` overrides and a seed (:data:`VARIANTS`).
Each runs in its own process (all on the same GPU), writes its run folder under
``--workdir``, and is read back from its ``report.json``: the epoch selected on
``val/ndcg@10`` (never on test), the validation metrics of that epoch, and the test metrics
of the selected weights. The JSON (``--json``) holds the machine, every run, a per-group mean
over seeds (``summary``) and the paper's numbers; a markdown table is written beside it and
printed. The baseline of each ablation is the fixed config's run with the same seed, in the
same invocation (``delta_vs_base`` in each result). Without a GPU (and without ``--quick`` or
``--accelerator cpu``) the JSON says ``skipped`` and the script exits 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gauss_plugins.benchmarking import cuda_skip_reason, gpu_list, parser, print_table, write_report, write_skip

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

NAME = "ml1m_ablation"
PAPER = {"sasrec": (0.2853, 0.1603), "hstu": (0.3097, 0.1720), "hstu-large": (0.3294, 0.1893)}
# --quick: one epoch on the first 300 users, sequences cut to 50 items (about a minute per run on CPU)
QUICK = {"max_epochs": 1, "max_len": 50, "users": 300}

# name -> (shipped config, {section.key: value}, seed, group, baseline variant or None). The
# group is what the summary averages over seeds; the baseline is the variant an ablation
# differs from by exactly its overrides (same seed, same invocation).
VARIANTS: Dict[str, Tuple[str, Dict[str, Any], int, str, Optional[str]]] = {
    # the configs as fixed in session 3 (the paper code's settings), two seeds each
    "hstu-s42": ("ml-1m-hstu", {}, 42, "hstu", None),
    "hstu-s43": ("ml-1m-hstu", {}, 43, "hstu", None),
    "large-s42": ("ml-1m-hstu-large", {}, 42, "hstu-large", None),
    "large-s43": ("ml-1m-hstu-large", {}, 43, "hstu-large", None),
    # single-knob ablations of the fixed HSTU, seed 42: each undoes one fix
    "hstu-d25-s42": ("ml-1m-hstu", {"model.attention_dim": 25, "model.linear_dim": 25}, 42,
                     "hstu dqk=dv=25 (before)", "hstu-s42"),
    "hstu-lnaffine-s42": ("ml-1m-hstu", {"model.layer_norm_affine": True}, 42,
                          "hstu learned LayerNorm affine (before)", "hstu-s42"),
    "hstu-posnormal-s42": ("ml-1m-hstu", {"model.position_init": "normal"}, 42,
                           "hstu position init N(0, 1/D) (before)", "hstu-s42"),
    # more sampled negatives than the paper's 128 (session 6), both seeds
    "hstu-neg512-s42": ("ml-1m-hstu", {"loss.num_negatives": 512}, 42, "hstu 512 negatives", "hstu-s42"),
    "hstu-neg512-s43": ("ml-1m-hstu", {"loss.num_negatives": 512}, 43, "hstu 512 negatives", "hstu-s43"),
}
COLUMNS = ["variant", "selected_epoch", "epochs_trained", "val_hr@10", "val_ndcg@10", "test_hr@10", "test_ndcg@10",
           "epoch_seconds_mean", "status"]


def _parse(argv):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=None, help=f"which variants (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--data-path", help="ml-1m folder or file (default: $GAUSS_DATA/ml-1m, ../shared/data/ml-1m)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default=None,
                   help="default: gpu when CUDA is available; on a CPU machine only --quick runs unless this says cpu")
    p.add_argument("--max-epochs", type=int, default=None, help="override the configs' 101 epochs")
    p.add_argument("--parallel", type=int, default=0,
                   help="processes at once (default 0: every variant at once on a GPU, 2 on CPU)")
    p.add_argument("--gpus", type=gpu_list, default=[],
                   help="comma-separated CUDA device numbers the runs are spread over, round robin in the order "
                        "given by --variants (default: whatever each process sees)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="stop a run still going after this many seconds (it is reported as timed out)")
    p.add_argument("--workdir", default=None, help="run folders (default: runs/ml1m_ablation[_quick])")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants or ()) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    # --quick checks the pipeline end to end on the fixed HSTU and one ablation of it
    args.variants = args.variants or (["hstu-s42", "hstu-d25-s42"] if args.quick else list(VARIANTS))
    args.workdir = args.workdir or os.path.join(REPO, "runs", NAME + ("_quick" if args.quick else ""))
    return args


def _config(base: str, overrides: Dict[str, Any], seed: int, args, data_path: Optional[str]):
    from gauss_plugins.train.config import load_config, with_overrides

    flat = {key.replace(".", "__"): value for key, value in overrides.items()}
    epochs = args.max_epochs if args.max_epochs is not None else (QUICK["max_epochs"] if args.quick else None)
    return with_overrides(load_config(base), train__seed=seed, train__accelerator=args.accelerator,
                          train__max_epochs=epochs, data__path=data_path,
                          data__max_len=QUICK["max_len"] if args.quick else None, **flat)


def _quick_data(args) -> str:
    """The first users of the ML-1M data as a sequence file in the workdir (--quick)."""
    from gauss_plugins.data.locate import load_configured_dataset

    seqs = load_configured_dataset("ml-1m", args.data_path)
    path = os.path.join(args.workdir, "quick-data", "ml-1m_seq.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = min(QUICK["users"], seqs.num_users)
    lines = [" ".join(str(int(v)) for v in [seqs.user_ids[u], *seqs.items[seqs.offsets[u]:seqs.offsets[u + 1]]])
             for u in range(n)]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _write_config(config, path: str) -> None:
    import yaml

    from gauss_plugins.train.config import config_to_dict

    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
    os.replace(path + ".tmp", path)


def _launch(name: str, config_path: str, run_dir: str, accelerator: str,
            gpu: Optional[str] = None) -> Tuple[subprocess.Popen, Any]:
    log = open(os.path.join(os.path.dirname(run_dir), "train.log"), "w")
    cmd = [sys.executable, "-m", "gauss_plugins.cli", "train", "--config", config_path, "--output-dir", run_dir,
           "--accelerator", accelerator, "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _gpu_note(args) -> str:
    where = f"spread over GPUs {','.join(args.gpus)}" if args.gpus else "one GPU shared"
    return f" ({where}: epoch seconds are inflated by the sharing)"


def _run_all(args, configs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Run the variants, at most ``args.parallel`` at a time; returns name -> status facts."""
    pending = list(configs)
    running: Dict[str, Tuple[subprocess.Popen, Any, float]] = {}
    status: Dict[str, Dict[str, Any]] = {}
    limit = args.parallel
    gpus = args.gpus
    device_of = {name: gpus[i % len(gpus)] for i, name in enumerate(configs)} if gpus else {}
    while pending or running:
        while pending and len(running) < limit:
            name = pending.pop(0)
            folder = os.path.join(args.workdir, name)
            os.makedirs(folder, exist_ok=True)
            config_path = os.path.join(folder, "config.yaml")
            _write_config(configs[name], config_path)
            proc, log = _launch(name, config_path, os.path.join(folder, "run"), args.accelerator, device_of.get(name))
            running[name] = (proc, log, time.time())
        time.sleep(1.0)
        for name, (proc, log, started) in list(running.items()):
            code = proc.poll()
            overdue = args.timeout_s is not None and time.time() - started > args.timeout_s
            if code is None and not overdue:
                continue
            if code is None:
                proc.kill()  # our own child, by its handle
                proc.wait()
            log.close()
            status[name] = {"wall_s": round(time.time() - started, 1),
                            "status": "ok" if code == 0 else ("timed out" if code is None else f"exit {code}")}
            del running[name]
    return status


def _result(name: str, args, facts: Dict[str, Any]) -> Dict[str, Any]:
    base, overrides, seed, group, baseline = VARIANTS[name]
    row: Dict[str, Any] = {"variant": name, "group": group, "config": base, "overrides": overrides, "seed": seed,
                           "baseline": baseline, **facts}
    report_path = os.path.join(args.workdir, name, "run", "report.json")
    if facts["status"] != "ok" or not os.path.isfile(report_path):
        row["log"] = os.path.join(args.workdir, name, "train.log")
        return row
    with open(report_path) as f:
        report = json.load(f)
    with open(os.path.join(args.workdir, name, "run", "metrics.json")) as f:
        metrics = json.load(f)
    selected = report.get("selected_epoch")
    record = next((h for h in report.get("history", []) if h.get("epoch") == selected), {})
    row.update({"selected_epoch": selected, "epochs_trained": report.get("epochs_trained"),
                "epoch_seconds_mean": report.get("epoch_seconds_mean")})
    for key in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200"):
        row[f"val_{key}"] = record.get(f"val/{key}")
        row[f"test_{key}"] = metrics.get(f"test/{key}")
    return row


def _summary(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    import numpy as np

    by_name = {r["variant"]: r for r in results}
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        if r.get("test_ndcg@10") is not None:
            groups.setdefault(r["group"], []).append(r)
        base = by_name.get(r.get("baseline") or "")
        if base and r.get("val_ndcg@10") is not None and base.get("val_ndcg@10") is not None:
            r["delta_vs_base"] = {k: round(r[k] - base[k], 4)
                                  for k in ("val_hr@10", "val_ndcg@10", "test_hr@10", "test_ndcg@10")}
    summary: Dict[str, Any] = {}
    for group, rows in groups.items():
        entry: Dict[str, Any] = {"runs": len(rows), "seeds": [r["seed"] for r in rows]}
        for key in ("val_hr@10", "val_ndcg@10", "test_hr@10", "test_ndcg@10"):
            values = [float(r[key]) for r in rows]
            entry[key] = {"mean": round(float(np.mean(values)), 4),
                          "std": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None}
        if group in PAPER:
            entry["paper_test_hr@10_ndcg@10"] = list(PAPER[group])
        summary[group] = entry
    return summary


def _markdown(results: List[Dict[str, Any]], summary: Dict[str, Any], how: str) -> str:
    def f(v):
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["# ML-1M ablation (issue #9): every run selected on val/ndcg@10, test at that epoch", "",
             "| variant | overrides | seed | sel. epoch | val HR@10 | val NDCG@10 | test HR@10 | test NDCG@10 | "
             "Δ val NDCG@10 vs base | epoch s | status |", "|" + " --- |" * 11]
    for r in results:
        overrides = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or f"{r['config']} as shipped"
        delta = r.get("delta_vs_base", {}).get("val_ndcg@10")
        lines.append(f"| {r['variant']} | {overrides} | {r['seed']} | {f(r.get('selected_epoch'))} | "
                     f"{f(r.get('val_hr@10'))} | {f(r.get('val_ndcg@10'))} | {f(r.get('test_hr@10'))} | "
                     f"{f(r.get('test_ndcg@10'))} | {'' if delta is None else f'{delta:+.4f}'} | "
                     f"{f(r.get('epoch_seconds_mean'))} | {r['status']} |")
    lines += ["", "| group | runs | test HR@10 | test NDCG@10 | paper |", "| --- | --- | --- | --- | --- |"]
    for group, s in summary.items():
        def pm(key):
            return f"{s[key]['mean']:.4f}" + ("" if s[key]["std"] is None else f" ± {s[key]['std']:.4f}")
        paper = "/".join(f"{v:.4f}" for v in PAPER[group]) if group in PAPER else ""
        lines.append(f"| {group} | {s['runs']} | {pm('test_hr@10')} | {pm('test_ndcg@10')} | {paper} |")
    lines += ["", f"Run: {how}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        for name, (base, overrides, seed, group, baseline) in VARIANTS.items():
            print(f"{name:<20} {base:<18} seed {seed}  {overrides or ''}  (group {group!r}"
                  f"{', vs ' + baseline if baseline else ''})")
        return 0
    if args.accelerator is None:
        reason = cuda_skip_reason()
        if reason and not args.quick:
            write_skip(NAME, f"{reason}; a full ablation is 7 x 101 epochs of ML-1M (use --quick, or "
                             "--accelerator cpu to force it)", args.json)
            return 0
        args.accelerator = "cpu" if reason else "gpu"
    try:
        data_path = _quick_data(args) if args.quick else args.data_path
        configs = {name: _config(VARIANTS[name][0], VARIANTS[name][1], VARIANTS[name][2], args, data_path)
                   for name in args.variants}
    except FileNotFoundError as exc:
        write_skip(NAME, f"no ML-1M data here: {exc}", args.json)
        return 0
    except (ValueError, KeyError) as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 2
    if args.parallel <= 0:
        # one GPU takes every run at once (each is launch-bound); two CPU cores take two
        args.parallel = len(args.variants) if args.accelerator == "gpu" else 2
    os.makedirs(args.workdir, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]  # CPU timings move with the machine's load
    started = time.time()
    status = _run_all(args, configs)
    wall = round(time.time() - started, 1)
    load_after = [round(x, 2) for x in os.getloadavg()]
    results = [_result(name, args, status[name]) for name in args.variants]
    summary = _summary(results)
    how = (f"{len(args.variants)} `gauss train` processes, {args.parallel} at a time, accelerator {args.accelerator}"
           f"{_gpu_note(args) if args.accelerator == 'gpu' else ''}"
           f", wall {wall} s, load average {load_before[0]} -> {load_after[0]}{', --quick (1 epoch, 300 users, len 50: not comparable to the paper)' if args.quick else ''}")
    print_table(results, COLUMNS)
    md = _markdown(results, summary, how)
    print("\n" + md)
    flat_summary = {f"{group}/{key}": s[key]["mean"] for group, s in summary.items()
                    for key in ("test_hr@10", "test_ndcg@10")}
    flat_summary.update({"wall_s": wall, "runs_ok": sum(r["status"] == "ok" for r in results),
                         "runs": len(results)})
    report = write_report(NAME, results, flat_summary, args.json)
    if args.json:
        report.update({"how": how, "load_average_1_5_15min": {"before": load_before, "after": load_after},
                       "selection": "each run selected on val/ndcg@10; test at the selected epoch",
                       "groups": summary, "paper": {k: list(v) for k, v in PAPER.items()}})
        from gauss_plugins.train.report import write_json

        write_json(args.json, report)
        md_path = os.path.splitext(args.json)[0] + ".md"
        with open(md_path + ".tmp", "w") as f:
            f.write(md)
        os.replace(md_path + ".tmp", md_path)
    failed = [r["variant"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"{NAME}: not finished: {', '.join(failed)} (see their train.log under {args.workdir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
