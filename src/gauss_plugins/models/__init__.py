"""Sequential retrieval models: the HSTU paper's generative retrieval model and a SASRec
baseline in the same harness, plus the paper's full-corpus evaluation metrics.

* :class:`SequentialRetrievalModel`: item embeddings (dynamic table by default) -> encoder
  (HSTU or SASRec) -> L2-normalised outputs; sampled-softmax training.
* :mod:`.metrics`: HR@K / NDCG@K over the full corpus minus the user's history.
"""
from gauss_plugins.models.builder import build_encoder, build_model
from gauss_plugins.models.item_embeddings import (
    DynamicItemEmbeddings,
    ItemEmbeddings,
    StaticItemEmbeddings,
    build_item_embeddings,
)
from gauss_plugins.models.metrics import DEFAULT_KS, RetrievalMetrics, metrics_from_ranks, target_ranks
from gauss_plugins.models.retrieval import SequentialRetrievalModel
from gauss_plugins.models.sasrec import SASRecConfig, SASRecEncoder

__all__ = [
    "DEFAULT_KS",
    "DynamicItemEmbeddings",
    "ItemEmbeddings",
    "RetrievalMetrics",
    "SASRecConfig",
    "SASRecEncoder",
    "SequentialRetrievalModel",
    "StaticItemEmbeddings",
    "build_encoder",
    "build_item_embeddings",
    "build_model",
    "metrics_from_ranks",
    "target_ranks",
]
