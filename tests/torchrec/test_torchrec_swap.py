"""swap_dynamic_embeddings on real TorchRec models (DLRM) and a training loop end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchrec")

from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from gauss_integrations.torchrec import (  # noqa: E402
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    dynamic_tables,
    swap_dynamic_embeddings,
)
from gauss_plugins.embedding import SparseOptimizer  # noqa: E402

D = 8
FEATURES = ["user", "item", "cat"]


def _dlrm(seed=0):
    torch.manual_seed(seed)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=D, num_embeddings=1000, feature_names=[f]) for f in FEATURES
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables),
        dense_in_features=4,
        dense_arch_layer_sizes=[16, D],
        over_arch_layer_sizes=[16, 1],
    )


def _batch(n, seed, id_space=64):
    """Random multi-hot KJT with raw ids spread over a huge range (not row numbers)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (len(FEATURES) * n,), generator=g)
    codes = torch.randint(0, id_space, (int(lengths.sum()),), generator=g)
    values = codes * 1_000_003_017 - 2**40  # ids far outside num_embeddings, negatives included
    kjt = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=lengths)
    dense = torch.randn(n, 4, generator=g)
    return dense, kjt, codes, lengths


def test_dlrm_swap_forward_shapes():
    ref = _dlrm()
    model = swap_dynamic_embeddings(_dlrm())
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, DynamicEmbeddingBagCollection)
    assert [c.name for c in ebc.embedding_bag_configs()] == ["t_user", "t_item", "t_cat"]
    assert not any(isinstance(m, EmbeddingBagCollection) for m in model.modules())
    dense, kjt, _, _ = _batch(5, seed=0)
    ids = kjt.values() % 1000  # TorchRec's static tables need row numbers
    ref_kjt = KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=kjt.lengths())
    assert model(dense, kjt).shape == ref(dense, ref_kjt).shape == (5, 1)
    # Dense parameters are untouched by the swap; the tables bring none.
    ref_dense = {n for n, _ in ref.named_parameters() if "embedding_bags" not in n}
    assert {n for n, _ in model.named_parameters()} == ref_dense


def test_dlrm_training_loop_reduces_loss():
    """Labels depend only on the sparse ids (dense features are noise), so the loss can
    only fall if the fused sparse optimizer trains the dynamic rows."""
    model = swap_dynamic_embeddings(_dlrm(), default_options={"optimizer": {"name": "rowwise_adagrad", "lr": 0.1}})
    dense_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparse_opt = SparseOptimizer(model)  # each table's configured optimizer
    label_of_code = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(9)).float()
    dense, kjt, codes, lengths = _batch(256, seed=1)
    user_codes = codes[: int(lengths[:256].sum())]
    first_user_code = user_codes[torch.ops.fbgemm.asynchronous_complete_cumsum(lengths[:256])[:-1]]
    labels = label_of_code[first_user_code]

    losses = []
    for _ in range(30):
        logits = model(dense, kjt).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        sparse_opt.step()
        losses.append(loss.item())
    # Measured: ~0.69 -> ~0.003 in 30 steps; without sparse_opt.step() (fixed random rows,
    # dense layers only) it stays above 0.6, so this fails if the tables do not train.
    assert losses[0] > 0.6 and losses[-1] < 0.1, losses[::5]
    tables = dynamic_tables(model)
    assert sorted(tables) == [f"sparse_arch.embedding_bag_collection.embedding_bags.t_{f}" for f in ("cat", "item", "user")]
    assert all(0 < len(t) <= 64 for t in tables.values())


def test_swapped_model_state_dict_round_trip():
    model = swap_dynamic_embeddings(_dlrm())
    dense, kjt, _, _ = _batch(8, seed=2)
    model(dense, kjt)  # creates rows
    model.eval()
    expected = model(dense, kjt)
    fresh = swap_dynamic_embeddings(_dlrm(seed=1)).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(dense, kjt), expected, rtol=0, atol=0)


class _TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        shared = EmbeddingBagCollection([EmbeddingBagConfig(name="ub", embedding_dim=4, num_embeddings=10, feature_names=["u"])])
        self.user = shared
        self.user_again = shared  # one module at two places
        self.seq = nn.Sequential(
            EmbeddingCollection([EmbeddingConfig(name="hist", embedding_dim=4, num_embeddings=10, feature_names=["h"])], need_indices=True)
        )


def test_swap_nested_shared_and_root():
    model = _TwoTower().eval()
    assert swap_dynamic_embeddings(model) is model
    assert isinstance(model.user, DynamicEmbeddingBagCollection) and model.user is model.user_again
    assert isinstance(model.seq[0], DynamicEmbeddingCollection) and model.seq[0].need_indices()
    assert not model.user.training  # the train/eval mode is kept
    root = EmbeddingBagCollection([EmbeddingBagConfig(name="r", embedding_dim=4, num_embeddings=10)], is_weighted=True)
    twin = swap_dynamic_embeddings(root)
    assert isinstance(twin, DynamicEmbeddingBagCollection) and twin.is_weighted()


def test_swap_options_and_errors_leave_model_untouched():
    model = _dlrm()
    with pytest.raises(ValueError, match=r"table_options name table\(s\) \['t_nope'\]"):
        swap_dynamic_embeddings(model, table_options={"t_nope": {"max_capacity": 5}})
    with pytest.raises(ValueError, match="unknown table option"):
        swap_dynamic_embeddings(model, table_options={"t_user": {"bogus": 1}})
    assert type(model.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection

    swap_dynamic_embeddings(model, table_options={"t_user": {"max_capacity": 5000, "eviction": "lru"}})
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    assert tables["t_user"].config.max_capacity == 5000 and tables["t_user"].eviction is not None
    assert tables["t_item"].config.max_capacity == 1000 and tables["t_item"].eviction is None

    clash = nn.ModuleDict({
        "a": EmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=4, feature_names=["x"])]),
        "b": EmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=4, feature_names=["y"])]),
    })
    with pytest.raises(ValueError, match="used by two collections"):
        swap_dynamic_embeddings(clash)
    assert all(type(m) is EmbeddingBagCollection for m in clash.values())


def test_copy_weights_keeps_the_model_function():
    """With copy_weights, ids that are row numbers read the trained static rows: the swapped
    DLRM computes exactly what the original did, in train and eval mode."""
    ref = _dlrm()
    model = swap_dynamic_embeddings(_dlrm(), copy_weights=True)
    dense, kjt, _, _ = _batch(6, seed=3)
    kjt = KeyedJaggedTensor(keys=FEATURES, values=kjt.values().abs() % 1000, lengths=kjt.lengths())
    torch.testing.assert_close(model(dense, kjt), ref(dense, kjt), rtol=1e-6, atol=1e-6)
    model.eval(), ref.eval()
    torch.testing.assert_close(model(dense, kjt), ref(dense, kjt), rtol=1e-6, atol=1e-6)
    assert all(len(t) == 1000 for t in dynamic_tables(model).values())
    with pytest.raises(ValueError, match="copy_weights: table 't_user' has 1000 rows"):
        swap_dynamic_embeddings(_dlrm(), copy_weights=True, table_options={"t_user": {"max_capacity": 10}})
