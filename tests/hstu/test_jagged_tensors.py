"""Jagged values + offsets helpers, and TorchRec JaggedTensor conversion."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.jagged import (
    from_torchrec,
    lengths_to_offsets,
    offsets_to_lengths,
    pad,
    row_coordinates,
    to_torchrec,
    unpad,
    validate_offsets,
)


def test_lengths_offsets_round_trip():
    lengths = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    offsets = lengths_to_offsets(lengths)
    assert offsets.dtype == torch.int64
    assert offsets.tolist() == [0, 2, 2, 5, 6]
    assert offsets_to_lengths(offsets).tolist() == [2, 0, 3, 1]
    assert lengths_to_offsets(torch.zeros(0, dtype=torch.int64)).tolist() == [0]


def test_row_coordinates():
    seq, pos = row_coordinates(torch.tensor([0, 2, 2, 5]), 5)
    assert seq.tolist() == [0, 0, 2, 2, 2]
    assert pos.tolist() == [0, 1, 0, 1, 2]


def test_pad_and_unpad_by_hand():
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    offsets = torch.tensor([0, 2, 2, 5])
    padded, mask = pad(values, offsets, 4, padding_value=-1.0)
    assert padded.squeeze(-1).tolist() == [[1, 2, -1, -1], [-1, -1, -1, -1], [3, 4, 5, -1]]
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]
    assert torch.equal(unpad(padded, offsets), values)


def test_pad_unpad_random_round_trip_and_gradient():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 6, (7,), generator=g)
    offsets = lengths_to_offsets(lengths)
    values = torch.randn(int(offsets[-1]), 3, 2, generator=g, requires_grad=True)
    padded, mask = pad(values, offsets, 6)
    assert padded.shape == (7, 6, 3, 2)
    assert (padded[~mask] == 0).all()
    back = unpad(padded, offsets)
    assert torch.equal(back, values)
    (grad,) = torch.autograd.grad((back * 2).sum(), [values])
    assert torch.equal(grad, torch.full_like(values, 2.0))


@pytest.mark.parametrize("offsets, match", [
    (torch.tensor([1, 2, 5]), "offsets\\[0\\] must be 0"),
    (torch.tensor([0, 3, 2, 5]), "non-decreasing.*offsets\\[1\\]=3 > offsets\\[2\\]=2"),
    (torch.tensor([0, 2, 4]), "must equal the number of rows of the values \\(5\\)"),
    (torch.tensor([[0, 5]]), "1-D"),
    (torch.tensor([0, 5], dtype=torch.int32), "int64"),
])
def test_validate_offsets_errors(offsets, match):
    with pytest.raises((ValueError, TypeError), match=match):
        validate_offsets(offsets, 5)


def test_pad_errors():
    values = torch.randn(5, 2)
    offsets = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="more than max_len=2"):
        pad(values, offsets, 2)
    with pytest.raises(ValueError, match="max_len"):
        pad(values, offsets, -1)
    with pytest.raises(ValueError, match="number of rows"):
        pad(values[:4], offsets, 3)
    with pytest.raises(ValueError, match="batch size 3"):
        unpad(torch.zeros(3, 4, 2), offsets)
    with pytest.raises(ValueError, match="holds only 2"):
        unpad(torch.zeros(2, 2, 2), offsets)
    with pytest.raises(TypeError, match="integer"):
        lengths_to_offsets(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        lengths_to_offsets(torch.tensor([1, -1]))


def test_torchrec_round_trip():
    pytest.importorskip("torchrec")
    from torchrec.sparse.jagged_tensor import JaggedTensor

    values = torch.arange(6, dtype=torch.float32)
    jt = JaggedTensor(values=values, lengths=torch.tensor([2, 0, 4], dtype=torch.int32))
    got_values, got_offsets = from_torchrec(jt)
    assert got_offsets.dtype == torch.int64 and got_offsets.tolist() == [0, 2, 2, 6]
    assert torch.equal(got_values, values)

    back = to_torchrec(got_values, got_offsets)
    assert isinstance(back, JaggedTensor)
    assert back.lengths().tolist() == [2, 0, 4]
    ours, _ = pad(values, got_offsets, 4)
    assert torch.equal(back.to_padded_dense(desired_length=4), ours)

    with pytest.raises(TypeError, match="JaggedTensor"):
        from_torchrec((values, got_offsets))
    with pytest.raises(ValueError, match="weights have 2 rows"):
        to_torchrec(values, got_offsets, weights=torch.ones(2))


def test_missing_torchrec_names_the_extra(monkeypatch):
    import sys

    from gauss_plugins import MissingExtraError

    monkeypatch.setitem(sys.modules, "torchrec", None)  # makes `import torchrec` fail
    with pytest.raises(MissingExtraError, match="gauss-plugins\\[torchrec\\]"):
        to_torchrec(torch.zeros(2), torch.tensor([0, 2]))


def test_unvalidated_fast_path_gives_the_same_result():
    values = torch.arange(10.0).view(5, 2)
    offsets = torch.tensor([0, 2, 2, 5])
    padded, mask = pad(values, offsets, 3)
    fast, fast_mask = pad(values, offsets, 3, validate=False)
    assert torch.equal(padded, fast) and torch.equal(mask, fast_mask)
    assert torch.equal(unpad(padded, offsets, 5, validate=False), values)
    with pytest.raises(ValueError, match="number of rows"):
        unpad(padded, offsets, 4)  # a wrong total is caught when validating
