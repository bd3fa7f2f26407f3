"""The ``gauss`` command line: ``gauss plugins``, ``gauss train``, ``gauss demo``, ...

Every module of :mod:`gauss_plugins.commands` is a subcommand (see that package's docstring),
so a capability adds its command without touching this file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from gauss_plugins import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gauss",
        description="gauss-plugins: dynamic embeddings, HSTU, stores and their integrations.",
    )
    parser.add_argument("--version", action="version", version=f"gauss-plugins {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command_parser = module.add_parser(sub)
        command_parser.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from gauss_plugins import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from gauss_plugins._optional import MissingExtraError
    from gauss_plugins.train.trainers import TrainerUnavailableError

    try:
        return int(args._run(args) or 0)
    except (MissingExtraError, TrainerUnavailableError) as exc:
        # What is missing and the command that installs it fit on one line; a chained
        # traceback through the import machinery would only bury it.
        print(f"gauss {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
