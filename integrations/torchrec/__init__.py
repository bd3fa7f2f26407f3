"""TorchRec backend of dynamic embeddings (needs the ``torchrec`` extra).

* :class:`DynamicEmbeddingBagCollection` / :class:`DynamicEmbeddingCollection`: TorchRec's
  ``EmbeddingBagCollection`` / ``EmbeddingCollection`` interface (same configs, same
  ``KeyedJaggedTensor`` in, same ``KeyedTensor`` / ``Dict[str, JaggedTensor]`` out) over
  :class:`gauss_plugins.embedding.DynamicEmbeddingTable` storage.
* :func:`swap_dynamic_embeddings`: swap every TorchRec collection of a model in one call;
  :func:`dynamic_tables` lists the tables (for checkpoints and the sparse optimizer).

Training: a dense optimizer for ``model.parameters()`` (the tables hold no Parameters) and
:class:`gauss_plugins.embedding.SparseOptimizer` for the tables::

    model = swap_dynamic_embeddings(DLRM(...), default_options={"eviction": "lru"})
    dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sparse_opt = SparseOptimizer(model, "rowwise_adagrad", lr=0.05)

Limits today: one process. The tables are not synchronised across ranks, so a training
lookup under a process group of world size > 1 (DDP, ``DistributedModelParallel``, which
does not shard these collections) raises
:class:`gauss_plugins.embedding.ReplicatedTableError` before any row changes. Eval mode never
inserts rows: an id never seen in training reads zeros unless the table option
``eval_unknown`` is ``"init"`` (the id's initial row) or ``"error"``.
"""
from gauss_plugins._optional import require

require("torchrec", "torchrec", "gauss_integrations.torchrec")

from gauss_integrations.torchrec.inputs import InvalidFeaturesError  # noqa: E402
from gauss_integrations.torchrec.modules import DynamicEmbeddingBagCollection, DynamicEmbeddingCollection  # noqa: E402
from gauss_integrations.torchrec.swap import dynamic_tables, swap_dynamic_embeddings  # noqa: E402
from gauss_integrations.torchrec.tables import TableOptions, table_config  # noqa: E402

__all__ = [
    "DynamicEmbeddingBagCollection",
    "DynamicEmbeddingCollection",
    "InvalidFeaturesError",
    "TableOptions",
    "dynamic_tables",
    "swap_dynamic_embeddings",
    "table_config",
]
