"""Subcommands of the ``gauss`` CLI, one module each.

A module here defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and
``run(args) -> int``; :mod:`gauss_plugins.cli` finds them without importing anything heavy
(each module imports what it needs inside ``run``).
"""
