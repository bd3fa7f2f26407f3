"""Victim pre-selection (eviction option ``preselect``, issue 10): the next round's sample is
drawn on a background thread while training runs and checked at the round.

The compiled ops are compared with Python references; at the table, a pre-selected round
must keep every eviction invariant (capacity, the batch's rows protected, evictions
reported, write-back with optimizer state) and must never take a candidate that changed
after the sample read it.
"""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer
from gauss_plugins.embedding.tracking import VictimPreselector


def _cpu_ops():
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():
        pytest.skip(f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}")
    return cpu_ext.load_ops()


def _table(n, policy="lru", preselect=True, factor=8, **kw):
    opts = {"sample_factor": factor, "exact_below": 0, "preselect": preselect}
    if policy == "ttl":
        opts["ttl"] = 10 ** 6
    return DynamicEmbeddingTable(DynamicTableConfig(
        name="t", dim=4, initial_capacity=n, max_capacity=n, backend="cpu_ext", eviction=policy, evict_fraction=0.0,
        eviction_options=opts, optimizer=OptimizerConfig("adagrad", lr=0.1), **kw))


def _fill_in_order(t, n, batch=1000):
    """ids 0..n-1 in batches: id i's LRU rank is i // batch."""
    for s in range(0, n, batch):
        t.set(torch.arange(s, s + batch), torch.zeros(batch, 4))


def _train_step(t, opt, ids):
    t.train()
    t(torch.as_tensor(ids, dtype=torch.int64)).sum().backward()
    opt.step()
    opt.zero_grad()


def _take_reference(stamp, scores, row_ids, rows, stamps, vals, protect, k):
    """take_victims in Python: the first k candidates still as sampled, unprotected, once."""
    protected = {int(p) for p in protect.tolist() if p >= 0}
    seen, out = set(), []
    for r, s, v in zip(rows.tolist(), stamps.tolist(), vals.tolist()):
        if len(out) == k:
            break
        fresh = r not in seen
        seen.add(r)
        if not fresh or r in protected or s < 0 or int(stamp[r]) != s or (scores is not None and int(scores[r]) != v):
            continue
        out.append((int(row_ids[r]), r))
    return sorted(out)


@pytest.mark.parametrize("lfu", [False, True])
def test_compiled_candidates_and_take_match_the_references(lfu):
    ops = _cpu_ops()
    g = torch.Generator().manual_seed(3)
    limit = 2003
    stamp = torch.randint(-1, 60, (limit + 1,), generator=g, dtype=torch.int32)  # -1: no key
    scores = torch.randint(0, 30, (limit + 1,), generator=g, dtype=torch.int32) if lfu else None
    row_ids = torch.randperm(10 * limit, generator=g)[: limit + 1] - 5 * limit
    empty = torch.empty(0, dtype=torch.int64)
    k, m = 60, 480
    # The candidates are sample_victims' sample (same stream) with nothing protected, in (score, row) order.
    s1, s2 = torch.tensor([99], dtype=torch.int64), torch.tensor([99], dtype=torch.int64)
    rows, stamps, vals, by_key = ops.sample_candidates(stamp, scores, row_ids, s1, limit, k, m)
    ids_ref, rows_ref = ops.sample_victims(stamp, scores, row_ids, empty, s2, limit, k, m)
    assert int(s1) == int(s2) and rows.numel() == k
    assert torch.equal(row_ids[rows][by_key], row_ids[rows].sort().values)  # by_key: the candidates by id
    assert sorted(rows.tolist()) == sorted(rows_ref.tolist())
    score_of = stamp if scores is None else scores
    assert torch.equal(vals, score_of[rows]) and torch.equal(stamps, stamp[rows])
    order = list(zip(vals.tolist(), rows.tolist()))
    assert order == sorted(order)
    # Training moves on: some candidates are written (new stamp), removed (-1), re-scored
    # (LFU counts a read), and some are rows of the batch that needs the room.
    stamp2 = stamp.clone()
    stamp2[rows[::7]] = 100
    stamp2[rows[3::11]] = -1
    scores2 = None
    if lfu:
        scores2 = scores.clone()
        scores2[rows[5::9]] += 1
    protect = torch.cat([rows[1::5], torch.tensor([-1, limit])])
    for want_k in (k, 10, 0):
        got_ids, got_rows = ops.take_victims(stamp2, scores2, row_ids, rows, stamps, vals, by_key, protect, want_k)
        want = _take_reference(stamp2, scores2, row_ids, rows, stamps, vals, protect, want_k)
        assert list(zip(got_ids.tolist(), got_rows.tolist())) == want
    assert len(want) == 0 and got_ids.numel() == 0
    # a repeated candidate is taken once; an order that is not by id still gives ids ascending
    twice = torch.cat([rows[:4], rows[:4]])
    ids2, _ = ops.take_victims(stamp, scores, row_ids, twice, torch.cat([stamps[:4]] * 2), torch.cat([vals[:4]] * 2),
                               torch.arange(7, -1, -1), empty, 8)
    assert ids2.tolist() == sorted(row_ids[rows[:4]].tolist())


