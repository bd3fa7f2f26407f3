"""Victim selection by a sweep (eviction option ``sweep``, the default with the compiled index;
issue 10: a bounded, cheap eviction round) and the two-pass removal from the C++ index.

The compiled op is compared with a Python reference (same random stream for the threshold,
same hand movement); at the table, sweep rounds must keep every eviction invariant, pick
rows from the policy's lowest ``1/sample_factor`` quantile (checked against the exact
quantile), repeat run to run for a seeded table, and fall back to the random sample when
the sweep finds too few rows.
"""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer
from gauss_plugins.embedding.tracking import SWEEP_PROBE_ROWS

_M64 = (1 << 64) - 1


def _cpu_ops():
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():
        pytest.skip(f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}")
    return cpu_ext.load_ops()


def _fmix64(h):
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _sweep_reference(stamp, scores, row_ids, protect, pos, hand, limit, k, probe, div, max_scan):
    """sweep_victims in Python: (sorted (id, row) victims, new stream position, new hand)."""
    if k == 0:
        return [], pos, hand
    runs, blocks = (probe + 7) // 8, (limit + 7) // 8
    vals = []
    for i in range(runs):
        x = _fmix64(((pos + i + 1) * 0x9E3779B97F4A7C15) & _M64)
        start = (((x >> 32) * blocks) >> 32) * 8
        vals += [int(scores[r]) for r in range(start, min(start + 8, limit)) if stamp[r] >= 0]
    pos += runs
    if not vals:
        return [], pos, hand
    t = sorted(vals)[max(1, len(vals) // div) - 1]
    protected = {int(p) for p in protect.tolist() if 0 <= p < limit}
    h = hand % limit
    out, new_hand = [], (h + min(max_scan, limit)) % limit
    for j in range(min(max_scan, limit)):
        r = (h + j) % limit
        if stamp[r] >= 0 and scores[r] <= t and r not in protected:
            out.append(r)
            if len(out) == k:
                new_hand = (r + 1) % limit
                break
    return sorted((int(row_ids[r]), r) for r in out), pos, new_hand


@pytest.mark.parametrize("lfu", [False, True])
def test_compiled_sweep_matches_the_reference_and_refuses_bad_input(lfu):
    ops = _cpu_ops()
    g = torch.Generator().manual_seed(11)
    limit = 3001  # not a multiple of the run length
    stamp = torch.randint(-1, 400, (limit + 1,), generator=g, dtype=torch.int32)  # -1: no key
    scores = torch.randint(0, 50, (limit + 1,), generator=g, dtype=torch.int32) if lfu else None
    score_of = stamp if scores is None else scores
    row_ids = torch.randperm(10 * limit, generator=g)[: limit + 1] - 5 * limit  # ids of both signs
    protect = torch.cat([torch.randint(0, limit, (600,), generator=g), torch.tensor([-1, limit + 5])])
    state, hand = torch.tensor([777], dtype=torch.int64), torch.tensor([2500], dtype=torch.int64)
    # rounds that wrap past the last row, stop at the scan limit, take nothing, and a k past
    # the radix sort's threshold (256)
    for k, probe, div, max_scan in ((40, 512, 8, 10**6), (300, 1024, 4, 10**6), (25, 64, 16, 200), (0, 64, 2, 10),
                                    (60, 256, 2, 0), (5, 8, 1, 50)):
        want, pos, new_hand = _sweep_reference(stamp, score_of, row_ids, protect, int(state), int(hand), limit, k,
                                               probe, div, max_scan)
        ids, rows = ops.sweep_victims(stamp, scores, row_ids, protect, state, hand, limit, k, probe, div, max_scan)
        assert list(zip(ids.tolist(), rows.tolist())) == want
        assert (int(state), int(hand)) == (pos, new_hand)
    # ids that repeat (not a table's state, but the op's promise): (id, row) order exactly
    # (a hand near the end: rows past the wrap come after higher rows with the same id)
    repeated = torch.arange(limit + 1) % 50 - 20
    want, _, _ = _sweep_reference(stamp, score_of, repeated, protect, 5, 2000, limit, 400, 1024, 2, 10**6)
    ids, rows = ops.sweep_victims(stamp, scores, repeated, protect, torch.tensor([5]), torch.tensor([2000]), limit,
                                  400, 1024, 2, 10**6)
    assert len(want) == 400 and list(zip(ids.tolist(), rows.tolist())) == want
    # bad input: a clear error, and the stream, the hand and the stamps are unchanged
    before = stamp.clone()
    state, hand = torch.tensor([7], dtype=torch.int64), torch.tensor([3], dtype=torch.int64)
    good = dict(stamp=stamp, scores=scores, row_ids=row_ids, protect=protect, rng_state=state, hand=hand, limit=limit,
                k=4, probe=64, quantile_div=8, max_scan=100)
    for bad in (dict(stamp=stamp.to(torch.int64)), dict(limit=limit + 5), dict(k=-1), dict(quantile_div=0),
                dict(max_scan=-1), dict(probe=0), dict(hand=torch.zeros(2, dtype=torch.int64)),
                dict(row_ids=row_ids[:10]), dict(scores=torch.zeros(limit + 1))):
        with pytest.raises(RuntimeError):
            ops.sweep_victims(*{**good, **bad}.values())
        assert (int(state), int(hand)) == (7, 3) and torch.equal(stamp, before)


def _table(n, policy="lru", factor=8, sweep=True, seed=0, **kw):
    opts = {"sample_factor": factor, "exact_below": 0, "sweep": sweep}
    if policy == "ttl":
        opts["ttl"] = 10 ** 6
    return DynamicEmbeddingTable(DynamicTableConfig(
        name="t", dim=4, initial_capacity=n, max_capacity=n, backend="cpu_ext", eviction=policy, evict_fraction=0.0,
        eviction_options=opts, optimizer=OptimizerConfig("adagrad", lr=0.1), seed=seed, **kw))


def _train_step(t, opt, ids):
    t.train()
    t(torch.as_tensor(ids, dtype=torch.int64)).sum().backward()
    opt.step()
    opt.zero_grad()


def _scrambled(t, n, g):
    """Fill ids 0..n-1 and give their rows the scores 1..n in random order: scores unrelated
    to row order (a sweep in row order then sees what a random sample would)."""
    t.set(torch.arange(n), torch.zeros(n, 4))
    rows = t.find(torch.arange(n))
    t.eviction.score_array()[rows] = torch.randperm(n, generator=g).to(torch.int32) + 1


@pytest.mark.parametrize("policy", ["lru", "lfu", "ttl"])
@pytest.mark.parametrize("scrambled", [True, False])
def test_sweep_victims_lie_in_the_lowest_quantile_and_keep_the_invariants(policy, scrambled):
    _cpu_ops()
    n, factor, k = 200_000, 8, 2000
    g = torch.Generator().manual_seed(4)
    t = _table(n, policy, factor)
    opt = SparseOptimizer(t)
    if scrambled:
        _scrambled(t, n, g)
    else:  # ids inserted in batches: scores follow row order in long runs
        for s in range(0, n, 10_000):
            t.set(torch.arange(s, s + 10_000), torch.zeros(10_000, 4))
    for round_ in range(6):
        # what the round sees: live rows, their ids and scores
        scores = t.eviction.score_array().clone()
        live = (t.row_stamps[:n] >= 0).nonzero().squeeze(1)
        ids_live, order = t._row_ids[live].sort()
        rows_live = live[order]
        q_score = int(scores[live].sort().values[live.numel() // factor - 1])  # the exact 1/factor quantile
        # the batch: new ids and some of the lowest-scored live ids, which must stay
        low = rows_live[scores[rows_live] <= q_score]
        kept = t._row_ids[low[torch.randperm(low.numel(), generator=g)[:1500]]]
        new = torch.arange(10**7 + round_ * k, 10**7 + (round_ + 1) * k)
        v = t.version
        _train_step(t, opt, torch.cat([new, kept]))
        victims = t.evicted_since(v)
        assert victims.numel() == k and len(t) == n
        assert not t.contains(victims).any() and t.contains(new).all() and t.contains(kept).all()
        victim_rows = rows_live[torch.searchsorted(ids_live, victims)]
        assert torch.equal(ids_live[torch.searchsorted(ids_live, victims)], victims)
        # every victim's score (when the round ran) lies in the lowest 1/factor of the table's
        assert int(scores[victim_rows].max()) <= q_score
    assert t.sweep_fallbacks == 0


def test_seeded_tables_sweep_the_same_rows_and_the_sweep_falls_back_when_short():
    _cpu_ops()
    n, k = 50_000, 500

    def run(seed):
        t = _table(n, seed=seed)
        opt = SparseOptimizer(t)
        for s in range(0, n, 1000):  # ids in batches: id i's LRU rank is i // 1000
            t.set(torch.arange(s, s + 1000), torch.zeros(1000, 4))
        out = []
        for r in range(5):
            v = t.version
            _train_step(t, opt, torch.arange(10**6 + r * k, 10**6 + (r + 1) * k))
            out.append(t.evicted_since(v))
        return t, out

    a, va = run(3)
    b, vb = run(3)
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    # the sweep takes the oldest batches first (all under the threshold), in row order
    assert torch.equal(torch.cat(va).sort().values, torch.arange(5 * k))
    # every row under the threshold is in the batch: the sweep finds none it may take, and
    # the round samples instead (still never a row of the batch)
    t, _ = run(3)
    opt = SparseOptimizer(t)
    oldest = torch.arange(5 * k, 5 * k + n // 4)  # far more than the lowest 1/16
    v = t.version
    _train_step(t, opt, torch.cat([oldest, torch.arange(2 * 10**6, 2 * 10**6 + k)]))
    gone = t.evicted_since(v)
    assert t.sweep_fallbacks == 1
    assert gone.numel() == k and not bool(torch.isin(gone, oldest).any()) and t.contains(oldest).all()


def test_sweep_option_is_validated_and_saved():
    with pytest.raises(ValueError, match="eviction option sweep"):
        DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, eviction="lru", eviction_options={"sweep": 1}))
    t = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, eviction="lru", eviction_options={"sweep": False}))
    assert t.eviction.options()["sweep"] is False and t.eviction.sweep is False
    assert SWEEP_PROBE_ROWS >= 1024


def test_two_pass_remove_matches_a_dict_through_repeats_absent_keys_and_full_clusters():
    ops = _cpu_ops()
    from gauss_kernels.hash_table.cpu_ext import CpuHashIndex

    g = torch.Generator().manual_seed(9)
    n = 20_000
    index = CpuHashIndex(n)
    keys = torch.randperm(10 * n, generator=g)[:n] - 3 * n
    rows, _ = index.insert(keys)  # full: the 0.75 load factor, long clusters
    model = dict(zip(keys.tolist(), rows.tolist()))
    for _ in range(4):
        live = torch.tensor(list(model), dtype=torch.int64)
        pick = live[torch.randint(0, live.numel(), (3000,), generator=g)]  # repeats across chunks of 256
        absent = torch.randint(10 * n, 11 * n, (500,), generator=g)
        batch = torch.cat([pick, absent])[torch.randperm(3500, generator=g)]
        got = index.remove(batch).tolist()
        assert got == [model.get(k, -1) for k in batch.tolist()]
        for k in batch.tolist():
            model.pop(k, None)
        assert len(index) == len(model)
        probe = torch.tensor(list(model), dtype=torch.int64)
        assert index.find(probe).tolist() == [model[k] for k in probe.tolist()]
        assert not (index.find(batch) >= 0).any()
        refill = torch.arange(20 * n + len(model), 20 * n + len(model) + (n - len(model)))
        new_rows, _ = index.insert(refill)
        model.update(zip(refill.tolist(), new_rows.tolist()))
    del ops


def test_tombstone_count_follows_appends_trims_and_loads(tmp_path):
    """The tombstone limit is enforced from a running count (summing ~1,500 chunks each
    round cost ~0.6 ms at 10M rows): it must equal the ids held through every change."""
    from gauss_plugins.embedding.checkpoint import load_table, save_table

    def held(t):
        return sum(c.numel() for c in t._tombstone_ids)

    t = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, tombstone_limit=25))
    t.set(torch.arange(100), torch.zeros(100, 4))
    marks = []
    for s in range(0, 60, 10):
        marks.append(t.version)
        t.delete(torch.arange(s, s + 10))
        assert t._tombstone_count == held(t) <= 25 + 10
    assert held(t) == 20  # 25 allows two chunks of 10: the older ones were dropped
    with pytest.raises(ValueError, match="only remembers evictions"):
        t.evicted_since(marks[0])
    assert t.evicted_since(marks[-2]).tolist() == list(range(40, 60))
    save_table(t, tmp_path / "full")
    t.trim_tombstones(marks[-1])  # forget the chunk deleted before the last mark
    assert t._tombstone_count == held(t) == 10
    again = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, tombstone_limit=25))
    load_table(again, [tmp_path / "full"])
    assert again._tombstone_count == held(again) == 20


def test_swept_eviction_writes_back_rows_with_optimizer_state(trains_like_unbounded):
    """Through a backing store, a table that evicts by the sweep trains exactly like an
    unbounded one: every evicted row (and its optimizer state) went to the store."""
    import contextlib

    @contextlib.contextmanager
    def sweep_only(table):
        # every round is a sweep: neither the random sample nor the exact selection runs
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(table.index.fused, "sample_victims", lambda *a: pytest.fail("the sample ran"))
            mp.setattr(table.index.fused, "select_victims", lambda *a: pytest.fail("exact selection ran"))
            yield

    small, _ = trains_like_unbounded({"sample_factor": 2, "exact_below": 0}, during=sweep_only)
    assert small.sweep_fallbacks == 0
