"""The leave-one-out split on hand-made sequences."""
from __future__ import annotations

import numpy as np
import pytest

from gauss_plugins.data import UserSequences, from_events, leave_one_out


def _seqs():
    # user 1: 5 events, user 2: 2 events (too short to evaluate), user 3: 3 events
    users = [1, 1, 1, 1, 1, 2, 2, 3, 3, 3]
    items = [10, 11, 12, 13, 14, 20, 21, 30, 31, 32]
    times = [1, 2, 3, 4, 5, 1, 2, 7, 8, 9]
    return from_events(np.array(users), np.array(items), np.array(times), name="toy")


def test_split_targets_and_histories():
    split = leave_one_out(_seqs())
    train = split.train
    assert train.sequence(0)[0].tolist() == [10, 11, 12]
    assert train.sequence(1)[0].tolist() == [20, 21]      # not evaluated: all training
    assert train.sequence(2)[0].tolist() == [30]
    assert split.val.target.tolist() == [13, 31]
    assert split.test.target.tolist() == [14, 32]
    assert split.val.history(0).tolist() == [10, 11, 12]
    assert split.test.history(0).tolist() == [10, 11, 12, 13]   # the validation item is history
    assert split.test.history(1).tolist() == [30, 31]
    assert train.timestamps.tolist() == [1, 2, 3, 1, 2, 7]
    # no target ever appears in training data of its user
    for i, u in enumerate(split.test.user_index):
        assert split.test.target[i] not in train.sequence(u)[0]
        assert split.val.target[i] not in train.sequence(u)[0]


def test_train_and_val_is_all_but_the_test_item():
    split = leave_one_out(_seqs())
    both = split.train_and_val
    assert both.sequence(0)[0].tolist() == [10, 11, 12, 13]   # the validation item is trained on
    assert both.sequence(1)[0].tolist() == [20, 21]           # not evaluated: all of it
    assert both.sequence(2)[0].tolist() == [30, 31]
    assert both.timestamps.tolist() == [1, 2, 3, 4, 1, 2, 7, 8]
    assert both.name == "toy:train+val" and split.train.name == "toy:train"
    for i, u in enumerate(split.test.user_index):  # the test item never is
        assert split.test.target[i] not in both.sequence(u)[0]
        assert split.val.target[i] in both.sequence(u)[0]


def test_split_needs_an_evaluable_user():
    seqs = UserSequences(user_ids=np.array([1]), offsets=np.array([0, 2]), items=np.array([1, 2]))
    with pytest.raises(ValueError, match="3 or more events"):
        leave_one_out(seqs)
