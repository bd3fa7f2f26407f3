"""Embedding stores: TierPS for training, WePS for serving, and the syncer between them.

* :class:`~gauss_plugins.stores.base.EmbeddingStore` -- the batched get / put / delete
  interface (values + optional optimizer state, versions, export, stats).
* :class:`~gauss_plugins.stores.tierps.TierPS` -- RAM tier over a crash-consistent disk tier.
* :class:`~gauss_plugins.stores.weps.WePS` -- embedded, versioned, read-optimised snapshots.
* :class:`~gauss_plugins.stores.syncer.Syncer` -- pushes changed rows every second, dense
  weights and a manifest through fsspec.

Redis (``gauss_integrations.redis``) and Ray-sharded TierPS (``gauss_integrations.ray``) are
integrations. Every store is registered as an ``embedding_store`` component.
"""
from gauss_plugins.stores.base import ChangeBatch, EmbeddingStore, Lookup, RowBatch
from gauss_plugins.stores.syncer import Syncer, load_dense, read_manifest
from gauss_plugins.stores.tierps import TierPS
from gauss_plugins.stores.weps import Snapshot, WePS

__all__ = ["ChangeBatch", "EmbeddingStore", "Lookup", "RowBatch", "Snapshot", "Syncer", "TierPS", "WePS",
           "load_dense", "read_manifest"]
