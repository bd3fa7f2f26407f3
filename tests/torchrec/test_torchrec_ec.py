"""DynamicEmbeddingCollection against TorchRec's EmbeddingCollection (real torchrec)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchrec")

from hypothesis import given, settings, strategies as st  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from gauss_integrations.torchrec import DynamicEmbeddingCollection  # noqa: E402
from gauss_plugins.embedding import SparseOptimizer  # noqa: E402

N, D = 40, 4


def _configs():
    return [
        EmbeddingConfig(name="t1", embedding_dim=D, num_embeddings=N, feature_names=["f1", "f2"]),
        EmbeddingConfig(name="t2", embedding_dim=D, num_embeddings=N, feature_names=["f2", "f3"]),
    ]


def _pair(need_indices=False):
    torch.manual_seed(0)
    ref = EmbeddingCollection(copy.deepcopy(_configs()), need_indices=need_indices)
    dyn = DynamicEmbeddingCollection(copy.deepcopy(_configs()), need_indices=need_indices)
    for name, emb in ref.embeddings.items():
        dyn.embeddings[name].set(torch.arange(N), emb.weight.detach())
    return ref, dyn


def _kjt(keys, batch, seed, max_len=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,), generator=g)
    values = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


def _assert_same(out, expected):
    assert list(out) == list(expected)  # same names, same order
    for name in expected:
        torch.testing.assert_close(out[name].values(), expected[name].values(), rtol=0, atol=0)
        assert torch.equal(out[name].lengths(), expected[name].lengths())
        e_w, o_w = expected[name].weights_or_none(), out[name].weights_or_none()
        assert (e_w is None) == (o_w is None)
        if e_w is not None:
            assert torch.equal(o_w, e_w)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), need_indices=st.booleans(),
       order=st.permutations(["f1", "f2", "f3"]))
def test_forward_matches_torchrec(batch, seed, need_indices, order):
    ref, dyn = _pair(need_indices)
    kjt = _kjt(list(order), batch, seed)
    out = dyn(kjt)
    _assert_same(out, ref(kjt))
    assert list(out) == ["f1", "f2@t1", "f2@t2", "f3"]


def test_gradients_match_torchrec():
    ref, dyn = _pair()
    kjt = _kjt(["f1", "f2", "f3"], 5, seed=11, max_len=6)

    def loss(out):
        torch.manual_seed(5)  # same random projection for both modules
        return sum((jt.values() * torch.randn(jt.values().shape)).sum() for jt in out.values())

    loss(ref(kjt)).backward()
    opt = SparseOptimizer(dyn, "sgd", lr=1.0)
    loss(dyn(kjt)).backward()
    opt.step()
    for name, emb in ref.embeddings.items():
        got, present = dyn.embeddings[name].get(torch.arange(N))
        assert bool(present.all())
        torch.testing.assert_close(got, emb.weight.detach() - emb.weight.grad, rtol=1e-6, atol=1e-6)


def test_accessors_and_dim_check():
    configs = _configs()
    dyn = DynamicEmbeddingCollection(configs, need_indices=True)
    assert dyn.embedding_configs() is configs and dyn._embedding_configs is configs
    assert dyn.embedding_dim() == D and dyn.need_indices()
    assert dyn.embedding_names_by_table() == [["f1", "f2@t1"], ["f2@t2", "f3"]]
    with pytest.raises(ValueError, match="same embedding dimension"):
        DynamicEmbeddingCollection([
            EmbeddingConfig(name="a", embedding_dim=4, num_embeddings=4),
            EmbeddingConfig(name="b", embedding_dim=8, num_embeddings=4),
        ])


def test_raw_negative_and_huge_ids():
    dyn = DynamicEmbeddingCollection([EmbeddingConfig(name="t", embedding_dim=D, num_embeddings=8, feature_names=["f"])])
    ids = torch.tensor([-(2**63), -7, 8, 2**62, 2**63 - 1, -7])
    out = dyn(KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.tensor([2, 0, 4])))["f"]
    table = dyn.embeddings["t"]
    assert len(table) == 5
    assert torch.equal(out.lengths(), torch.tensor([2, 0, 4]))
    torch.testing.assert_close(out.values(), table.get(ids)[0], rtol=0, atol=0)
    torch.testing.assert_close(out.values()[1], out.values()[5], rtol=0, atol=0)  # same id, same row
    assert torch.unique(out.values()[:5], dim=0).shape[0] == 5
