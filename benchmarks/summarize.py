"""One table of a ``make bench`` run: every benchmark's summary keys, targets and skip reasons.

    python benchmarks/summarize.py runs/bench/20261129T120000Z

The folder holds what ``make bench`` left there: ``<name>.json`` (the record each script
wrote with ``--json``), ``<name>.rc`` (its exit status) and ``<name>.seconds`` (its wall
time). A benchmark with a non-zero status, or without a JSON, is listed as failed; a JSON
with ``"skipped"`` shows the reason; otherwise each summary key is shown with its target
(the record's ``"targets"``, or a ``<key>_target`` summary entry) and whether it is met.
Exits 1 when a benchmark failed, else 0 (a skip or a missed target is a result, not a failure).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from gauss_plugins.benchmarking import meets_target, print_table

_WIDTH = 40


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def benchmark_rows(folder: str, name: str) -> List[Dict[str, Any]]:
    """The table rows of one benchmark (the first row carries its name, status and time)."""
    rc = _read(os.path.join(folder, f"{name}.rc"))
    seconds = _read(os.path.join(folder, f"{name}.seconds"))
    head = {"benchmark": name, "s": int(seconds) if seconds and seconds.isdigit() else None}
    record: Optional[dict] = None
    problem = None
    json_path = os.path.join(folder, f"{name}.json")
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            problem = f"unreadable JSON ({exc})"
    if rc not in (None, "0"):
        why = "timed out" if rc in ("124", "137") else f"exit status {rc}"
        return [{**head, "status": f"FAILED: {why} (see its output above)"}]
    if problem or record is None:
        return [{**head, "status": f"FAILED: {problem or 'wrote no JSON (was it given --json?)'}"}]
    if "skipped" in record:
        return [{**head, "status": f"skipped: {record['skipped']}"}]
    summary = _flatten(record.get("summary") or {})
    targets = dict(record.get("targets") or {})
    for key, value in summary.items():  # the older convention: a numeric `<key>_target` entry
        if key.endswith("_target") and isinstance(value, (int, float)):
            base = key[: -len("_target")]
            for candidate in (base, f"{base}_keys_per_s"):
                if candidate in summary:
                    targets.setdefault(candidate, f">= {value:g}")
    rows = []
    for key, value in summary.items():
        target = targets.get(key)
        met = meets_target(value, target) if target else None
        if isinstance(value, str) and len(value) > _WIDTH:  # long notes would widen every row
            value = value[: _WIDTH - 3] + "..."
        rows.append({"key": key, "value": value, "target": target,
                     "status": "" if met is None else ("met" if met else "MISSED")})
    missing = [k for k in ("benchmark", "machine", "results", "summary") if k not in record]
    if missing:  # still shown, but the script does not follow the convention yet
        rows.insert(0, {"key": f"(record lacks {', '.join(missing)})", "status": "NOT THE CONVENTION"})
    if not rows:
        rows = [{"status": "ok", "key": "(empty summary)"}]
    rows[0] = {**head, **rows[0]}
    return rows


def _flatten(summary: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested summaries (model -> metric -> {mean, std, ...}) as ``model.metric`` -> mean;
    lists (per-seed values) are left to the JSON."""
    flat: Dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if "mean" in value and not isinstance(value["mean"], dict):
                flat[name] = value["mean"]
            else:
                flat.update(_flatten(value, name + "."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def summarize(folder: str) -> int:
    names = sorted({os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith((".rc", ".json"))})
    if not names:
        print(f"{folder}: no benchmark records (.json / .rc) here", file=sys.stderr)
        return 1
    rows: List[Dict[str, Any]] = []
    for name in names:
        rows += benchmark_rows(folder, name)
    print(f"\n==== benchmark summary ({folder}) ====")
    print_table(rows, ["benchmark", "s", "key", "value", "target", "status"])
    # `make bench` must stay within 15 minutes on a CPU machine: show where the time went
    times = {r["benchmark"]: r["s"] for r in rows if r.get("benchmark") and r.get("s") is not None}
    if times:
        slowest = ", ".join(f"{n} {s}s" for n, s in sorted(times.items(), key=lambda kv: -kv[1])[:3])
        print(f"total {sum(times.values())} s over {len(times)} benchmarks (slowest: {slowest})")
    failed = [r["benchmark"] for r in rows if str(r.get("status")).startswith("FAILED")]
    skipped = [r["benchmark"] for r in rows if str(r.get("status")).startswith("skipped")]
    print(f"\n{len(names)} benchmarks: {len(names) - len(failed) - len(skipped)} ran, {len(skipped)} skipped, "
          f"{len(failed)} failed" + (f" ({', '.join(failed)})" if failed else "")
          + f"; {sum(r.get('status') == 'MISSED' for r in rows)} target(s) missed")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the run folder of `make bench` (runs/bench/<time>)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"{args.folder}: no such folder (make bench writes runs/bench/<time>/)", file=sys.stderr)
        return 2
    return summarize(args.folder)


if __name__ == "__main__":
    sys.exit(main())
