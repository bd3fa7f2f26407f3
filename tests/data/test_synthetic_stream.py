"""The synthetic event stream: deterministic, Zipfian, drifting, no repeats, timestamps."""
from __future__ import annotations

import numpy as np
import pytest

from gauss_plugins.data import synthetic_event_stream


def test_deterministic_and_well_formed():
    a = synthetic_event_stream(num_users=80, num_items=300, mean_length=30, seed=3)
    b = synthetic_event_stream(num_users=80, num_items=300, mean_length=30, seed=3)
    c = synthetic_event_stream(num_users=80, num_items=300, mean_length=30, seed=4)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.timestamps, b.timestamps)
    assert not np.array_equal(a.items, c.items)
    assert a.num_users == 80 and a.items.min() >= 1 and a.items.max() <= 300
    for items, times in a:
        assert len(set(items.tolist())) == len(items)      # a user never repeats an item
        assert np.all(np.diff(times) >= 0)


def test_popularity_is_skewed():
    s = synthetic_event_stream(num_users=300, num_items=500, mean_length=40, seed=0, zipf_exponent=1.1)
    counts = np.sort(np.bincount(s.items, minlength=501)[1:])[::-1]
    top_share = counts[:25].sum() / counts.sum()           # top 5% of items
    bottom_share = counts[250:].sum() / counts.sum()       # least popular half
    assert top_share > 0.1 and bottom_share < 0.35         # uniform would give .05 and .5


def test_interests_drift_but_persist():
    s = synthetic_event_stream(num_users=200, num_items=400, num_topics=10, mean_length=40, seed=1,
                               drift=0.1, noise=0.0)
    # Recover each item's topic: the generator splits a permutation of ids into equal topics.
    rng = np.random.default_rng(1)
    perm = rng.permutation(400) + 1
    topic_of = np.zeros(401, dtype=int)
    for t, members in enumerate(np.array_split(perm, 10)):
        topic_of[members] = t
    same = changed = 0
    for items, _ in s:
        topics = topic_of[items]
        same += int((topics[1:] == topics[:-1]).sum())
        changed += int((topics[1:] != topics[:-1]).sum())
    frac_changed = changed / (same + changed)
    assert 0.03 < frac_changed < 0.3   # interests persist between events, yet drift over time


def test_bad_options():
    with pytest.raises(ValueError, match="probability"):
        synthetic_event_stream(num_users=5, drift=1.5)
    with pytest.raises(ValueError, match="num_items >= num_topics"):
        synthetic_event_stream(num_users=5, num_items=3, num_topics=10)
