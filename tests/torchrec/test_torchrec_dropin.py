"""TorchRec drop-in behaviours checked against TorchRec's own modules on the same KJTs:
per-sample weight gradients (FeatureProcessedEmbeddingBagCollection's position weights),
all-empty batches, copy_weights headroom, eval reads of unseen ids, and uint64 ids.

Every test runs on both table backends: ``torch`` (the CUDA path and machines without a
compiler) and ``cpu_ext`` (the compiled CPU index).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchrec")

from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.modules.feature_processor_ import PositionWeightedModule, PositionWeightedModuleCollection  # noqa: E402
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from gauss_integrations.torchrec import DynamicEmbeddingBagCollection, dynamic_tables, swap_dynamic_embeddings  # noqa: E402
from gauss_plugins.embedding import SparseOptimizer, TableFullError, UnknownIdError  # noqa: E402

N = 40        # rows of every TorchRec table
MAX_LEN = 5   # position weights per feature
FEATURES = ["f1", "f2", "f3"]


@pytest.fixture(params=["torch", "cpu_ext"])
def backend(request) -> str:
    if request.param == "cpu_ext":
        from gauss_kernels.hash_table import cpu_ext

        if not cpu_ext.available():
            pytest.skip(f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}")
    return request.param


def _configs():
    # t1 serves two features, t2 one; dims differ.
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=N, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=N, feature_names=["f3"]),
    ]


def _fp_ebc(collection: bool) -> FeatureProcessedEmbeddingBagCollection:
    """TorchRec's FP-EBC with position weights that are not all 1 (so their gradient matters)."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(_configs(), is_weighted=True)
    if collection:
        processors = PositionWeightedModuleCollection({f: MAX_LEN for f in FEATURES})
    else:
        processors = {f: PositionWeightedModule(MAX_LEN) for f in FEATURES}
    fp = FeatureProcessedEmbeddingBagCollection(ebc, processors)
    with torch.no_grad():
        for name, p in fp.named_parameters():
            if "position_weight" in name:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    return fp


def _kjt(batch: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, MAX_LEN + 1, (len(FEATURES) * batch,), generator=g)
    values = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=FEATURES, values=values, lengths=lengths)


def _position_weights(module: nn.Module):
    return {n: p for n, p in module.named_parameters() if "position_weight" in n}


@pytest.mark.parametrize("collection", [True, False], ids=["PositionWeightedModuleCollection", "PositionWeightedModule"])
def test_fp_ebc_position_weights_train_as_in_torchrec(backend, collection):
    """Swapped FP-EBC: same outputs, same gradients of the position weights (dense params)
    and of the embedding rows, and after several steps of training both the same weights."""
    ref = _fp_ebc(collection)
    dyn = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True, default_options={"backend": backend})
    assert isinstance(dyn._embedding_bag_collection, DynamicEmbeddingBagCollection)
    assert _position_weights(ref) and set(_position_weights(dyn)) == set(_position_weights(ref))
    ref_dense = torch.optim.SGD(ref.parameters(), lr=0.1)
    dyn_dense = torch.optim.SGD(dyn.parameters(), lr=0.1)  # the position weights only: tables hold none
    sparse = SparseOptimizer(dyn, "sgd", lr=0.1)
    target = torch.randn(6, 4 * 2 + 3, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        kjt = _kjt(6, seed=10 + step)
        out_ref, out_dyn = ref(kjt), dyn(kjt)
        torch.testing.assert_close(out_dyn.values(), out_ref.values(), rtol=1e-5, atol=1e-6)
        ((out_ref.values() - target) ** 2).sum().backward()
        ((out_dyn.values() - target) ** 2).sum().backward()
        grads_ref = {n: p.grad.clone() for n, p in _position_weights(ref).items()}
        for name, p in _position_weights(dyn).items():
            assert p.grad is not None, f"{name} got no gradient after the swap"
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-5, atol=1e-5)
        ref_dense.step(); dyn_dense.step(); sparse.step()
        ref_dense.zero_grad(); dyn_dense.zero_grad(); sparse.zero_grad()
    for name, p in _position_weights(dyn).items():
        torch.testing.assert_close(p.detach(), _position_weights(ref)[name].detach(), rtol=1e-5, atol=1e-5)
    ids = torch.arange(N)
    for name, bag in ref._embedding_bag_collection.embedding_bags.items():
        got, present = dyn._embedding_bag_collection.embedding_bags[name].get(ids)
        assert bool(present.all())
        torch.testing.assert_close(got, bag.weight.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_kjt_weight_gradients_match_torchrec(backend, train):
    """A weighted EBC differentiates its KJT weights, in train and in eval mode."""
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(_configs(), is_weighted=True)
    dyn = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True, default_options={"backend": backend})
    ref.train(train), dyn.train(train)
    kjt = _kjt(5, seed=3)
    w = torch.rand(kjt.values().numel(), generator=torch.Generator().manual_seed(2))
    grads = []
    for module in (ref, dyn):
        weights = w.clone().requires_grad_()
        out = module(KeyedJaggedTensor(keys=FEATURES, values=kjt.values(), lengths=kjt.lengths(), weights=weights))
        (out.values() * torch.arange(out.values().numel()).view(out.values().shape)).sum().backward()
        grads.append(weights.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_batch_with_every_bag_of_a_table_empty_steps_to_a_zero_gradient(backend, optimizer):
    """TorchRec gives the rows of a table whose bags are all empty a zero gradient; the
    sparse step must not fail and must leave that table's rows and state unchanged."""
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(_configs())
    dyn = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True, default_options={"backend": backend})
    sparse = SparseOptimizer(dyn, optimizer, lr=0.1)
    t1, t2 = dyn.embedding_bags["t1"], dyn.embedding_bags["t2"]
    # f1 and f2 (table t1) have only empty bags; f3 (table t2) has ids.
    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([3, 4, 4]), lengths=torch.tensor([0, 0, 0, 0, 2, 1]))
    (ref(kjt).values() ** 2).sum().backward()
    assert ref.embedding_bags["t1"].weight.grad is None or not ref.embedding_bags["t1"].weight.grad.any()
    before = {k: v.clone() for k, v in t1.export_state()[0].items()}
    (dyn(kjt).values() ** 2).sum().backward()
    sparse.step()
    after = t1.export_state()[0]
    for key in before:
        if key.startswith(("weight", "opt.")):
            assert torch.equal(after[key], before[key]), key
    assert not t1.has_pending_grads and not t2.has_pending_grads
    # The other table was trained: its rows 3 and 4 moved.
    assert not torch.equal(t2.get(torch.tensor([3, 4]))[0], ref.embedding_bags["t2"].weight.detach()[3:5])
    # A batch where every bag of every table is empty (batch of zero ids) steps too.
    empty = KeyedJaggedTensor(keys=FEATURES, values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(6, dtype=torch.int64))
    (dyn(empty).values() ** 2).sum().backward()
    sparse.step()


