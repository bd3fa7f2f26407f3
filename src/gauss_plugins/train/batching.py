"""Training and evaluation examples as torch datasets, and their padded batches.

A training example is one user's most recent ``max_len + 1`` training items: the encoder
reads the first ``max_len`` and every position predicts the next item (one example per
user per epoch, as in the paper's code). ``target_from`` hides targets that an earlier
streaming window already trained on: those items still serve as context.

An evaluation example is a history (the most recent ``max_len`` items before the target),
the target, and the item ids to exclude from the ranking (that window, or the whole history).

Batches are right-padded with id 0: ``ids [B, N]``, ``lengths [B]``, ``timestamps [B, N]``
(zeros when the data has none), ``targets [B, N]`` (0 where nothing is predicted) for
training; ``target [B]`` and ``exclude [B, L]`` for evaluation.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gauss_plugins.data.sequences import UserSequences
from gauss_plugins.data.split import EvalExamples

__all__ = ["TrainExamples", "HeldOutExamples", "collate_train", "collate_eval"]


class TrainExamples(Dataset):
    """One example per user with at least two training items.

    ``target_from[u]`` (optional, absolute offsets into ``seqs.items``): only items at or
    after this offset are prediction targets.
    """

    def __init__(self, seqs: UserSequences, max_len: int, target_from: Optional[np.ndarray] = None,
                 users: Optional[np.ndarray] = None) -> None:
        self.seqs = seqs
        self.max_len = int(max_len)
        self.target_from = target_from
        lengths = seqs.lengths
        candidates = np.arange(seqs.num_users) if users is None else np.asarray(users)
        keep = lengths[candidates] >= 2
        if target_from is not None:
            # a user needs at least one target inside the kept window
            keep &= seqs.offsets[candidates + 1] - 1 >= np.maximum(target_from[candidates], seqs.offsets[candidates] + 1)
        self.users = candidates[keep]

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        u = int(self.users[i])
        lo, hi = int(self.seqs.offsets[u]), int(self.seqs.offsets[u + 1])
        start = max(lo, hi - self.max_len - 1)
        items = self.seqs.items[start:hi]
        ts = self.seqs.timestamps[start:hi] if self.seqs.timestamps is not None else np.zeros(hi - start, np.int64)
        targets = items[1:].copy()
        if self.target_from is not None:
            # target j (item at absolute offset start + 1 + j) is hidden if it is before target_from
            first = int(self.target_from[u]) - (start + 1)
            if first > 0:
                targets[:first] = 0
        return {"ids": items[:-1], "timestamps": ts[:-1], "targets": targets}


class HeldOutExamples(Dataset):
    """Evaluation examples from :class:`EvalExamples` (leave-one-out or a streaming window)."""

    def __init__(self, examples: EvalExamples, max_len: int, exclude_history: str = "window") -> None:
        if exclude_history not in ("window", "full"):
            raise ValueError(f"exclude_history must be 'window' or 'full', got {exclude_history!r}")
        self.examples = examples
        self.max_len = int(max_len)
        self.exclude_history = exclude_history

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        seqs = self.examples.sequences
        u = int(self.examples.user_index[i])
        lo, end = int(seqs.offsets[u]), int(self.examples.history_end[i])
        start = max(lo, end - self.max_len)
        ids = seqs.items[start:end]
        ts = seqs.timestamps[start:end] if seqs.timestamps is not None else np.zeros(end - start, np.int64)
        exclude = ids if self.exclude_history == "window" else seqs.items[lo:end]
        return {"ids": ids, "timestamps": ts, "target": np.int64(self.examples.target[i]), "exclude": exclude}


def _pad(rows: Sequence[np.ndarray], width: Optional[int] = None) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def collate_train(batch: List[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    return {
        "ids": _pad([b["ids"] for b in batch]),
        "timestamps": _pad([b["timestamps"] for b in batch]),
        "targets": _pad([b["targets"] for b in batch]),
        "lengths": torch.tensor([len(b["ids"]) for b in batch], dtype=torch.int64),
    }


def collate_eval(batch: List[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    return {
        "ids": _pad([b["ids"] for b in batch]),
        "timestamps": _pad([b["timestamps"] for b in batch]),
        "lengths": torch.tensor([len(b["ids"]) for b in batch], dtype=torch.int64),
        "target": torch.tensor([int(b["target"]) for b in batch], dtype=torch.int64),
        "exclude": _pad([b["exclude"] for b in batch]),
    }
