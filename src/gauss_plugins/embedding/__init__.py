"""Dynamic embedding tables: hash-keyed, growing, with admission, eviction and in-row
optimizer state.

* :class:`DynamicEmbeddingTable` / :class:`DynamicTableConfig` (``table.py``): the table and
  its lookup API (``table(ids)``, ``lookup_pooled``, ``find/get/set/delete/evict``,
  ``version``, ``changed_since``, ``evicted_since``).
* :class:`SparseOptimizer` (``optim.py``): steps the tables with fused sparse SGD,
  Adagrad, row-wise Adagrad, Adam with state in the row; the rules and
  :class:`OptimizerConfig` live in ``sparse_rules.py``, which the table imports too (so
  ``table.py`` never imports ``optim.py``).
* ``policies.py``: admission (always, counting, probability) and eviction (LRU, LFU, TTL,
  custom score) policies; ``index.py``: the hash-index interface and the torch backend.
* ``checkpoint.py``: full and incremental checkpoints (``save_table`` / ``load_table``).

Importing this package imports torch only; the C++ index is built on first use.
"""
from gauss_plugins.embedding.checkpoint import load_table, save_table, table_from_checkpoint
from gauss_plugins.embedding.index import HashIndex, IndexFullError, TorchHashIndex
from gauss_plugins.embedding.optim import SparseOptimizer
from gauss_plugins.embedding.policies import (
    AdmissionPolicy,
    AlwaysAdmit,
    CountingAdmission,
    EvictionPolicy,
    LFUEviction,
    LRUEviction,
    ProbabilisticAdmission,
    ScoreEviction,
    TTLEviction,
)
from gauss_plugins.embedding.sparse_rules import OptimizerConfig
from gauss_plugins.embedding.table import (
    DynamicEmbeddingTable,
    DynamicTableConfig,
    ReplicatedTableError,
    TableFullError,
    UnknownIdError,
)

__all__ = [
    "AdmissionPolicy",
    "AlwaysAdmit",
    "CountingAdmission",
    "DynamicEmbeddingTable",
    "DynamicTableConfig",
    "EvictionPolicy",
    "HashIndex",
    "IndexFullError",
    "LFUEviction",
    "LRUEviction",
    "OptimizerConfig",
    "ProbabilisticAdmission",
    "ReplicatedTableError",
    "ScoreEviction",
    "SparseOptimizer",
    "TTLEviction",
    "TableFullError",
    "TorchHashIndex",
    "UnknownIdError",
    "load_table",
    "save_table",
    "table_from_checkpoint",
]
