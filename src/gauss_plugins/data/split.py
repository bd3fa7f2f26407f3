"""The leave-one-out split of sequential recommendation (SASRec, HSTU papers).

For every user with at least three events: the last item is the test target, the
second-to-last the validation target, the rest is training data. The validation target is
predicted from the training prefix; the test target from everything before it (the
validation item included, as history only: it is never trained on). Users with fewer than
three events cannot give both targets: their whole sequence is training data and they are
not evaluated.

``train_and_val`` is the training data of a refit (``train.refit``): every user's events but
the test item, i.e. the training prefixes plus the validation items. The papers' code trains
on exactly this (it has no validation split); here a refit trains on it for the number of
epochs selected on validation, so the test item is still never seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gauss_plugins.data.sequences import UserSequences

__all__ = ["EvalExamples", "LeaveOneOutSplit", "leave_one_out"]

MIN_EVALUATED_LENGTH = 3


@dataclass(frozen=True)
class EvalExamples:
    """Held-out targets: example ``i`` predicts ``target[i]`` for user ``user_index[i]`` from
    the history ``sequences.items[sequences.offsets[user_index[i]]:history_end[i]]``."""

    sequences: UserSequences
    user_index: np.ndarray
    history_end: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.user_index)

    def history(self, i: int) -> np.ndarray:
        u = int(self.user_index[i])
        return self.sequences.items[int(self.sequences.offsets[u]):int(self.history_end[i])]


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Training prefixes plus validation and test targets of one :class:`UserSequences`."""

    sequences: UserSequences
    train: UserSequences
    val: EvalExamples
    test: EvalExamples
    train_and_val: UserSequences


def leave_one_out(seqs: UserSequences) -> LeaveOneOutSplit:
    """Split ``seqs`` as described in the module docstring."""
    lengths = seqs.lengths
    evaluated = lengths >= MIN_EVALUATED_LENGTH
    if not np.any(evaluated):
        raise ValueError(f"{seqs.name or 'dataset'}: no user has {MIN_EVALUATED_LENGTH} or more events; "
                         "leave-one-out needs a training prefix, a validation and a test item")
    # Training keeps all but the last two events of evaluated users, everything of the others;
    # a refit's training data keeps all but the last one (the test item) of evaluated users.
    train = _prefixes(seqs, np.where(evaluated, lengths - 2, lengths), "train")
    train_and_val = _prefixes(seqs, np.where(evaluated, lengths - 1, lengths), "train+val")
    users = np.nonzero(evaluated)[0]
    ends = seqs.offsets[users + 1]
    val = EvalExamples(seqs, users, ends - 2, seqs.items[ends - 2])
    test = EvalExamples(seqs, users, ends - 1, seqs.items[ends - 1])
    return LeaveOneOutSplit(sequences=seqs, train=train, val=val, test=test, train_and_val=train_and_val)


def _prefixes(seqs: UserSequences, keep_lengths: np.ndarray, suffix: str) -> UserSequences:
    """The first ``keep_lengths[u]`` events of every user ``u`` of ``seqs``."""
    starts = seqs.offsets[:-1]
    # Mark [start, start + keep_length) of every user with a difference array (no Python loop).
    marks = np.zeros(seqs.num_events + 1, dtype=np.int64)
    np.add.at(marks, starts, 1)
    np.add.at(marks, starts + keep_lengths, -1)
    keep = np.cumsum(marks[:-1]) > 0
    offsets = np.zeros(seqs.num_users + 1, dtype=np.int64)
    np.cumsum(keep_lengths, out=offsets[1:])
    return UserSequences(
        user_ids=seqs.user_ids,
        offsets=offsets,
        items=seqs.items[keep],
        timestamps=seqs.timestamps[keep] if seqs.timestamps is not None else None,
        name=f"{seqs.name}:{suffix}",
        info=dict(seqs.info),
    )
