"""``gauss plugins``: what is registered, who provides it, and whether it runs here."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plugins",
        help="list registered components: kind, name, provider, available or not and why",
        description="List every component registered through the gauss_plugins hooks.",
    )
    p.add_argument("--kind", help="only this kind (e.g. attention_backend)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.plugins import get_registry

    registry = get_registry()
    rows = []
    for comp in registry.components(args.kind):
        avail = comp.availability()
        rows.append({
            "kind": comp.kind,
            "name": comp.name,
            "provider": comp.provider,
            "plugin": comp.plugin,
            "available": avail.ok,
            "reason": avail.reason,
            "description": comp.description,
        })
    problems = [{"plugin": p.name, "provider": p.provider, "reason": p.reason} for p in registry.problems]
    training = _training_status()
    if args.json:
        print(json.dumps({"components": rows, "problems": problems,
                          "training": {"available": training.startswith("yes"), "status": training}}, indent=2))
        return 0
    headers = ["kind", "name", "provider", "available"]
    table = [[r["kind"], r["name"], r["provider"], "yes" if r["available"] else f"no: {r['reason']}"] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    plugins = registry.pm.list_name_plugin()
    print(f"\n{len(rows)} components from {len(plugins)} plugins: " + ", ".join(sorted(n for n, _ in plugins)))
    for p in problems:
        print(f"plugin {p['plugin']} ({p['provider']}) not loaded: {p['reason']}")
    if args.kind in (None, "trainer"):
        print(f"training (gauss train, gauss demo): {training}")
    return 0


def _training_status() -> str:
    from gauss_plugins.train.trainers import TrainerUnavailableError, trainer_component

    try:
        comp = trainer_component()
    except TrainerUnavailableError as exc:
        return f"no: {exc}"
    return f"yes, with the {comp.name} trainer ({comp.provider})"
