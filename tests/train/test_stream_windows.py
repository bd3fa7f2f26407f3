"""Streaming windows: time order, each event a target once, evaluation before training."""
from __future__ import annotations

import numpy as np

from gauss_plugins.data import synthetic_event_stream
from gauss_plugins.train.batching import TrainExamples
from gauss_plugins.train.streaming import stream_windows


def test_windows_partition_the_stream():
    seqs = synthetic_event_stream(num_users=50, num_items=200, mean_length=20, seed=2)
    windows = stream_windows(seqs, 5)
    assert sum(w.num_events for w in windows) == seqs.num_events
    assert all(windows[i].end_time == windows[i + 1].start_time for i in range(4))
    # every event is a training target in exactly one window (except each user's first event)
    targets = 0
    for w in windows:
        ds = TrainExamples(w.train_sequences, max_len=10_000, target_from=w.target_from, users=w.train_users)
        targets += sum(int((ds[i]["targets"] > 0).sum()) for i in range(len(ds)))
    firsts = int((seqs.lengths > 0).sum())
    assert targets == seqs.num_events - firsts


def test_eval_examples_only_use_the_past():
    seqs = synthetic_event_stream(num_users=40, num_items=100, mean_length=15, seed=0)
    windows = stream_windows(seqs, 4)
    for w in windows[1:]:
        ex = w.eval_examples
        assert len(ex) > 0
        for i in range(len(ex)):
            u = int(ex.user_index[i])
            lo = int(seqs.offsets[u])
            end = int(ex.history_end[i])
            assert end > lo                                               # some history
            assert np.all(seqs.timestamps[lo:end] < w.start_time)         # all of it before the window
            assert w.start_time <= seqs.timestamps[end] < w.end_time      # the target is in the window
            # the model evaluated here was trained on windows before w only: their data ends at start_time
            assert np.all(windows[w.index - 1].train_sequences.timestamps < w.start_time)


def test_sequences_without_timestamps_use_positions():
    from gauss_plugins.data import UserSequences

    seqs = UserSequences(user_ids=np.array([1, 2]), offsets=np.array([0, 6, 12]),
                         items=np.arange(1, 13, dtype=np.int64))
    windows = stream_windows(seqs, 3)
    assert [w.num_events for w in windows] == [4, 4, 4]