def test_copy_weights_leaves_headroom_for_unseen_ids(backend):
    """A copied table is num_embeddings rows full; unseen ids must still get rows (it grows),
    up to copy_headroom * num_embeddings unless the options say otherwise."""
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(_configs())
    dyn = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True, default_options={"backend": backend})
    t1 = dyn.embedding_bags["t1"]
    assert len(t1) == N and t1.config.max_capacity == 2 * N
    unseen = torch.tensor([N, N + 1, 10**12, -5])
    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.cat([unseen, torch.tensor([1])]),
                            lengths=torch.tensor([2, 2, 0, 0, 1, 0]))
    dyn(kjt)
    assert len(t1) == N + 4 and bool(t1.contains(unseen).all())
    # Explicit bounds are kept: max_capacity from the options, or no headroom at all.
    bounded = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True,
                                      default_options={"backend": backend}, table_options={"t1": {"max_capacity": N}})
    assert bounded.embedding_bags["t1"].config.max_capacity == N
    assert bounded.embedding_bags["t2"].config.max_capacity == 2 * N
    with pytest.raises(TableFullError, match="No table was changed"):
        bounded(kjt)
    assert len(bounded.embedding_bags["t1"]) == N and len(bounded.embedding_bags["t2"]) == N
    tight = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True, copy_headroom=1.0)
    assert all(t.config.max_capacity == N for t in dynamic_tables(tight).values())
    for bad in (0.5, "2", True, float("nan")):
        model = copy.deepcopy(ref)
        with pytest.raises(ValueError, match="copy_headroom"):
            swap_dynamic_embeddings(model, copy_weights=True, copy_headroom=bad)
        assert type(model) is EmbeddingBagCollection  # nothing swapped
    model = copy.deepcopy(ref)
    with pytest.raises(TypeError, match="copy_weights must be True or False"):
        swap_dynamic_embeddings(model, copy_weights="yes")
    assert type(model) is EmbeddingBagCollection


@pytest.mark.parametrize("policy", ["default", "init", "error"])
def test_eval_reads_of_unseen_ids_follow_eval_unknown(backend, policy):
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(_configs())
    dyn = swap_dynamic_embeddings(copy.deepcopy(ref), copy_weights=True,
                                  default_options={"backend": backend, "eval_unknown": policy})
    dyn.eval()
    t1 = dyn.embedding_bags["t1"]
    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([1, 99, 2, 5]), lengths=torch.tensor([2, 0, 1, 0, 1, 0]))
    version = t1.version
    if policy == "error":
        with pytest.raises(UnknownIdError, match=r"'t1' \(eval mode\) has no row for 1 id\(s\), e.g. \[99\]"):
            dyn(kjt)
        assert t1.version == version and len(t1) == N
        return
    out = dyn(kjt).to_dict()
    assert t1.version == version and len(t1) == N  # eval never inserts
    row1 = ref.embedding_bags["t1"].weight.detach()[1]
    if policy == "default":
        torch.testing.assert_close(out["f1"][0], row1)  # the unseen id 99 read zeros
    else:
        dyn.train()
        dyn(KeyedJaggedTensor(keys=FEATURES, values=torch.tensor([99]), lengths=torch.tensor([1, 0, 0, 0, 0, 0])))
        inserted = t1.get(torch.tensor([99]))[0][0]
        torch.testing.assert_close(out["f1"][0], row1 + inserted, rtol=0, atol=1e-7)


def test_uint64_float_and_bool_ids_are_rejected_and_change_nothing(backend):
    dyn = DynamicEmbeddingBagCollection(_configs(), table_options={"t1": {"backend": backend}, "t2": {"backend": backend}})
    tables = list(dynamic_tables(dyn).values())
    for values in (torch.tensor([2**64 - 1, 1, 2], dtype=torch.uint64), torch.tensor([1.0, 2.0, 3.0]),
                   torch.tensor([True, False, True])):
        kjt = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=torch.tensor([1, 1, 1, 0, 0, 0]))
        with pytest.raises(TypeError, match="ids must be an int64"):
            dyn(kjt)
        assert all(len(t) == 0 and t.version == 0 for t in tables)
