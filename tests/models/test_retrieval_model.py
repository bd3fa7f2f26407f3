"""The retrieval model: sampled softmax, causality, L2 outputs, dynamic-table item embeddings."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gauss_plugins.models import build_model
from gauss_plugins.models.item_embeddings import DynamicItemEmbeddings
from gauss_plugins.train.config import config_from_dict


def _model(arch="sasrec", item_embedding="dynamic", num_items=40, negatives=8, max_len=12):
    cfg = config_from_dict({
        "data": {"max_len": max_len},
        "model": {"arch": arch, "dim": 16, "num_blocks": 1, "num_heads": 2, "attention_dim": 8, "linear_dim": 8,
                  "dropout": 0.0, "item_embedding": item_embedding},
        "loss": {"num_negatives": negatives, "temperature": 0.1},
    })
    torch.manual_seed(0)
    return build_model(cfg, num_items=num_items)


def _batch():
    ids = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
    lengths = torch.tensor([4, 6])
    targets = torch.tensor([[4, 5, 6, 7, 0, 0], [8, 9, 10, 11, 12, 13]])
    ts = torch.arange(12).view(2, 6) * 100
    return ids, lengths, targets, ts


@pytest.mark.parametrize("arch", ["sasrec", "hstu"])
def test_outputs_are_unit_and_causal(arch):
    model = _model(arch, item_embedding="static").eval()
    ids, lengths, _, ts = _batch()
    out = model.encode(ids, lengths, ts)
    norms = out.norm(dim=-1)
    assert torch.allclose(norms[0, :4], torch.ones(4), atol=1e-5)
    assert torch.allclose(norms[1], torch.ones(6), atol=1e-5)
    changed = ids.clone()
    changed[1, 5] = 30                      # change the last item: earlier outputs must not move
    out2 = model.encode(changed, lengths, ts)
    assert torch.allclose(out[1, :5], out2[1, :5], atol=1e-5)
    assert not torch.allclose(out[1, 5], out2[1, 5])


@pytest.mark.parametrize("num_items", [20, 4000])   # matmul path (few distinct negatives) and gather path
def test_sampled_softmax_matches_brute_force(num_items):
    model = _model(num_items=num_items, negatives=16, item_embedding="static").eval()
    ids, lengths, targets, ts = _batch()
    gen = torch.Generator().manual_seed(5)
    loss = model.sampled_softmax_loss(ids, lengths, targets, ts, generator=gen)["loss"]
    # brute force with the same negatives
    gen = torch.Generator().manual_seed(5)
    out = model.encode(ids, lengths, ts)
    mask = targets > 0
    q, pos = out[mask], targets[mask]
    neg = torch.randint(1, num_items + 1, (q.shape[0], 16), generator=gen)
    e = F.normalize(model.item_embeddings.weight, dim=-1, eps=1e-6)
    pos_l = (q * e[pos]).sum(-1, keepdim=True)
    neg_l = torch.einsum("pd,prd->pr", q, e[neg])
    neg_l = torch.where(neg == pos[:, None], torch.full_like(neg_l, -5e4 * 0.1), neg_l)
    expected = -F.log_softmax(torch.cat([pos_l, neg_l], 1) / 0.1, dim=1)[:, 0].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dynamic_item_embeddings_train_through_the_sparse_optimizer():
    model = _model().train()
    items = model.item_embeddings
    assert isinstance(items, DynamicItemEmbeddings)
    ids, lengths, targets, ts = _batch()
    zero = items(torch.tensor([0, 3]))[0]
    assert torch.count_nonzero(zero) == 0     # padding never reaches the table
    before = items(torch.tensor([3, 7])).detach().clone()
    # the table holds no nn.Parameter: the dense optimizer never sees item rows
    assert not any("item_embeddings" in n for n, _ in model.named_parameters())
    loss = model.sampled_softmax_loss(ids, lengths, targets, ts)["loss"]
    loss.backward()
    items.sparse_step()
    items.sparse_zero_grad()
    after = items(torch.tensor([3, 7])).detach()
    assert not torch.allclose(before, after)


def test_eval_lookup_does_not_insert():
    model = _model(num_items=1000).eval()
    n = len(model.item_embeddings.table)
    vec = model.item_embeddings(torch.tensor([999]))
    assert len(model.item_embeddings.table) == n
    assert torch.count_nonzero(vec) == 0


def test_static_embeddings_refuse_out_of_range_ids():
    model = _model(item_embedding="static", num_items=10)
    with pytest.raises(ValueError, match="0..10"):
        model.item_embeddings(torch.tensor([11]))


def test_corpus_scores_cover_every_item():
    model = _model(num_items=25).eval()
    ids, lengths, _, ts = _batch()
    scores = model.score_corpus(model.query(ids, lengths, ts))
    assert scores.shape == (2, 26)
    assert torch.all(scores[:, 0] == 0)      # the padding row is zero


@pytest.mark.parametrize("item_embedding", ["static", "dynamic"])
def test_a_training_step_reads_the_item_table_once(item_embedding):
    """Inputs, positives and the distinct negatives come from one lookup (each lookup costs a
    host sync on a GPU), and the gradients equal those of three separate lookups."""
    model = _model("hstu", item_embedding=item_embedding, num_items=20).train()
    ids, lengths, targets, ts = _batch()
    calls = []
    hook = model.item_embeddings.register_forward_hook(lambda m, args, out: calls.append(args[0].numel()))
    gen = torch.Generator().manual_seed(3)
    loss = model.sampled_softmax_loss(ids, lengths, targets, ts, generator=gen)["loss"]
    hook.remove()
    assert len(calls) == 1
    # the same loss from separate lookups
    gen = torch.Generator().manual_seed(3)
    out = model.encode(ids, lengths, ts)
    mask = targets > 0
    q, pos = out[mask], targets[mask]
    neg = torch.randint(1, 21, (q.shape[0], model.num_negatives), generator=gen)
    pos_l = (q * model.item_vectors(pos)).sum(-1, keepdim=True)
    neg_l = torch.einsum("pd,prd->pr", q, model.item_vectors(neg))
    neg_l = neg_l.masked_fill(neg == pos[:, None], -5e4 * 0.1)
    expected = -F.log_softmax(torch.cat([pos_l, neg_l], 1) / 0.1, dim=1)[:, 0].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_batch_without_targets_is_rejected_before_any_lookup():
    model = _model().train()
    table = model.item_embeddings.table
    rows = len(table)
    ids, lengths, targets, ts = _batch()
    ids = ids + 20  # unseen ids: a lookup would insert them
    with pytest.raises(ValueError, match="no target"):
        model.sampled_softmax_loss(ids, lengths, torch.zeros_like(targets), ts)
    assert len(table) == rows


def test_a_skipped_sparse_step_is_reported_by_sparse_check_finite():
    """A sync-free step (CUDA's default; forced on here, on the torch index it applies to)
    skips a NaN gradient and reports it later; sparse_check_finite (called by the Lightning
    module at epoch end) reports it even when it was the last step of an epoch."""
    from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=4, backend="torch", default="zeros",
                                                     optimizer=OptimizerConfig("adam", lr=0.1)))
    table.sync_free_step = True
    table.train()
    items = DynamicItemEmbeddings(table, SparseOptimizer(table), dim=4)
    ids = torch.tensor([[3, 4, 0]])
    items(ids).sum().backward()
    items.sparse_step()
    items.sparse_zero_grad()
    before = table.weight.clone()
    (items(ids) * float("nan")).sum().backward()
    items.sparse_step()  # skipped on the device: no exception, no row moves
    items.sparse_zero_grad()
    assert torch.equal(table.weight, before)
    with pytest.raises(FloatingPointError, match="items"):
        items.sparse_check_finite()
    items.sparse_check_finite()  # reported once
    _model(item_embedding="static").item_embeddings.sparse_check_finite()  # dense parameters: nothing to check
