"""Registers the core embedding stores: ``tierps`` (training) and ``weps`` (embedded serving).

Import paths only: nothing is built (and no file is opened) until a store is created.
"""
from __future__ import annotations

from gauss_plugins.components import Component
from gauss_plugins.plugins import hookimpl


@hookimpl
def gauss_register_embedding_stores():
    return [
        Component(
            kind="embedding_store",
            name="tierps",
            factory="gauss_plugins.stores.tierps:TierPS",
            description="training store: RAM tier (dynamic-table index) over a crash-consistent on-disk segment log",
            priority=10,
        ),
        Component(
            kind="embedding_store",
            name="weps",
            factory="gauss_plugins.stores.weps:WePS",
            description="embedded serving store: read-optimised, versioned immutable snapshots",
        ),
    ]