def test_compiled_preselect_ops_refuse_bad_input_and_change_nothing():
    ops = _cpu_ops()
    limit = 500
    stamp = torch.arange(limit + 1, dtype=torch.int32)
    row_ids = torch.arange(limit + 1, dtype=torch.int64) * 3
    state = torch.tensor([5], dtype=torch.int64)
    before = (stamp.clone(), row_ids.clone())
    for bad in (dict(stamp=stamp.to(torch.int64)), dict(limit=limit + 5), dict(limit=0), dict(k=-1),
                dict(scores=stamp.to(torch.float32)), dict(row_ids=row_ids[:10])):
        args = dict(stamp=stamp, scores=None, row_ids=row_ids, rng_state=state, limit=limit, k=4, m=32)
        args.update(bad)
        with pytest.raises(RuntimeError):
            ops.sample_candidates(*args.values())
        assert int(state) == 5  # the stream did not move
    rows, stamps, vals, by_key = ops.sample_candidates(stamp, None, row_ids, state, limit, 8, 64)
    good = dict(stamp=stamp, scores=None, row_ids=row_ids, cand_rows=rows, cand_stamps=stamps, cand_scores=vals,
                cand_by_key=by_key, protect=torch.empty(0, dtype=torch.int64), k=8)
    for bad, msg in ((dict(cand_rows=torch.tensor([0, 1, limit + 1, 3, 4, 5, 6, 7])), "outside"),
                     (dict(cand_rows=rows[:3]), "differ in length"),
                     (dict(cand_stamps=stamps.to(torch.int64)), "candidates must be"),
                     (dict(cand_by_key=torch.zeros(8, dtype=torch.int64)), "permutation"),
                     (dict(cand_by_key=by_key.to(torch.int32)), "cand_by_key must be int64"),
                     (dict(row_ids=row_ids[:10]), "row_ids"),
                     (dict(k=-2), "k must be")):
        args = dict(good)
        args.update(bad)
        with pytest.raises(RuntimeError, match=msg):
            ops.take_victims(*args.values())
    assert torch.equal(stamp, before[0]) and torch.equal(row_ids, before[1])


def test_preselect_option_is_validated_and_reported():
    with pytest.raises(ValueError, match="preselect must be True or False"):
        DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, eviction="lru",
                                                 eviction_options={"preselect": "yes"}))
    t = _table(1000)
    assert t.eviction.options()["preselect"] is True
    assert _table(1000, preselect=False).eviction.options()["preselect"] is False


@pytest.mark.parametrize("policy", ["lru", "lfu", "ttl"])
def test_preselected_rounds_keep_the_invariants_and_the_order(policy):
    _cpu_ops()
    n, factor = 40_000, 8
    t = _table(n, policy)
    opt = SparseOptimizer(t)
    _fill_in_order(t, n)
    if policy != "lru":  # score = id: the policy's own array
        t.eviction.rows[t.eviction.row_fields[0]][t.find(torch.arange(n))] = torch.arange(n, dtype=torch.int32)
    hot = torch.arange(n - 100, n)
    v0 = t.version
    for step in range(6):
        new = torch.arange(10 ** 6 + 500 * step, 10 ** 6 + 500 * (step + 1))
        v = t.version
        live_ids, live_rows = t.index.keys_and_rows()
        live_scores = t.eviction.score_array()[live_rows].to(torch.float64)  # the policy's scores before the step
        order = live_ids.argsort()
        _train_step(t, opt, torch.cat([new, hot]))
        assert len(t) == n == t.capacity
        victims = t.evicted_since(v)
        assert victims.numel() == 500 and not t.contains(victims).any() and t.contains(new).all()
        assert not bool(torch.isin(victims, hot).any())  # the batch's rows are protected
        # approximate order: the 500 lowest of ~4,000 sampled rows lie in the lowest ~1/8 by score
        at = order[torch.searchsorted(live_ids[order], victims)]
        assert torch.equal(live_ids[at], victims)
        assert float(live_scores[at].max()) <= float(torch.quantile(live_scores, 0.25))
    pre = t._victim_preselector
    assert pre is not None and pre.rounds_preselected == 5 and pre.rounds_synchronous == 0  # round 1 has none yet
    assert t.evicted_since(v0).numel() == 3000 == torch.unique(t.evicted_since(v0)).numel()
    pre.close()


