"""Item embeddings of the retrieval model: padding handling and the cost-relevant contracts."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, SparseOptimizer
from gauss_plugins.models.item_embeddings import DynamicItemEmbeddings, StaticItemEmbeddings, build_item_embeddings


def _dynamic(dim=6):
    return build_item_embeddings("dynamic", num_items=30, dim=dim, lr=0.1, betas=(0.9, 0.98))


def test_dynamic_padding_reads_zeros_gets_no_row_and_no_update():
    items = _dynamic()
    items.train()
    ids = torch.tensor([[3, 5, 0, 0], [5, 9, 12, 0]])
    out = items(ids)
    assert out.shape == (2, 4, 6)
    assert torch.equal(out[ids == 0], torch.zeros(int((ids == 0).sum()), 6))
    table = items.table
    assert len(table) == 4 and int(table.find(torch.tensor([0]))) == -1
    # Same vectors as a lookup of the compacted ids (rows are initialised from the id alone).
    assert torch.equal(out[ids > 0], table.get(ids[ids > 0])[0])
    before = table.get(torch.tensor([3, 5, 9, 12]))[0].clone()
    (out * torch.randn_like(out)).sum().backward()
    items.sparse_step()
    items.sparse_zero_grad()
    after = table.get(torch.tensor([3, 5, 9, 12]))[0]
    assert bool((after != before).any(dim=1).all())  # every valid id moved
    assert torch.equal(table.weight[table.default_row], torch.zeros(6))
    assert len(table) == 4


def test_dynamic_training_equals_a_static_embedding_of_the_same_rows():
    """Padding and repeated ids: one SGD step through the table equals one through nn.Embedding."""
    items = _dynamic()
    items.train()
    items.table.set_optimizer("sgd", lr=1.0)
    ids = torch.tensor([[1, 2, 2, 0], [2, 7, 0, 0]])
    present = torch.tensor([1, 2, 7])
    static = StaticItemEmbeddings(30, 6)
    with torch.no_grad():
        items(present)  # insert the rows
        static.weight[present] = items.table.get(present)[0]
    w = torch.randn(2, 4, 6)
    (items(ids) * w).sum().backward()
    (static(ids) * w).sum().backward()
    items.sparse_step()
    with torch.no_grad():
        static.weight -= static.weight.grad
    torch.testing.assert_close(items.table.get(present)[0], static.weight[present], rtol=0, atol=1e-6)


def test_dynamic_item_embeddings_refuse_a_table_whose_default_row_trains():
    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4, default="unknown", optimizer="sgd"))
    with pytest.raises(ValueError, match="default='zeros'"):
        DynamicItemEmbeddings(table, SparseOptimizer(table), 4)


def test_static_out_of_range_ids_raise_with_the_range():
    static = StaticItemEmbeddings(10, 4)
    with pytest.raises(ValueError, match=r"0\.\.10.*got 0\.\.11"):
        static(torch.tensor([0, 3, 11]))
    with pytest.raises(ValueError, match=r"got -1\.\.3"):
        static(torch.tensor([-1, 3]))
    assert torch.equal(static(torch.tensor([0]))[0], torch.zeros(4))
