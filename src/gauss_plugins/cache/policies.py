"""Cache policies: which resident rows to evict, and whether to look ahead.

A policy sees two per-row arrays the cache keeps for every resident row of a table:
``last_use`` (the step that last used the row) and ``uses`` (how many steps used it since
it became resident). Its :meth:`CachePolicy.scores` orders the *evictable* rows (lowest
first); the cache never offers it a row that a batch in the window still needs.

``lookahead = True`` makes the cache keep a window of future batches and prefetch their
rows ahead of use; ``False`` is a classic cache: a batch's missing rows are fetched
synchronously when the batch arrives (fetch on miss).

Third-party policies subclass :class:`CachePolicy` and register through the
``gauss_register_cache_policies`` hook (kind ``cache_policy``).
"""
from __future__ import annotations

import torch

__all__ = ["CachePolicy", "LookaheadPolicy", "LRUPolicy", "LFUPolicy"]


class CachePolicy:
    """Base class: evict the row used longest ago (subclasses change :meth:`scores`)."""

    name = "cache_policy"
    #: keep a window of future batches and prefetch their rows (else fetch on miss)
    lookahead = False

    def scores(self, last_use: torch.Tensor, uses: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """int64 per row of ``rows`` (resident, evictable): lower is evicted first."""
        return last_use.index_select(0, rows)


class LookaheadPolicy(CachePolicy):
    """Bagpipe-style: rows of the next ``window`` batches are prefetched; among the rows no
    batch in the window needs, the one used longest ago goes first (kept while room lasts,
    so a hot row that leaves the window and returns soon is not fetched again)."""

    name = "lookahead"
    lookahead = True


class LRUPolicy(CachePolicy):
    """Baseline: fetch on miss, evict the least recently used row."""

    name = "lru"


class LFUPolicy(CachePolicy):
    """Baseline: fetch on miss, evict the least frequently used row (ties: least recent)."""

    name = "lfu"

    def scores(self, last_use, uses, rows):
        return uses.index_select(0, rows) * (1 << 32) + last_use.index_select(0, rows)
