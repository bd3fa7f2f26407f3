"""Registers the built-in cache policies: ``lookahead`` (prefetch the window's rows) and
the fetch-on-miss baselines ``lru`` and ``lfu``. Import paths only: nothing is built until
a :class:`~gauss_plugins.cache.LookaheadCache` asks for one."""
from __future__ import annotations

from gauss_plugins.components import Component
from gauss_plugins.plugins import hookimpl


@hookimpl
def gauss_register_cache_policies():
    return [
        Component(kind="cache_policy", name="lookahead", factory="gauss_plugins.cache.policies:LookaheadPolicy",
                  description="Bagpipe-style: prefetch the rows of the next batches, evict rows no batch in the "
                              "window needs", priority=10),
        Component(kind="cache_policy", name="lru", factory="gauss_plugins.cache.policies:LRUPolicy",
                  description="baseline: fetch on miss (synchronously), evict the least recently used row"),
        Component(kind="cache_policy", name="lfu", factory="gauss_plugins.cache.policies:LFUPolicy",
                  description="baseline: fetch on miss (synchronously), evict the least frequently used row"),
    ]
