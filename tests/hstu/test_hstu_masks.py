"""attention_mask against hand-written matrices (x = attends, . = does not; rows = queries)."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.hstu.attention import attention_mask


def grid(text: str) -> torch.Tensor:
    rows = [line.split() for line in text.strip().splitlines()]
    return torch.tensor([[c == "x" for c in row] for row in rows])


def mask1(n, max_seq_len=None, **kw) -> torch.Tensor:
    nt = kw.pop("num_targets", None)
    nt = None if nt is None else torch.tensor([nt])
    return attention_mask(torch.tensor([n]), max_seq_len or n, num_targets=nt, **kw)[0]


CASES = {
    "causal": (dict(n=4), """
        x . . .
        x x . .
        x x x .
        x x x x"""),
    "targets see history and themselves only": (dict(n=5, num_targets=2), """
        x . . . .
        x x . . .
        x x x . .
        x x x x .
        x x x . x"""),
    "three targets": (dict(n=5, num_targets=3), """
        x . . . .
        x x . . .
        x x x . .
        x x . x .
        x x . . x"""),
    "all targets": (dict(n=3, num_targets=3), """
        x . .
        . x .
        . . x"""),
    "zero targets is plain causal": (dict(n=3, num_targets=0), """
        x . .
        x x .
        x x x"""),
    "contextual prefix sees everything, everyone sees it": (dict(n=5, contextual_len=2), """
        x x x x x
        x x x x x
        x x x . .
        x x x x .
        x x x x x"""),
    "contextual prefix and targets": (dict(n=7, contextual_len=2, num_targets=2), """
        x x x x x . .
        x x x x x . .
        x x x . . . .
        x x x x . . .
        x x x x x . .
        x x x x x x .
        x x x x x . x"""),
    "local window": (dict(n=5, max_attn_len=1), """
        x . . . .
        x x . . .
        . x x . .
        . . x x .
        . . . x x"""),
    "window counts targets from the first target": (dict(n=6, max_attn_len=2, num_targets=2), """
        x . . . . .
        x x . . . .
        x x x . . .
        . x x x . .
        . . x x x .
        . . x x . x"""),
    "window and prefix: the prefix is one position": (dict(n=6, max_attn_len=1, contextual_len=2), """
        x x x x x x
        x x x x x x
        x x x . . .
        . . x x . .
        . . . x x .
        . . . . x x"""),
    "not causal": (dict(n=3, causal=False), """
        x x x
        x x x
        x x x"""),
    "not causal, targets still blind to each other": (dict(n=4, causal=False, num_targets=2), """
        x x x x
        x x x x
        x x x .
        x x . x"""),
    "not causal, window": (dict(n=4, causal=False, max_attn_len=1), """
        x x . .
        x x x .
        . x x x
        . . x x"""),
    "padding attends to nothing": (dict(n=3, max_seq_len=5), """
        x . . . .
        x x . . .
        x x x . .
        . . . . .
        . . . . ."""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mask_matches_hand_written(name):
    kwargs, expected = CASES[name]
    assert torch.equal(mask1(**kwargs), grid(expected)), mask1(**kwargs).int()


def test_batch_rows_are_independent():
    lengths = torch.tensor([5, 3, 0, 4])
    targets = torch.tensor([2, 0, 0, 1])
    full = attention_mask(lengths, 6, num_targets=targets, contextual_len=1, max_attn_len=3)
    assert full.shape == (4, 6, 6) and full.dtype == torch.bool
    for b in range(4):
        alone = attention_mask(lengths[b:b + 1], 6, num_targets=targets[b:b + 1], contextual_len=1, max_attn_len=3)
        assert torch.equal(full[b], alone[0])
    assert not full[2].any()  # an empty sequence attends to nothing


def test_targets_never_see_each_other_and_history_never_sees_targets():
    torch.manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 12, ()))
        t = int(torch.randint(0, n + 1, ()))
        m = mask1(n, num_targets=t, max_attn_len=int(torch.randint(0, 4, ())))
        first = n - t
        tgt = m[first:, first:]
        assert torch.equal(tgt, torch.eye(t, dtype=torch.bool))
        assert not m[:first, first:].any()
        assert m.diagonal().all()


def test_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        attention_mask(torch.tensor([[3]]), 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        attention_mask(torch.tensor([3]), -1)
