"""A synthetic event stream for machines without data: Zipf popularity, drifting interests.

The generative story, chosen so that a sequential model has something real to learn and a
popularity baseline does not get everything:

* Items are split into ``num_topics`` topics of equal size; inside a topic, item popularity
  follows a Zipf law with exponent ``zipf_exponent`` (so the corpus as a whole is Zipfian).
* Each user starts in a random topic. After every event the user's interest drifts with
  probability ``drift``: to the next topic (``t + 1 mod T``) with probability
  ``1 - jump`` (a slow, learnable drift), or to a uniformly random topic otherwise.
* Each event draws an item from the current topic by popularity with probability
  ``1 - noise``, or from the whole corpus by popularity otherwise. A user never repeats an
  item (MovieLens-like: ratings do not repeat).
* Timestamps: each user's first event is uniform in the first quarter of
  ``[start_time, start_time + span_s)``, then gaps are exponential with mean ``mean_gap_s``
  seconds (default: ``span_s / mean_length``), so users stay active over the whole span and
  the global stream interleaves them as a real one does.

Deterministic for a given ``seed``. Item ids are ``1..num_items``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from gauss_plugins.data.sequences import UserSequences, from_events

__all__ = ["synthetic_event_stream"]


def synthetic_event_stream(
    num_users: int = 1000,
    num_items: int = 2000,
    mean_length: int = 60,
    min_length: int = 5,
    num_topics: int = 20,
    zipf_exponent: float = 1.1,
    drift: float = 0.1,
    jump: float = 0.2,
    noise: float = 0.1,
    mean_gap_s: Optional[float] = None,
    start_time: int = 1_700_000_000,
    span_s: float = 30 * 86400.0,
    seed: int = 0,
    path: Optional[str] = None,
) -> UserSequences:
    """Generate the stream described in the module docstring as per-user sequences.

    ``path`` is accepted and ignored so that every dataset factory has the same signature.
    Sequence lengths are ``min_length`` plus a geometric number of extra events with mean
    ``mean_length - min_length``.
    """
    del path
    if num_users < 1 or num_items < num_topics or num_topics < 1:
        raise ValueError(f"need num_users >= 1 and num_items >= num_topics >= 1, got users={num_users}, "
                         f"items={num_items}, topics={num_topics}")
    if mean_length < min_length or min_length < 1:
        raise ValueError(f"need mean_length >= min_length >= 1, got {mean_length}, {min_length}")
    for name, p in (("drift", drift), ("jump", jump), ("noise", noise)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    gap = float(mean_gap_s) if mean_gap_s is not None else span_s / mean_length
    if gap <= 0:
        raise ValueError(f"mean_gap_s must be positive, got {mean_gap_s}")

    # Topic t holds items t*size+1 .. (t+1)*size (the last topic takes the remainder);
    # a random permutation spreads popular items over the id space as real catalogs do.
    perm = rng.permutation(num_items) + 1
    topic_items = np.array_split(perm, num_topics)
    # Inverse-CDF sampling (searchsorted on cumulative weights): one draw per event is the
    # hot loop, and rng.choice(p=...) rebuilds the CDF on every call.
    topic_cdfs = []
    for members in topic_items:
        w = np.cumsum(1.0 / np.arange(1, len(members) + 1) ** zipf_exponent)
        topic_cdfs.append(w / w[-1])
    global_cdf = np.cumsum(1.0 / np.arange(1, num_items + 1) ** zipf_exponent)
    global_cdf /= global_cdf[-1]
    global_items = rng.permutation(num_items) + 1

    extra_mean = mean_length - min_length
    if extra_mean > 0:
        lengths = min_length + rng.geometric(1.0 / (extra_mean + 1), size=num_users) - 1
    else:
        lengths = np.full(num_users, min_length)
    lengths = np.minimum(lengths, num_items // 2)  # room to avoid repeats

    users_out, items_out, times_out = [], [], []
    for u in range(num_users):
        n = int(lengths[u])
        topic = int(rng.integers(num_topics))
        seen = set()
        seq = np.empty(n, dtype=np.int64)
        u_drift = rng.random(n)
        u_jump = rng.random(n)
        u_noise = rng.random(n)
        for k in range(n):
            for _ in range(50):
                if u_noise[k] < noise:
                    item = int(global_items[min(int(np.searchsorted(global_cdf, rng.random())), num_items - 1)])
                else:
                    members = topic_items[topic]
                    idx = int(np.searchsorted(topic_cdfs[topic], rng.random()))
                    item = int(members[min(idx, len(members) - 1)])
                if item not in seen:
                    break
            else:
                # The popular part of the topic is used up: take any unseen item of the topic,
                # or of the corpus, so that a user never repeats an item.
                pool = [int(i) for i in topic_items[topic] if int(i) not in seen] or \
                    [int(i) for i in global_items if int(i) not in seen]
                item = pool[int(rng.integers(len(pool)))]
            seen.add(item)
            seq[k] = item
            if u_drift[k] < drift:
                topic = (topic + 1) % num_topics if u_jump[k] >= jump else int(rng.integers(num_topics))
        t0 = start_time + rng.random() * span_s / 4
        times = t0 + np.cumsum(rng.exponential(gap, size=n))
        users_out.append(np.full(n, u + 1, dtype=np.int64))
        items_out.append(seq)
        times_out.append(times.astype(np.int64))
    info = {"generator": "synthetic_event_stream", "seed": str(seed), "num_items": str(num_items),
            "num_topics": str(num_topics), "zipf_exponent": str(zipf_exponent), "drift": str(drift)}
    return from_events(np.concatenate(users_out), np.concatenate(items_out), np.concatenate(times_out),
                       name="synthetic", info=info)
