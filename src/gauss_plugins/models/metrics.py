"""Full-corpus retrieval metrics as the HSTU paper's code computes them.

For each held-out target, every item of the corpus (ids ``1..num_items``) is scored against
the user's query embedding; the items of the user's history are removed (the paper's code
passes the input sequence as ``invalid_ids`` to its top-k), and the target's 1-based rank
among the rest gives

* ``hr@K``   = 1 if rank <= K else 0,
* ``ndcg@K`` = 1 / log2(rank + 1) if rank <= K else 0 (one relevant item, so IDCG = 1),

averaged over targets. Ties are counted against the target (an item scoring exactly the
target's score ranks ahead of it), the pessimistic choice; with float scores ties are rare.
A target that is itself in the history was removed with it and counts as a miss, as in the
paper's code (MovieLens never repeats an item).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

__all__ = ["DEFAULT_KS", "target_ranks", "metrics_from_ranks", "RetrievalMetrics"]

DEFAULT_KS = (10, 50, 200)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, history: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1-based rank of each target among the non-excluded corpus items.

    ``scores``: ``[B, C]``, column ``j`` is item id ``j`` (column 0, the padding id, is never
    ranked). ``targets``: ``[B]`` item ids in ``1..C-1``. ``history``: ``[B, L]`` item ids to
    exclude, ``0`` for padding. Returns float ``[B]`` ranks, ``inf`` for an excluded target.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"expected scores [B, C] and targets [B], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= scores.shape[1]):
        raise ValueError(f"targets must be item ids in 1..{scores.shape[1] - 1}")
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    if history is not None and history.numel():
        scores.scatter_(1, history.long(), float("-inf"))  # padding 0 lands on column 0, already -inf
    target_scores = scores.gather(1, targets.long().unsqueeze(1))
    excluded = torch.isneginf(target_scores.squeeze(1))
    # Items ahead of the target: strictly higher, or tied (pessimistic), never the target itself.
    ahead = (scores >= target_scores).sum(dim=1) - 1
    ranks = (ahead + 1).float()
    ranks[excluded] = float("inf")
    return ranks


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """``hr@K`` and ``ndcg@K`` for every K, averaged over ``ranks`` (plus ``mrr``)."""
    ranks = ranks.double()
    out: Dict[str, float] = {}
    n = max(ranks.numel(), 1)
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.sum()) / n
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks.clamp(max=1e12) + 1.0), torch.zeros_like(ranks)).sum()) / n
    out["mrr"] = float((1.0 / ranks).sum()) / n
    return out


class RetrievalMetrics:
    """Accumulates ranks over evaluation batches; :meth:`compute` averages them."""

    def __init__(self, ks: Iterable[int] = DEFAULT_KS) -> None:
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        self._ranks = []

    def reset(self) -> None:
        self._ranks = []

    def update(self, scores: torch.Tensor, targets: torch.Tensor, history: Optional[torch.Tensor] = None) -> torch.Tensor:
        ranks = target_ranks(scores, targets, history)
        self._ranks.append(ranks.detach().cpu())
        return ranks

    @property
    def count(self) -> int:
        return sum(r.numel() for r in self._ranks)

    def ranks(self) -> torch.Tensor:
        return torch.cat(self._ranks) if self._ranks else torch.empty(0)

    def compute(self) -> Dict[str, float]:
        if not self._ranks:
            raise RuntimeError("no evaluation batch was seen; nothing to average")
        return metrics_from_ranks(self.ranks(), self.ks)

