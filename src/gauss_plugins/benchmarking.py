"""The benchmark convention shared by every script under ``benchmarks/``.

Each script measures the system and its baseline in the same run, prints a table, writes
``{"benchmark", "machine", "results", "summary"}`` JSON with ``--json PATH``, supports
``--quick`` (about a minute on the 2-core CPU machine), and ends with a one-line summary.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional


def machine_info() -> Dict[str, Any]:
    """CPU/GPU model, thread count and library versions, for the JSON record."""
    import torch

    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("triton", "torchrec", "fbgemm_gpu", "redis", "ray", "pytorch_lightning"):
        info[mod] = _version_of(mod)
    return info


def _version_of(module: str) -> Optional[str]:
    from importlib import metadata

    dist = {"fbgemm_gpu": "fbgemm-gpu-cpu", "pytorch_lightning": "pytorch-lightning"}.get(module, module)
    for name in (dist, module, "fbgemm-gpu" if module == "fbgemm_gpu" else dist):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small run, about a minute on the CPU machine")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    return p


def print_table(rows: Iterable[Dict[str, Any]], columns: Optional[List[str]] = None) -> None:
    rows = list(rows)
    if not rows:
        return
    columns = columns or list(rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_report(name: str, results: List[Dict[str, Any]], summary: Dict[str, Any], json_path: Optional[str]) -> Dict[str, Any]:
    """Write the JSON record (atomically) when asked, and print the one-line summary last."""
    report = {"benchmark": name, "machine": machine_info(), "results": results, "summary": summary}
    if json_path:
        from gauss_plugins.train.report import write_json

        write_json(json_path, report)
    print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return report
