"""Writing results: atomic JSON files, metric tables, and training-curve plots.

matplotlib (the ``lightning`` extra) is imported only when a plot is drawn, with the
non-interactive Agg backend so that plotting works on machines without a display.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["write_json", "format_table", "plot_history", "plot_stream", "plot_comparison", "METRIC_KEYS"]

METRIC_KEYS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200")


def write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as indented, strict JSON (NaN and infinities become ``null``);
    atomic (temp file in the same folder + rename)."""
    from gauss_plugins.serialization import write_atomic

    text = json.dumps(_strict(payload), indent=2, sort_keys=False, default=_jsonable, allow_nan=False) + "\n"
    write_atomic(path, (text.encode("utf-8"),))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _strict(value: Any) -> Any:
    """``payload`` with every non-finite float as ``None``: Python writes bare ``NaN`` (a std
    over one seed), which strict JSON parsers and other languages reject."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, (str, int)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _strict(value.tolist())
    return value


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table (floats with 4 decimals)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _pyplot():
    from gauss_plugins._optional import require

    matplotlib = require("matplotlib", "lightning", feature="plotting training curves")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{root}.", suffix=ext or ".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_history(history: Mapping[str, List[Dict[str, float]]], path: str, title: str = "") -> None:
    """One figure: training loss by epoch (left), validation HR/NDCG@10 by epoch (right).

    ``history`` maps a run label to its list of per-epoch records (``epoch``, ``train/loss``,
    and ``val/...`` when validated); several runs share the axes for comparison.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in history.items():
        pts = [(r["epoch"], r["train/loss"]) for r in records if "train/loss" in r]
        if pts:
            ax_loss.plot(*zip(*pts), label=label)
        for key, style in (("val/hr@10", "-"), ("val/ndcg@10", "--")):
            pts = [(r["epoch"], r[key]) for r in records if key in r]
            if pts:
                ax_metric.plot(*zip(*pts), style, marker=".", label=f"{label} {key[4:]}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("sampled softmax loss")
    ax_loss.set_title("training loss")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("validation metric")
    ax_metric.set_title("validation HR@10 (solid) / NDCG@10 (dashed)")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_stream(history: Mapping[str, List[Dict[str, float]]], path: str, title: str = "") -> None:
    """Streaming mode: HR@10 / NDCG@10 on each window (evaluated before training on it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, records in history.items():
        for key, style in (("hr@10", "-"), ("ndcg@10", "--")):
            pts = [(r["window"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{label} {key}")
    ax.set_xlabel("time window (evaluated before training on it)")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title(title or "streaming: metrics over time")
    _save(fig, path)
    plt.close(fig)


def plot_comparison(results: Mapping[str, Mapping[str, float]], path: str, title: str = "",
                    keys: Optional[Sequence[str]] = None) -> None:
    """Grouped bars of test metrics for several models."""
    plt = _pyplot()
    keys = list(keys or METRIC_KEYS)
    fig, ax = plt.subplots(figsize=(9, 4))
    n = max(len(results), 1)
    width = 0.8 / n
    for i, (label, metrics) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [metrics.get(f"test/{k}", float("nan")) for k in keys], width=width, label=label)
    ax.set_xticks([j + width * (n - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys)
    ax.set_ylabel("test metric")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title or "test metrics")
    _save(fig, path)
    plt.close(fig)
