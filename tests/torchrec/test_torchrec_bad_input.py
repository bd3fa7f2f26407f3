"""Malformed batches and bad options: a clear error, and the tables stay exactly as they were."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchrec")

from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from gauss_plugins.embedding import TableFullError  # noqa: E402
from gauss_integrations.torchrec import (  # noqa: E402
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    InvalidFeaturesError,
)


def _ebc(weighted=False):
    ebc = DynamicEmbeddingBagCollection(
        [
            EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=64, feature_names=["f1", "f2"]),
            EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=64, feature_names=["f3"]),
        ],
        is_weighted=weighted,
    )
    # Some rows already there, so "unchanged" covers existing rows as well as insertions.
    w = torch.ones(3) if weighted else None
    ebc(KeyedJaggedTensor(keys=["f1", "f2", "f3"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1]), weights=w))
    return ebc


def _ec():
    ec = DynamicEmbeddingCollection([EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=64, feature_names=["f1", "f2"])])
    ec(KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])))
    return ec


def _snapshot(module):
    return {
        name: (t.version, len(t), t.step_count, t.weight.clone(), t.has_pending_grads)
        for name, t in module.named_modules() if hasattr(t, "changed_since")
    }


def _assert_unchanged(module, before):
    after = _snapshot(module)
    assert after.keys() == before.keys()
    for name, (version, n, step, weight, pending) in before.items():
        v2, n2, s2, w2, p2 = after[name]
        assert (v2, n2, s2, p2) == (version, n, step, pending), name
        assert torch.equal(w2, weight), name


KEYS = ["f1", "f2", "f3"]
BAD_BATCHES = {
    "lengths sum above values": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12]), lengths=torch.tensor([1, 2, 1])), InvalidFeaturesError, "lengths sum to 4 but there are 3 values"),
    "lengths sum below values": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12, 13]), lengths=torch.tensor([1, 1, 1])), InvalidFeaturesError, "lengths sum to 3"),
    "negative length": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12]), lengths=torch.tensor([2, -1, 2])), InvalidFeaturesError, "negative"),
    "offsets past the values": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12]), offsets=torch.tensor([0, 1, 2, 5])), InvalidFeaturesError, "offsets end at 5"),
    "offsets not from zero": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12]), offsets=torch.tensor([1, 1, 2, 3])), InvalidFeaturesError, "start at 0"),
    "bags do not match keys x stride": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12, 13]), lengths=torch.tensor([1, 1, 1, 1]), stride=2), InvalidFeaturesError, "bags"),
    "float ids": (
        dict(keys=KEYS, values=torch.tensor([10.0, 11.0, 12.0]), lengths=torch.tensor([1, 1, 1])), TypeError, "int64"),
    "wrong device": (
        dict(keys=KEYS, values=torch.tensor([10, 11, 12], device="meta"), lengths=torch.tensor([1, 1, 1], device="meta")), InvalidFeaturesError, "are on meta but the tables are on cpu"),
    "missing feature": (
        dict(keys=["f1", "f3"], values=torch.tensor([10, 11]), lengths=torch.tensor([1, 1])), InvalidFeaturesError, r"lacks feature\(s\) \['f2'\]"),
    "unknown feature": (
        dict(keys=KEYS + ["f9"], values=torch.tensor([10, 11, 12, 13]), lengths=torch.tensor([1, 1, 1, 1])), InvalidFeaturesError, r"\['f9'\] that no table reads"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batch_raises_and_changes_nothing(case):
    kwargs, error, message = BAD_BATCHES[case]
    ebc = _ebc()
    before = _snapshot(ebc)
    with pytest.raises(error, match=message):
        ebc(KeyedJaggedTensor(**kwargs))
    _assert_unchanged(ebc, before)
    # The module still works afterwards.
    ebc(KeyedJaggedTensor(keys=KEYS, values=torch.tensor([4, 5, 6]), lengths=torch.tensor([1, 1, 1])))


@pytest.mark.parametrize(
    "weights,message",
    [(None, "has no weights"), (torch.tensor([1.0, float("nan"), 1.0]), "NaN"), (torch.tensor([1.0, 1.0]), "one weight per id")],
)
def test_bad_weights_raise_and_change_nothing(weights, message):
    ebc = _ebc(weighted=True)
    before = _snapshot(ebc)
    with pytest.raises(InvalidFeaturesError, match=message):
        ebc(KeyedJaggedTensor(keys=KEYS, values=torch.tensor([7, 8, 9]), lengths=torch.tensor([1, 1, 1]), weights=weights))
    _assert_unchanged(ebc, before)


def test_ec_bad_batch_changes_nothing():
    ec = _ec()
    before = _snapshot(ec)
    with pytest.raises(InvalidFeaturesError, match="lengths sum"):
        ec(KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([5, 6, 7]), lengths=torch.tensor([1, 1])))
    with pytest.raises(TypeError, match="int64"):
        ec(KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([5.0, 6.0]), lengths=torch.tensor([1, 1])))
    _assert_unchanged(ec, before)


def test_unknown_features_allowed_when_asked():
    ebc = DynamicEmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8, feature_names=["f"])], allow_unknown_features=True
    )
    out = ebc(KeyedJaggedTensor(keys=["other", "f"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])))
    assert out.keys() == ["f"] and len(ebc.embedding_bags["t"]) == 1


def test_bad_configs_and_options():
    cfg = lambda **kw: EmbeddingBagConfig(**{"name": "t", "embedding_dim": 4, "num_embeddings": 8, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="Duplicate table name t"):
        DynamicEmbeddingBagCollection([cfg(), cfg()])
    with pytest.raises(ValueError, match="SUM or MEAN"):
        DynamicEmbeddingBagCollection([cfg(pooling=PoolingType.NONE)])
    with pytest.raises(ValueError, match="needs SUM pooling"):
        DynamicEmbeddingBagCollection([cfg(pooling=PoolingType.MEAN)], is_weighted=True)
    with pytest.raises(ValueError, match=r"not in this collection"):
        DynamicEmbeddingBagCollection([cfg()], table_options={"nope": {}})
    with pytest.raises(ValueError, match=r"unknown table option\(s\) \['capacity'\]"):
        DynamicEmbeddingBagCollection([cfg()], table_options={"t": {"capacity": 10}})
    with pytest.raises(ValueError, match="come from the TorchRec config"):
        DynamicEmbeddingBagCollection([cfg()], default_options={"dim": 8})
    with pytest.raises(TypeError, match="EmbeddingBagConfig"):
        DynamicEmbeddingBagCollection([EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=8)])
    # A custom init_fn cannot be mirrored per id: refused unless an initializer is chosen.
    custom = cfg(init_fn=lambda w: torch.nn.init.normal_(w, std=0.1))
    with pytest.raises(ValueError, match="custom init_fn"):
        DynamicEmbeddingBagCollection([custom])
    ebc = DynamicEmbeddingBagCollection([custom], table_options={"t": {"initializer": "normal", "init_std": 0.1}})
    assert ebc.embedding_bags["t"].config.initializer == "normal"


@pytest.mark.parametrize("collection", ["ebc", "ec"])
def test_full_second_table_changes_no_table(collection):
    """Tables are looked up one after another; a batch the second table cannot take must
    fail before the first one inserts anything."""
    if collection == "ebc":
        module = DynamicEmbeddingBagCollection([
            EmbeddingBagConfig(name="big", embedding_dim=4, num_embeddings=100, feature_names=["a"]),
            EmbeddingBagConfig(name="small", embedding_dim=4, num_embeddings=3, feature_names=["b"]),
        ])
    else:
        module = DynamicEmbeddingCollection([
            EmbeddingConfig(name="big", embedding_dim=4, num_embeddings=100, feature_names=["a"]),
            EmbeddingConfig(name="small", embedding_dim=4, num_embeddings=3, feature_names=["b"]),
        ])
    module(KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 7, 7]), lengths=torch.tensor([2, 2])))
    before = _snapshot(module)
    with pytest.raises(TableFullError, match="'small' is full: 1 rows of max_capacity 3, and this batch brings 3 new ids"):
        module(KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([5, 6, 7, 8, 9, 10]), lengths=torch.tensor([2, 4])))
    _assert_unchanged(module, before)
    # Two new ids still fit, with an id already present in the batch.
    module(KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([5, 7, 8, 9]), lengths=torch.tensor([1, 3])))
    small = module.get_submodule("embedding_bags.small" if collection == "ebc" else "embeddings.small")
    assert len(small) == 3
