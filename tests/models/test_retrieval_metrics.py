"""HR@K / NDCG@K on hand-computed cases (full-corpus ranking minus the history)."""
from __future__ import annotations

import math

import pytest
import torch

from gauss_plugins.models.metrics import RetrievalMetrics, metrics_from_ranks, target_ranks


def test_ranks_by_hand():
    # corpus ids 1..5 (column 0 is padding and never ranked)
    scores = torch.tensor([
        [9.0, 0.1, 0.5, 0.9, 0.3, 0.7],   # target 2 (0.5): ahead are 3 (0.9), 5 (0.7) -> rank 3
        [9.0, 0.1, 0.5, 0.9, 0.3, 0.7],   # same, history {3, 5} removed -> rank 1
        [0.0, 0.4, 0.4, 0.1, 0.2, 0.3],   # tie with item 1: pessimistic -> rank 2
        [0.0, 0.4, 0.6, 0.1, 0.2, 0.3],   # target in its own history -> excluded -> miss
    ])
    targets = torch.tensor([2, 2, 2, 2])
    history = torch.tensor([[0, 0], [3, 5], [0, 0], [2, 0]])
    ranks = target_ranks(scores, targets, history)
    assert ranks[:3].tolist() == [3.0, 1.0, 2.0]
    assert math.isinf(ranks[3])


def test_metrics_from_ranks_by_hand():
    ranks = torch.tensor([1.0, 3.0, 12.0, 60.0, float("inf")])
    m = metrics_from_ranks(ranks, ks=(1, 10, 50))
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@10"] == pytest.approx(2 / 5)
    assert m["hr@50"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 5)
    assert m["ndcg@50"] == pytest.approx((1.0 + 0.5 + 1 / math.log2(13)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 60) / 5)


def test_accumulator_over_batches_equals_one_batch():
    torch.manual_seed(0)
    scores = torch.randn(10, 31)
    targets = torch.randint(1, 31, (10,))
    history = torch.randint(0, 31, (10, 4))
    history[history == targets[:, None]] = 0
    acc = RetrievalMetrics(ks=(5, 10))
    acc.update(scores[:4], targets[:4], history[:4])
    acc.update(scores[4:], targets[4:], history[4:])
    whole = metrics_from_ranks(target_ranks(scores, targets, history), ks=(5, 10))
    assert acc.compute() == pytest.approx(whole)
    # brute force: rank = 1 + number of non-history items scoring >= target, other than it
    for i in range(10):
        t = int(targets[i])
        ahead = [j for j in range(1, 31) if j != t and j not in history[i].tolist() and scores[i, j] >= scores[i, t]]
        assert target_ranks(scores[i:i + 1], targets[i:i + 1], history[i:i + 1]).item() == 1 + len(ahead)


def test_bad_input():
    with pytest.raises(ValueError, match="1..4"):
        target_ranks(torch.zeros(2, 5), torch.tensor([1, 5]))
    with pytest.raises(RuntimeError, match="no evaluation batch"):
        RetrievalMetrics().compute()
