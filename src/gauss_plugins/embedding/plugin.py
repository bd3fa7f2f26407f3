"""Built-in components of dynamic embedding tables, registered through the same hooks as
third-party ones: the pure-torch hash index, admission and eviction policies, and the
sparse optimizers. Factories are import paths: listing them imports nothing heavy."""
from __future__ import annotations

from gauss_plugins.components import Component
from gauss_plugins.plugins import hookimpl

_EMB = "gauss_plugins.embedding"


@hookimpl
def gauss_register_table_backends():
    return [
        Component(
            kind="table_backend",
            name="torch",
            factory=f"{_EMB}.index:TorchHashIndex",
            description="open-addressing hash index as vectorized torch ops (CPU or CUDA; the reference)",
            priority=0,
        ),
    ]


@hookimpl
def gauss_register_admission_policies():
    return [
        Component(kind="admission_policy", name="always", factory=f"{_EMB}.policies:AlwaysAdmit",
                  description="every new id gets a row on first sight"),
        Component(kind="admission_policy", name="counting", factory=f"{_EMB}.policies:CountingAdmission",
                  description="a row after min_count sightings (count-min sketch, bounded memory)"),
        Component(kind="admission_policy", name="probability", factory=f"{_EMB}.policies:ProbabilisticAdmission",
                  description="each sighting admitted with probability p (deterministic hash of seed, id, round)"),
    ]


@hookimpl
def gauss_register_eviction_policies():
    return [
        Component(kind="eviction_policy", name="lru", factory=f"{_EMB}.policies:LRUEviction",
                  description="evict the least recently used rows"),
        Component(kind="eviction_policy", name="lfu", factory=f"{_EMB}.policies:LFUEviction",
                  description="evict the least frequently used rows"),
        Component(kind="eviction_policy", name="ttl", factory=f"{_EMB}.policies:TTLEviction",
                  description="rows unused for ttl steps or seconds expire"),
        Component(kind="eviction_policy", name="score", factory=f"{_EMB}.policies:ScoreEviction",
                  description="custom score_fn(ids, rows, table); lowest evicted first"),
    ]


@hookimpl
def gauss_register_sparse_optimizers():
    return [
        Component(kind="sparse_optimizer", name="sgd", factory=f"{_EMB}.sparse_rules:create_sgd",
                  description="fused sparse SGD"),
        Component(kind="sparse_optimizer", name="adagrad", factory=f"{_EMB}.sparse_rules:create_adagrad",
                  description="fused sparse Adagrad, D accumulators a row"),
        Component(kind="sparse_optimizer", name="rowwise_adagrad", factory=f"{_EMB}.sparse_rules:create_rowwise_adagrad",
                  description="fused row-wise Adagrad (FBGEMM EXACT_ROWWISE_ADAGRAD), one accumulator a row"),
        Component(kind="sparse_optimizer", name="adam", factory=f"{_EMB}.sparse_rules:create_adam",
                  description="fused lazy Adam with per-row step counts"),
    ]
