"""``gauss elastic``: talk to a running elastic training job's coordinator.

    gauss elastic status [--name NAME] [--address ADDR]
    gauss elastic scale --workers N [--name NAME] [--address ADDR]

The coordinator is the Ray actor ``NAME`` (default ``gauss-elastic``) in namespace
``gauss-elastic`` that an ``ElasticTrainer`` started; ``--address`` is its Ray cluster's
(default: the cluster this machine's Ray reports, ``auto``). Scaling takes effect at the
job's next step boundary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("elastic", help="scale or inspect a running elastic training job (Ray)",
                              description="Talk to the coordinator of a running ElasticTrainer.")
    sub = p.add_subparsers(dest="elastic_command", metavar="ACTION")
    for name, help_text in (("status", "print the job's step, workers, generation and recoveries as JSON"),
                            ("scale", "grow or shrink the job to --workers N at its next step boundary")):
        a = sub.add_parser(name, help=help_text, description=help_text)
        a.add_argument("--name", default="gauss-elastic", help="the coordinator's actor name (ElasticConfig.name)")
        a.add_argument("--address", default="auto", help="the Ray cluster address (default: auto)")
        if name == "scale":
            a.add_argument("--workers", type=int, required=True, help="the number of workers wanted")
    return p


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "elastic_command", None)
    if action not in ("status", "scale"):
        print("gauss elastic: name an action, e.g. `gauss elastic scale --workers 4`", file=sys.stderr)
        return 2
    from gauss_plugins._optional import require

    require("ray", "ray", "gauss elastic")
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            ray.init(address=args.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            print(f"gauss elastic {action}: no Ray cluster at {args.address!r} ({exc}). Run this where the "
                  "training job's Ray runs, or pass --address HOST:PORT", file=sys.stderr)
            return 2
    from gauss_plugins.plugins import get_registry

    get_coordinator = get_registry().get("elastic_launcher", "ray").load()

    try:
        coord = get_coordinator(args.name)
        if action == "scale":
            if args.workers < 1:
                print(f"gauss elastic scale: --workers must be >= 1, got {args.workers}", file=sys.stderr)
                return 2
            ray.get(coord.set_target.remote(args.workers), timeout=30)
            print(f"asked {args.name!r} for {args.workers} workers; the change lands at the next step boundary")
        else:
            st = ray.get(coord.status.remote(), timeout=30)
            st.pop("losses", None)
            print(json.dumps(st, indent=2, default=str))
    except (RuntimeError, ValueError) as exc:
        print(f"gauss elastic {action}: {exc}", file=sys.stderr)
        return 2
    except ray.exceptions.RayError as exc:
        print(f"gauss elastic {action}: the coordinator {args.name!r} failed: {exc}", file=sys.stderr)
        return 2
    return 0