def test_a_candidate_changed_after_the_sample_is_never_taken():
    _cpu_ops()
    n = 20_000
    t = _table(n)
    _fill_in_order(t, n)
    pre = VictimPreselector(seed=1)
    pre.prepare(t, 200)
    (rows, stamps, scores, _), _ = pre._pending[0].result()  # the candidates, in (score, row) order
    ids = t._row_ids[rows]
    written = ids[:50]           # written after the sample: a newer stamp
    t.set(written, torch.ones(50, 4))
    removed = ids[50:60]         # removed, then inserted again (a newer stamp in a new row)
    t.delete(removed)
    t.set(removed, torch.ones(10, 4))
    protected_rows = rows[60:70]  # rows of the batch that needs the room
    got = pre.take(t, 200, protected_rows)
    assert got is not None and got.numel() == 200 and pre.rounds_preselected == 1
    assert torch.equal(got, got.sort().values)
    bad = torch.cat([written, removed, ids[60:70]])
    assert not bool(torch.isin(got, bad).any())
    # the first 200 valid candidates, in the sample's order
    assert torch.equal(got, ids[70:270].sort().values)
    # too few valid candidates left: None, and the caller selects synchronously
    pre.prepare(t, 100)
    (rows, _, _, _), _ = pre._pending[0].result()
    t.set(t._row_ids[rows], torch.ones(rows.numel(), 4))
    assert pre.take(t, 100, None) is None and pre.rounds_synchronous == 1


def test_a_sample_of_replaced_arrays_is_dropped():
    _cpu_ops()
    n = 20_000
    t = DynamicEmbeddingTable(DynamicTableConfig(
        name="t", dim=4, initial_capacity=n, max_capacity=4 * n, backend="cpu_ext", eviction="lru",
        eviction_options={"exact_below": 0, "preselect": True}))
    _fill_in_order(t, n)
    pre = VictimPreselector(seed=1)
    pre.prepare(t, 100)
    t.set(torch.arange(n, n + 10), torch.zeros(10, 4))  # the table grows: new stamp array
    assert t.capacity > n
    assert pre.take(t, 100, None) is None and pre.rounds_synchronous == 1
    assert pre.take(t, 100, None) is None and pre.rounds_synchronous == 1  # nothing pending: not a fallback


def test_preselected_eviction_writes_back_rows_with_optimizer_state(trains_like_unbounded):
    """Through a backing store, a table that evicts by pre-selection trains exactly like an
    unbounded one: every evicted row (and its optimizer state) went to the store."""
    small, _ = trains_like_unbounded({"sample_factor": 2, "exact_below": 0, "preselect": True})
    assert small._victim_preselector.rounds_preselected > 10


def test_a_copied_table_starts_without_a_pending_sample():
    import copy
    import pickle

    pre = VictimPreselector(seed=4)
    t = _table(20_000)
    _fill_in_order(t, 20_000)
    pre.prepare(t, 100)
    for clone in (copy.deepcopy(pre), pickle.loads(pickle.dumps(pre))):
        assert clone._pending is None and clone.take(t, 100, None) is None
    pre.close()
    assert pre._pending is None


def test_a_process_with_a_sample_in_flight_exits_cleanly():
    """The background thread must not keep a process alive or crash it at exit."""
    import subprocess
    import sys

    _cpu_ops()
    code = (
        "import torch\n"
        "from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig\n"
        "t = DynamicEmbeddingTable(DynamicTableConfig(name='t', dim=4, initial_capacity=20000, max_capacity=20000,\n"
        "    backend='cpu_ext', eviction='lru', evict_fraction=0.0,\n"
        "    eviction_options={'exact_below': 0, 'preselect': True}))\n"
        "t.set(torch.arange(20000), torch.zeros(20000, 4))\n"
        "t.set(torch.arange(20000, 20100), torch.zeros(100, 4))  # evicts and starts the next sample\n"
        "assert t._victim_preselector._pending is not None\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
