"""``gauss build``: compile the native parts now instead of on first use.

The C++ hash index of the dynamic tables compiles on first use (about 20 s) and is cached;
run this at install, in CI, or before timing anything. Plugins take part through the
``gauss_build_extensions`` hook.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "build",
        help="compile the C++ hash index (and any plugin's native code) now; print where it is cached",
        description="Compile what would otherwise be compiled on first use, and report where it is cached.",
    )


def run(args: argparse.Namespace) -> int:
    from gauss_plugins.plugins import get_plugin_manager

    pm = get_plugin_manager()
    impls = pm.hook.gauss_build_extensions.get_hookimpls()
    if not impls:
        print("gauss build: no plugin here has anything to build (is gauss_kernels blocked by GAUSS_PLUGINS_LOAD / "
              "GAUSS_PLUGINS_DENY? see `gauss plugins`)")
        return 0
    failed = 0
    # Each plugin on its own, so one failing build does not hide the others' results.
    for impl in impls:
        try:
            results = impl.function() or []
        except Exception as exc:
            failed += 1
            # No traceback, but the whole message: a compiler's errors are what to fix.
            print(f"gauss build: {impl.plugin_name}: {exc}", file=sys.stderr)
            continue
        for r in results:
            how = f"built in {r['seconds']:.1f} s" if r.get("built") else "already built (cached)"
            print(f"{r['name']}: {how}: {r['path']}")
    return 1 if failed else 0
