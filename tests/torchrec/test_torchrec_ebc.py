"""DynamicEmbeddingBagCollection against TorchRec's EmbeddingBagCollection (real torchrec).

Both modules hold the same rows (TorchRec's row ``i`` is written as id ``i`` of the dynamic
table), read the same KJT, and must give the same KeyedTensor and the same gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchrec")

from hypothesis import given, settings, strategies as st  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from gauss_integrations.torchrec import DynamicEmbeddingBagCollection  # noqa: E402
from gauss_plugins.embedding import SparseOptimizer  # noqa: E402

N = 50  # rows of every TorchRec table (ids drawn in [0, N))


def _configs(pooling=PoolingType.SUM):
    # t1 and t2 share feature f2 (outputs f2@t1, f2@t2); dims differ per table.
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=N, feature_names=["f1", "f2"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=N, feature_names=["f2", "f3"], pooling=PoolingType.SUM),
        EmbeddingBagConfig(name="t3", embedding_dim=5, num_embeddings=N, feature_names=["f4"], pooling=pooling),
    ]


def _pair(configs, weighted=False):
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(copy.deepcopy(configs), is_weighted=weighted)
    dyn = DynamicEmbeddingBagCollection(copy.deepcopy(configs), is_weighted=weighted)
    for name, bag in ref.embedding_bags.items():
        dyn.embedding_bags[name].set(torch.arange(N), bag.weight.detach())
    return ref, dyn


def _kjt(keys, batch, seed, weighted=False, max_len=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,), generator=g)
    values = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def _assert_same(out, expected):
    assert out.keys() == expected.keys()
    assert out.length_per_key() == expected.length_per_key()
    assert out.values().dtype == expected.values().dtype == torch.float32
    torch.testing.assert_close(out.values(), expected.values(), rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    pooling=st.sampled_from([PoolingType.SUM, PoolingType.MEAN]),
    order=st.permutations(["f1", "f2", "f3", "f4"]),
    train=st.booleans(),
)
def test_forward_matches_torchrec(batch, seed, pooling, order, train):
    ref, dyn = _pair(_configs(pooling))
    dyn.train(train)
    kjt = _kjt(list(order), batch, seed)  # KJT key order differs from table order
    _assert_same(dyn(kjt), ref(kjt))
    assert dyn.embedding_bags["t1"].version > 0  # the rows written by _pair


def test_weighted_forward_matches_torchrec():
    ref, dyn = _pair(_configs(), weighted=True)
    assert dyn.is_weighted()
    kjt = _kjt(["f1", "f2", "f3", "f4"], 5, seed=3, weighted=True)
    _assert_same(dyn(kjt), ref(kjt))


@pytest.mark.parametrize("weighted,pooling", [(False, PoolingType.SUM), (False, PoolingType.MEAN), (True, PoolingType.SUM)])
def test_gradients_match_torchrec(weighted, pooling):
    """One SGD step (lr=1) on the dynamic rows equals TorchRec's dense gradient, repeated
    ids and shared features included."""
    ref, dyn = _pair(_configs(pooling), weighted=weighted)
    kjt = _kjt(["f1", "f2", "f3", "f4"], 6, seed=7, weighted=weighted, max_len=6)
    target = torch.randn(6, 4 * 2 + 3 * 2 + 5, generator=torch.Generator().manual_seed(1))

    (ref(kjt).values() * target).sum().backward()
    opt = SparseOptimizer(dyn, "sgd", lr=1.0)
    (dyn(kjt).values() * target).sum().backward()
    opt.step()

    ids = torch.arange(N)
    for name, bag in ref.embedding_bags.items():
        expected = bag.weight.detach() - bag.weight.grad
        got, present = dyn.embedding_bags[name].get(ids)
        assert bool(present.all())
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_raw_ids_any_value_no_collisions():
    """Ids far outside num_embeddings, negatives and the int64 extremes each get their own
    row: no modulo, no collisions."""
    cfg = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=16, feature_names=["f"])]
    dyn = DynamicEmbeddingBagCollection(cfg)
    ids = torch.tensor([0, 1, 16, 17, -1, -16, 2**40, 2**40 + 16, 2**63 - 1, -(2**63)])
    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int64))
    out = dyn(kjt).values()
    table = dyn.embedding_bags["t"]
    assert len(table) == ids.numel()
    rows = table.find(ids)
    assert torch.unique(rows).numel() == ids.numel()
    assert torch.unique(out, dim=0).shape[0] == ids.numel()  # distinct vectors, not shared rows
    torch.testing.assert_close(out, table.get(ids)[0])


def test_eval_mode_reads_default_and_does_not_insert():
    cfg = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=16, feature_names=["f"])]
    dyn = DynamicEmbeddingBagCollection(cfg)
    dyn(KeyedJaggedTensor(keys=["f"], values=torch.tensor([5]), lengths=torch.tensor([1])))
    table = dyn.embedding_bags["t"]
    row5 = table.get(torch.tensor([5]))[0]
    dyn.eval()
    version = table.version
    out = dyn(KeyedJaggedTensor(keys=["f"], values=torch.tensor([5, 6, 7]), lengths=torch.tensor([1, 2]))).values()
    assert table.version == version and len(table) == 1
    torch.testing.assert_close(out[0], row5[0])
    torch.testing.assert_close(out[1], torch.zeros(4))  # absent ids read the zero default


def test_variable_batch_per_feature_matches_torchrec():
    """A variable-batch KJT (stride per key + inverse indices) is expanded as TorchRec does."""
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=3, num_embeddings=N, feature_names=[f"f{i}"]) for i in (1, 2)]
    ref, dyn = _pair(configs)
    kjt = KeyedJaggedTensor(
        keys=["f1", "f2"],
        values=torch.tensor([1, 2, 3, 4, 5, 6]),
        lengths=torch.tensor([1, 2, 1, 1, 1]),  # f1: 2 bags, f2: 3 bags
        stride_per_key_per_rank=[[2], [3]],
        inverse_indices=(["f1", "f2"], torch.tensor([[0, 1, 1, 0], [2, 1, 0, 2]])),
    )
    _assert_same(dyn(kjt), ref(kjt))


def test_torchrec_accessors():
    configs = _configs()
    dyn = DynamicEmbeddingBagCollection(configs, is_weighted=True)
    assert dyn.embedding_bag_configs() is configs
    assert dyn._embedding_bag_configs is configs
    assert dyn.is_weighted() and dyn.device == torch.device("cpu")
    assert dyn._embedding_names == ["f1", "f2@t1", "f2@t2", "f3", "f4"]
    assert dyn._lengths_per_embedding == [4, 4, 3, 3, 5]
    assert list(dyn.parameters()) == []  # dense optimizers never see the tables
    # A config without feature names reads the feature named after the table, as in TorchRec.
    solo = EmbeddingBagConfig(name="solo", embedding_dim=2, num_embeddings=4)
    assert DynamicEmbeddingBagCollection([solo])._embedding_names == ["solo"]


def test_config_mapping_and_options():
    from gauss_integrations.torchrec import table_config

    cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5000, weight_init_min=-0.5, weight_init_max=0.25)
    tc = table_config(cfg, torch.device("cpu"))
    assert (tc.dim, tc.max_capacity, tc.initial_capacity, tc.init_min, tc.init_max) == (4, 5000, 1024, -0.5, 0.25)
    tc = table_config(cfg, torch.device("cpu"), default_options={"eviction": "lru"}, options={"max_capacity": 100})
    assert tc.eviction == "lru" and tc.max_capacity == 100 and tc.initial_capacity == 100
    dyn = DynamicEmbeddingBagCollection([cfg], table_options={"t": {"optimizer": "adam", "dtype": "bf16"}})
    table = dyn.embedding_bags["t"]
    assert table.rule.name == "adam" and table.weight.dtype == torch.bfloat16
    # Seeds derive from table names: two tables do not start with the same row for an id.
    two = DynamicEmbeddingBagCollection(
        [EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=8, feature_names=[f"f{n}"]) for n in "ab"]
    )
    out = two(KeyedJaggedTensor(keys=["fa", "fb"], values=torch.tensor([3, 3]), lengths=torch.tensor([1, 1]))).values()
    assert not torch.equal(out[0, :4], out[0, 4:])


def test_int32_ids_and_offsets_only_kjt_match_torchrec():
    ref, dyn = _pair(_configs(PoolingType.MEAN))
    kjt = _kjt(["f1", "f2", "f3", "f4"], 4, seed=5)
    as_int32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
    offsets_only = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), offsets=kjt.offsets())
    assert offsets_only.lengths_or_none() is None
    expected = ref(kjt)
    _assert_same(dyn(as_int32), expected)
    _assert_same(dyn(offsets_only), expected)


def test_empty_batch():
    _, dyn = _pair(_configs(), weighted=True)
    empty = torch.empty(0, dtype=torch.int64)
    out = dyn(KeyedJaggedTensor(keys=["f1", "f2", "f3", "f4"], values=empty, lengths=empty, weights=torch.empty(0)))
    assert out.values().shape == (0, 19) and out.length_per_key() == [4, 4, 3, 3, 5]


def test_storage_dtype_and_whole_config_options():
    from torchrec.modules.embedding_configs import DataType

    from gauss_plugins.embedding import DynamicTableConfig

    half = EmbeddingBagConfig(name="h", embedding_dim=4, num_embeddings=8, feature_names=["f"], data_type=DataType.FP16)
    dyn = DynamicEmbeddingBagCollection([half])
    out = dyn(KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([2])))
    assert dyn.embedding_bags["h"].weight.dtype == torch.float16 and out.values().dtype == torch.float32
    # A whole DynamicTableConfig decides every field but name/dim/device.
    whole = DynamicTableConfig(name="ignored", dim=4, max_capacity=77, initial_capacity=7, initializer="zeros", optimizer="sgd")
    dyn = DynamicEmbeddingBagCollection([half], table_options={"h": whole})
    table = dyn.embedding_bags["h"]
    assert (table.name, table.config.max_capacity, table.capacity, table.weight.dtype) == ("h", 77, 7, torch.float32)
    with pytest.raises(ValueError, match="dim 8 but the TorchRec config says embedding_dim 4"):
        DynamicEmbeddingBagCollection([half], table_options={"h": DynamicTableConfig(name="x", dim=8)})
