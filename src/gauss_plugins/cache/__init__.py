"""Embedding caches between a dynamic table (the fast tier) and its backing store.

:class:`LookaheadCache` (Bagpipe, SOSP'23): looks at the next batches, prefetches the rows
they need from the store on a background worker and evicts rows no batch in the window
needs, so every row a step touches is resident before the step starts. The policies
(``lookahead``, and the fetch-on-miss baselines ``lru`` / ``lfu``) plug in through the
``cache_policy`` hook.
"""
from gauss_plugins.cache.lookahead import BudgetError, CacheConfig, LookaheadCache
from gauss_plugins.cache.policies import CachePolicy, LFUPolicy, LookaheadPolicy, LRUPolicy

__all__ = ["LookaheadCache", "CacheConfig", "BudgetError", "CachePolicy", "LookaheadPolicy", "LRUPolicy", "LFUPolicy"]
