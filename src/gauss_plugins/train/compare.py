"""Compare models over several seeds: run, aggregate (mean ± std), write JSON and Markdown.

Used by ``gauss demo`` and the scripts in ``benchmarks/``. Each (model, seed) run is a full
experiment of the registered trainer (:func:`~gauss_plugins.train.trainers.get_trainer`) in its own folder; the aggregate file is
rewritten (atomically) after every run, so an interrupted comparison keeps what it finished
and ``resume=True`` skips runs whose ``metrics.json`` already exists.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from gauss_plugins.train.config import ExperimentConfig, config_to_dict
from gauss_plugins.train.report import METRIC_KEYS, format_table, write_json

__all__ = ["run_comparison", "aggregate", "summarize_runs", "markdown_table", "timing_table", "TIMING_KEYS"]

# Per-run timings aggregated beside the metrics (seconds): the mean training-epoch wall time
# (validation excluded), the mean validation pass, and the whole fit.
TIMING_KEYS = ("epoch_seconds", "val_seconds", "fit_s")


def aggregate(runs: Sequence[Mapping[str, float]]) -> Dict[str, Dict[str, float]]:
    """``{metric: {"mean", "std", "n", "values"}}`` over runs (sample std, ddof = 1)."""
    out: Dict[str, Dict[str, float]] = {}
    keys = sorted({k for r in runs for k in r if isinstance(r[k], (int, float))})
    for key in keys:
        values = [float(r[key]) for r in runs if key in r]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        out[key] = {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": values}
    return out


def _pm(stats: Mapping[str, float]) -> str:
    if stats.get("std") is None or math.isnan(stats["std"]):  # one run (std is null once written as JSON)
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]], split: str = "test",
                   keys: Sequence[str] = METRIC_KEYS) -> str:
    """Markdown table, one row per model, ``mean ± std`` cells of ``split`` metrics."""
    header = "| model | runs | " + " | ".join(f"{split} {k.upper()}" for k in keys) + " |"
    lines = [header, "|" + " --- |" * (len(keys) + 2)]
    for model, stats in summary.items():
        n = stats.get(f"{split}/{keys[0]}", {}).get("n", 0)
        cells = [_pm(stats[f"{split}/{k}"]) if f"{split}/{k}" in stats else "" for k in keys]
        lines.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Markdown table, one row per model: mean ± std seconds of each of :data:`TIMING_KEYS`."""
    lines = ["| model | train epoch (s) | validation pass (s) | fit (s) |", "| --- | --- | --- | --- |"]
    for model, stats in summary.items():
        cells = [_pm(stats[k]) if k in stats else "" for k in TIMING_KEYS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_comparison(configs: Mapping[str, ExperimentConfig], seeds: Sequence[int], workdir: str,
                   result_path: Optional[str] = None, resume: bool = False, progress: bool = False,
                   log: Callable[[str], None] = print, sequences=None,
                   extra: Optional[Dict[str, object]] = None, summary_table: bool = True) -> Dict[str, object]:
    """Run every config of ``configs`` (label -> config) with every seed; aggregate.

    Returns (and writes to ``result_path`` when given) ``{"runs": [...], "summary": {label:
    {metric: stats}}, "configs": {...}}``.
    """
    from gauss_plugins.data.locate import load_configured_dataset
    from gauss_plugins.train.trainers import get_trainer

    run_experiment = get_trainer()  # the registered training loop (the core imports no framework)
    runs: List[Dict[str, object]] = []
    started = time.time()
    first = next(iter(configs.values()))
    if sequences is None:
        sequences = load_configured_dataset(first.data.dataset, first.data.path, first.data.options)

    def payload() -> Dict[str, object]:
        return {
            "data": sequences.describe(),
            "seeds": list(seeds),
            "runs": runs,
            "summary": summarize_runs(runs, list(configs)),
            "configs": {label: config_to_dict(c) for label, c in configs.items()},
            "this_invocation_wall_s": round(time.time() - started, 1),  # runs reused by resume took their own fit_s
            **(extra or {}),
        }

    for seed in seeds:
        for label, base in configs.items():
            cfg = _with_seed(base, seed)
            out_dir = os.path.join(workdir, f"{label}-seed{seed}")
            metrics_path = os.path.join(out_dir, "metrics.json")
            report_path = os.path.join(out_dir, "report.json")
            if resume and os.path.isfile(metrics_path) and os.path.isfile(report_path):
                with open(metrics_path) as f:
                    metrics = json.load(f)
                with open(report_path) as f:
                    report = json.load(f)
                if report.get("config") == config_to_dict(cfg):
                    log(f"[{label} seed {seed}] reusing {metrics_path}")
                    runs.append(_run_record(label, seed, metrics, report))
                    continue
            log(f"[{label} seed {seed}] training ...")
            t0 = time.time()
            metrics = run_experiment(cfg, out_dir, progress=progress, log=lambda m: log(f"[{label} seed {seed}] {m}"),
                                     sequences=sequences)
            with open(report_path) as f:
                report = json.load(f)
            runs.append(_run_record(label, seed, metrics, report))
            log(f"[{label} seed {seed}] test HR@10 {metrics['test/hr@10']:.4f} NDCG@10 {metrics['test/ndcg@10']:.4f} "
                f"(selected epoch {report.get('selected_epoch')}, {time.time() - t0:.0f} s)")
            if result_path:
                write_json(result_path, payload())
    result = payload()
    if result_path:
        write_json(result_path, result)
    if summary_table:
        rows = []
        for label, stats in result["summary"].items():
            rows.append({"model": label, **{k: _pm(stats[f"test/{k}"]) for k in METRIC_KEYS if f"test/{k}" in stats}})
        log(format_table(rows, ["model", *METRIC_KEYS]))
    return result


def summarize_runs(runs: Sequence[Mapping[str, object]], labels: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{label: aggregate(...)}`` of the metrics and timings of each label's runs (labels without runs left out)."""
    return {label: aggregate([{**r["metrics"], **r["timing"]} for r in runs if r["model"] == label])
            for label in labels if any(r["model"] == label for r in runs)}


def _with_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    from gauss_plugins.train.config import with_overrides

    return with_overrides(config, train__seed=int(seed))


def _run_record(label: str, seed: int, metrics: Mapping[str, float], report: Mapping[str, object]) -> Dict[str, object]:
    refit = report.get("refit") or {}
    timing = {"epoch_seconds": report.get("epoch_seconds_mean"), "val_seconds": report.get("val_seconds_mean"),
              "fit_s": report.get("fit_s"), "refit_fit_s": refit.get("fit_s")}
    return {"model": label, "seed": int(seed), "metrics": dict(metrics),
            "timing": {k: float(v) for k, v in timing.items() if isinstance(v, (int, float))},
            "selected_epoch": report.get("selected_epoch"), "epochs_trained": report.get("epochs_trained"),
            "fit_s": report.get("fit_s"), "item_embeddings": report.get("item_embeddings")}
