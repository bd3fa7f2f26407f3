"""Streaming protocol: events in time order, train on a window, evaluate on the next one.

All events are ordered by time (the global stream) and cut into ``num_windows`` windows of
equal event counts. Window ``w`` gives

* training data: every user's events up to the end of window ``w``; only events inside
  window ``w`` are prediction targets (earlier ones were trained on before and serve as
  context), so each event is trained on once, in order;
* evaluation data for window ``w`` (``w >= 1``): for each user with an event in window ``w``
  and some history before it, the first such event is the target and everything before it
  the history. The model evaluated there has seen windows ``0..w-1`` only.

The caller trains on window 0, then for ``w = 1..W-1`` evaluates on ``w`` and trains on ``w``.
Windows ``1..W-2`` are the "validation" stream (metrics over time); the last window, never
trained on before it is evaluated, is the test.

Without timestamps (sequence files), the position within a user's sequence stands in for
time: event ``k`` of every user happens at step ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from gauss_plugins.data.sequences import UserSequences
from gauss_plugins.data.split import EvalExamples

__all__ = ["StreamWindow", "stream_windows"]


@dataclass(frozen=True)
class StreamWindow:
    """Window ``index`` of the stream; see the module docstring."""

    index: int
    start_time: int
    end_time: int                # exclusive
    num_events: int
    train_sequences: UserSequences   # events up to the end of this window, per user
    target_from: np.ndarray          # absolute offsets into train_sequences.items: first target per user
    train_users: np.ndarray          # users with at least one event in this window
    eval_examples: EvalExamples      # first event of each user in this window (over the full sequences)


def _event_times(seqs: UserSequences) -> np.ndarray:
    if seqs.timestamps is not None:
        return seqs.timestamps
    user_of = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    return np.arange(seqs.num_events) - seqs.offsets[user_of]


def stream_windows(seqs: UserSequences, num_windows: int) -> List[StreamWindow]:
    """Cut ``seqs`` into ``num_windows`` time windows of (about) equal event counts."""
    if num_windows < 2:
        raise ValueError(f"num_windows must be >= 2, got {num_windows}")
    if seqs.num_events < num_windows:
        raise ValueError(f"{seqs.num_events} events cannot fill {num_windows} windows")
    times = _event_times(seqs)
    sorted_times = np.sort(times, kind="stable")
    # Boundaries at event-count quantiles; events sharing a timestamp stay in one window, so
    # the windows are time intervals (a window may end up empty on heavily tied data).
    cut_idx = [int(round(seqs.num_events * k / num_windows)) for k in range(1, num_windows)]
    bounds = [int(sorted_times[0])] + [int(sorted_times[i]) for i in cut_idx] + [int(sorted_times[-1]) + 1]
    user_of = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    windows = []
    for w in range(num_windows):
        lo_t, hi_t = bounds[w], bounds[w + 1]
        upto = times < hi_t                       # events up to the end of this window
        counts = np.bincount(user_of[upto], minlength=seqs.num_users)
        offsets = np.zeros(seqs.num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # Per user, events are chronological, so "time < hi_t" is a prefix of each sequence.
        train = UserSequences(
            user_ids=seqs.user_ids, offsets=offsets, items=seqs.items[upto],
            timestamps=seqs.timestamps[upto] if seqs.timestamps is not None else None,
            name=f"{seqs.name}:window{w}", info=dict(seqs.info))
        before = np.bincount(user_of[times < lo_t], minlength=seqs.num_users)
        target_from = offsets[:-1] + before
        in_window = counts - before
        train_users = np.nonzero(in_window > 0)[0]
        # Evaluation: first event in this window of users who have history before it.
        eval_users = np.nonzero((in_window > 0) & (before > 0))[0]
        ends = seqs.offsets[eval_users] + before[eval_users]
        examples = EvalExamples(seqs, eval_users, ends, seqs.items[ends])
        windows.append(StreamWindow(w, lo_t, hi_t, int(in_window.sum()), train, target_from, train_users, examples))
    return windows
