"""The sorted-merge helpers a pull uses to drop rows written during its copy and add the
carried hot rows without re-sorting the whole pull: checked against a plain reference."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.stores.base import in_sorted, merge_sorted_rows


def _reference(ids, values, keep, add_ids, add_values):
    rows = {int(i): values[j] for j, i in enumerate(ids.tolist()) if keep is None or bool(keep[j])}
    for j, i in enumerate(add_ids.tolist()):
        rows.setdefault(int(i), add_values[j])  # a kept id keeps its own row
    order = sorted(rows)
    return torch.tensor(order, dtype=torch.int64), (torch.stack([rows[i] for i in order]) if order
                                                     else values[:0])


@pytest.mark.parametrize("seed", range(12))
def test_merge_sorted_rows_matches_a_plain_merge(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, 60, (1,), generator=g))
    ids = torch.randperm(200, generator=g)[:n].sort().values - 100  # negative ids too
    values = torch.randn(n, 3, generator=g)
    keep = None if seed % 3 == 0 else torch.rand(n, generator=g) < 0.7
    k = int(torch.randint(0, 12, (1,), generator=g))
    add_ids = torch.randperm(200, generator=g)[:k] - 100  # distinct, unsorted, some already in ids
    add_values = torch.randn(k, 3, generator=g)
    got_ids, got_values = merge_sorted_rows(ids, values, keep, add_ids, add_values)
    want_ids, want_values = _reference(ids, values, keep, add_ids, add_values)
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_values, want_values)
    assert got_values.dtype == values.dtype


def test_merge_sorted_rows_edges_and_inputs_unchanged():
    ids, values = torch.tensor([2, 5, 9]), torch.arange(6.0).reshape(3, 2)
    before = (ids.clone(), values.clone())
    # nothing to drop, nothing new: the same tensors back, no copy
    same_ids, same_values = merge_sorted_rows(ids, values, None, torch.tensor([5]), torch.full((1, 2), 7.0))
    assert same_ids is ids and same_values is values
    # everything dropped, rows added: only the added rows, in order, in the pull's dtype
    out_ids, out_values = merge_sorted_rows(ids, values, torch.zeros(3, dtype=torch.bool), torch.tensor([7, 1]),
                                            torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert out_ids.tolist() == [1, 7] and out_values.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert out_values.dtype == torch.float32
    # an empty pull
    out_ids, out_values = merge_sorted_rows(ids[:0], values[:0], None, torch.tensor([4]), torch.ones(1, 2))
    assert out_ids.tolist() == [4] and out_values.tolist() == [[1.0, 1.0]]
    # before the first and after the last id
    out_ids, out_values = merge_sorted_rows(ids, values, None, torch.tensor([10, -1]), torch.tensor([[8.0, 8], [9, 9]]))
    assert out_ids.tolist() == [-1, 2, 5, 9, 10]
    assert out_values[:, 0].tolist() == [9.0, 0.0, 2.0, 4.0, 8.0]
    assert torch.equal(ids, before[0]) and torch.equal(values, before[1])


def test_in_sorted_matches_isin():
    g = torch.Generator().manual_seed(0)
    sorted_ids = torch.randperm(1000, generator=g)[:300].sort().values
    probe = torch.randint(-5, 1005, (400,), generator=g)
    assert torch.equal(in_sorted(probe, sorted_ids), torch.isin(probe, sorted_ids))
    assert in_sorted(probe, sorted_ids[:0]).tolist() == [False] * 400
    assert in_sorted(probe[:0], sorted_ids).numel() == 0


@pytest.mark.parametrize("n", [0, 1, 5, 8192, 20_000])
def test_merge_in_place_compacts_the_callers_scratch(n):
    """``in_place``: with nothing to add, the kept rows move to the front of the caller's own
    tensor (blocks of 8192 rows: the sizes cross block edges) and equal the copying path."""
    g = torch.Generator().manual_seed(n)
    ids = torch.arange(n) * 3
    values = torch.randn(n, 5, generator=g)
    keep = torch.rand(n, generator=g) < 0.6
    want_ids, want_values = merge_sorted_rows(ids, values, keep, ids[:0], values[:0])
    scratch = values.clone()
    got_ids, got_values = merge_sorted_rows(ids, scratch, keep, ids[:0], values[:0], in_place=True)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_values, want_values)
    assert got_values.numel() == 0 or got_values.data_ptr() == scratch.data_ptr()  # no new tensor of rows
    # with rows to add, in_place changes nothing about the result
    add_ids, add_values = torch.tensor([1, 4]), torch.ones(2, 5)
    a = merge_sorted_rows(ids, values.clone(), keep, add_ids, add_values, in_place=True)
    b = merge_sorted_rows(ids, values, keep, add_ids, add_values)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
