"""``gauss store``: maintenance of on-disk stores.

    gauss store repair PATH [--dry-run]

``repair`` drops the damaged records of a TierPS / DiskTier segment log (the directory that
``TierPS(path=...)`` or ``DiskTier(path)`` was given) and prints exactly what it drops. Opening
a store refuses damage that is not a torn tail of its newest segment (bit rot would otherwise
silently delete acknowledged rows); this command is the explicit way past that refusal.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("store", help="check and repair on-disk stores (TierPS segment logs)",
                              description="Maintenance of on-disk stores.")
    sub = p.add_subparsers(dest="store_command", metavar="ACTION")
    r = sub.add_parser("repair", help="drop damaged records of a segment log, reporting exactly what is dropped",
                       description="Drop the damaged records of a TierPS / DiskTier segment log and report them. "
                                   "The store must be closed. Exit status: 0 clean or repaired, 1 damage found "
                                   "with --dry-run, 2 error.")
    r.add_argument("path", help="the store directory (holding seg-*.log files)")
    r.add_argument("--dry-run", action="store_true", help="only report what would be dropped; change nothing")
    return p


def run(args: argparse.Namespace) -> int:
    if getattr(args, "store_command", None) != "repair":
        print("gauss store: name an action, e.g. `gauss store repair PATH --dry-run`", file=sys.stderr)
        return 2
    from gauss_plugins.stores.disk import repair_log

    try:
        dropped = repair_log(args.path, dry_run=args.dry_run)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"gauss store repair: {exc}", file=sys.stderr)
        return 2
    if not dropped:
        print(f"{args.path}: every record checks out; nothing to drop")
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    for d in dropped:
        print(f"{verb} {d.describe()}")
    total = sum(d.length for d in dropped)
    print(f"{verb} {len(dropped)} damaged range(s), {total} bytes. A dropped PUT can bring back an older "
          "value of its ids, a dropped DELETE brings its ids back.")
    if args.dry_run:
        print(f"run `gauss store repair {args.path}` (without --dry-run) to drop them")
        return 1
    return 0
