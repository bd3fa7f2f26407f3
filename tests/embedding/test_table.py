"""Behaviour of DynamicEmbeddingTable: ids, defaults, growth, admission, eviction, change
tracking, deterministic initialisation and bad input (which must leave the table unchanged)."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.embedding import (
    DynamicEmbeddingTable,
    DynamicTableConfig,
    LRUEviction,
    OptimizerConfig,
    ScoreEviction,
    SparseOptimizer,
    ReplicatedTableError,
    TableFullError,
    UnknownIdError,
)
from gauss_plugins.embedding.initializers import deterministic_uniform


def make(backend, **kw) -> DynamicEmbeddingTable:
    kw.setdefault("name", "t")
    kw.setdefault("dim", 4)
    return DynamicEmbeddingTable(DynamicTableConfig(backend=backend, **kw))


def snapshot(table):
    tensors, meta = table.export_state()
    return {k: v.clone() for k, v in tensors.items()}, {k: v for k, v in meta.items()}


def assert_same_state(a, b):
    assert a[1] == b[1]
    assert set(a[0]) == set(b[0])
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k


def test_any_int64_id_and_no_collisions(backend):
    t = make(backend, initial_capacity=2)
    ids = torch.tensor([0, -1, 1, -(2**63), 2**63 - 1, 2**32, -(2**32), 12345678901234])
    t.train()
    with torch.no_grad():
        t(ids)
    assert len(t) == 8 and t.capacity >= 8
    rows = t.find(ids)
    assert torch.unique(rows).numel() == 8
    vals, present = t.get(ids)
    assert bool(present.all())
    assert torch.unique(vals, dim=0).shape[0] == 8  # distinct ids, distinct rows, distinct values


def test_eval_never_inserts_and_defaults(backend):
    t = make(backend)
    t.eval()
    out = t(torch.tensor([[1, 2], [3, 4]]))
    assert out.shape == (2, 2, 4) and len(t) == 0
    assert torch.equal(out, torch.zeros(2, 2, 4))
    u = make(backend, default="unknown")
    u.eval()
    out = u(torch.tensor([7, 8]))
    assert torch.equal(out[0], out[1]) and out.abs().sum() > 0
    assert torch.equal(out[0], u.default_value())


def test_unknown_row_is_trained_for_not_admitted_ids(backend):
    t = make(backend, default="unknown", admission="counting", admission_options={"min_count": 3},
             optimizer=OptimizerConfig("sgd", lr=1.0))
    opt = SparseOptimizer(t)
    before = t.default_value()
    t(torch.tensor([5])).sum().backward()
    opt.step()
    assert len(t) == 0
    torch.testing.assert_close(t.default_value(), before - 1.0)
    z = make(backend, admission="counting", admission_options={"min_count": 3}, optimizer="sgd")
    opt = SparseOptimizer(z)
    out = z(torch.tensor([5]))
    assert torch.equal(out, torch.zeros(1, 4))
    out.sum().backward()
    opt.step()  # the zeros default receives no update
    assert torch.equal(z.default_value(), torch.zeros(4))


def test_counting_admission_after_n_sightings(backend):
    t = make(backend, admission="counting", admission_options={"min_count": 3})
    t.train()
    with torch.no_grad():
        t(torch.tensor([1, 2, 2]))
        assert len(t) == 0
        t(torch.tensor([1, 2]))
        assert t.contains(torch.tensor([1, 2])).tolist() == [False, True]
        t(torch.tensor([1]))
        assert t.contains(torch.tensor([1])).tolist() == [True]


def test_probability_admission_is_deterministic_and_roughly_p(backend):
    def run():
        t = make(backend, admission="probability", admission_options={"p": 0.25, "seed": 3}, initial_capacity=4096)
        t.train()
        with torch.no_grad():
            t(torch.arange(4000))
        return t.find(torch.arange(4000)) >= 0

    a, b = run(), run()
    assert torch.equal(a, b)
    assert 0.2 < a.float().mean().item() < 0.3


def test_growth_keeps_values_and_stops_at_max_capacity(backend):
    t = make(backend, initial_capacity=4, max_capacity=20)
    t.train()
    with torch.no_grad():
        t(torch.arange(3))
        first = t.get(torch.arange(3))[0]
        t(torch.arange(3, 12))
        assert t.capacity == 12 and len(t) == 12
        assert torch.equal(t.get(torch.arange(3))[0], first)
        t(torch.arange(12, 20))
        assert t.capacity == 20
        before = snapshot(t)
        with pytest.raises(TableFullError, match="max_capacity.*eviction"):
            t(torch.tensor([100, 101]))
    # rows, values and optimizer state are unchanged (the lookup itself still counts)
    after = snapshot(t)
    for k in before[0]:
        if k.startswith(("index.", "weight", "opt.")):
            assert torch.equal(before[0][k], after[0][k]), k


def test_initial_values_are_a_function_of_seed_and_id(backend):
    a = make(backend, seed=7, dim=16, init_min=-0.1, init_max=0.1)
    b = make("torch", seed=7, dim=16, init_min=-0.1, init_max=0.1, initial_capacity=3)
    a.train(); b.train()
    ids = torch.tensor([9, -4, 2**62, 5])
    with torch.no_grad():
        a(ids)
        b(ids.flip(0))  # other order, other rows, other backend
    assert torch.equal(a.get(ids)[0], b.get(ids)[0])  # bit-identical
    assert torch.equal(a.get(ids)[0], deterministic_uniform(ids, 16, 7, -0.1, 0.1))
    v = a.get(ids)[0]
    assert v.min() >= -0.1 and v.max() < 0.1 and v.std() > 0.03
    c = make(backend, seed=8, dim=16)
    c.train()
    with torch.no_grad():
        c(ids)
    assert not torch.equal(c.get(ids)[0], a.get(ids)[0])
    n = make(backend, initializer="normal", init_std=0.5, dim=256)
    n.train()
    with torch.no_grad():
        n(torch.arange(200))
    vals = n.get(torch.arange(200))[0]
    assert abs(vals.mean().item()) < 0.02 and abs(vals.std().item() - 0.5) < 0.02


def test_cpu_kernel_init_is_bit_identical_to_torch():
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():
        pytest.skip(cpu_ext.unavailable_reason())
    ops = cpu_ext.load_ops()
    ids = torch.cat([torch.randint(-(2**63), 2**63 - 1, (500,)), torch.tensor([-(2**63), 2**63 - 1, 0])])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.zeros(ids.numel(), 33, dtype=dtype)
        ops.init_uniform(w, torch.arange(ids.numel()), ids, -3, -0.37, 0.2)
        assert torch.equal(w, deterministic_uniform(ids, 33, -3, -0.37, 0.2).to(dtype)), dtype


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_lru_and_lfu_evict_the_right_rows(backend, policy):
    t = make(backend, initial_capacity=4, max_capacity=4, eviction=policy, evict_fraction=0.0,
             optimizer=OptimizerConfig("sgd", lr=0.1))
    opt = SparseOptimizer(t)
    t.train()
    v0 = t.version

    def step(ids):  # a training step: read, then update, the rows
        t(torch.tensor(ids)).sum().backward()
        opt.step()
        opt.zero_grad()

    step([1, 2, 3, 4])
    step([1, 1, 1, 3, 3])  # 1 and 3: recent and frequent
    step([4])              # 4: most recent, once more
    step([10, 11])         # two new ids need two rows
    live = set(t.index.keys_and_rows()[0].tolist())
    if policy == "lru":
        assert live == {3, 4, 10, 11}  # 2 is oldest; 1 and 3 were touched at the same step: ties by id
    else:
        assert live == {1, 3, 10, 11}  # counts: 1 -> 4, 2 -> 1, 3 -> 3, 4 -> 2
    gone = t.evicted_since(v0)
    assert gone.tolist() == sorted({1, 2, 3, 4} - live)


def test_lru_ignores_reads_without_updates(backend):
    """LRU orders rows by their last insert/update/write: eval reads, and training reads
    whose gradient never reaches the optimizer, do not refresh a row."""
    t = make(backend, initial_capacity=3, max_capacity=3, eviction="lru", evict_fraction=0.0)
    t.train()
    with torch.no_grad():
        t(torch.tensor([1, 2, 3]))
        t(torch.tensor([1]))
        t.set(torch.tensor([2]), torch.ones(1, 4))  # a write is a touch
        t(torch.tensor([9]))
    assert set(t.index.keys_and_rows()[0].tolist()) == {2, 3, 9}


def test_lru_protects_ids_of_the_current_batch(backend):
    t = make(backend, initial_capacity=3, max_capacity=3, eviction="lru", evict_fraction=0.0)
    t.train()
    with torch.no_grad():
        t(torch.tensor([1, 2, 3]))
        t(torch.tensor([1, 50]))  # 1 is the oldest by tie-break but is in the batch: 2 goes
    assert set(t.index.keys_and_rows()[0].tolist()) == {1, 3, 50}
    with pytest.raises(TableFullError, match="single batch"):
        with torch.no_grad():
            t(torch.tensor([7, 8, 9, 10]))


def test_ttl_in_steps_and_auto_evict(backend):
    t = make(backend, eviction="ttl", eviction_options={"ttl": 2, "unit": "steps"}, auto_evict_every=1)
    t.train()
    with torch.no_grad():
        t(torch.tensor([1, 2]))   # step 1
        t(torch.tensor([2]))      # step 2
        t(torch.tensor([2]))      # step 3
        assert t.contains(torch.tensor([1, 2])).tolist() == [True, True]
        t(torch.tensor([2]))      # step 4: 1 unused for 3 > 2 steps
    assert t.contains(torch.tensor([1, 2])).tolist() == [False, True]
    s = make(backend, eviction="ttl", eviction_options={"ttl": 1000, "unit": "seconds"})
    s.train()
    with torch.no_grad():
        s(torch.tensor([1]))
    assert s.evict().numel() == 0
    s.eviction.rows["last_seen"][:] -= 2000  # pretend the row was read 2000 s ago
    assert s.evict().tolist() == [1]


def test_custom_score_eviction(backend):
    # evict the rows with the largest first coordinate first
    policy = ScoreEviction(lambda ids, rows, table: -table.weight[rows, 0].float())
    t = make(backend, initial_capacity=5, max_capacity=5, eviction=policy, evict_fraction=0.0)
    t.train()
    ids = torch.arange(5)
    with torch.no_grad():
        t(ids)
    first = t.get(ids)[0][:, 0]
    victims = t.evict(num=2)
    assert sorted(victims.tolist()) == sorted(ids[first.argsort(descending=True)[:2]].tolist())
    assert len(t) == 3


def test_policies_resolve_through_the_registry(backend):
    t = make(backend, eviction="lru", admission="counting", admission_options={"min_count": 2})
    assert isinstance(t.eviction, LRUEviction)
    assert t.admission.min_count == 2
    with pytest.raises(KeyError, match="no eviction_policy named 'nope'"):
        make(backend, eviction="nope")


def test_change_tracking(backend):
    t = make(backend, optimizer=OptimizerConfig("sgd", lr=0.1), eviction="lru")
    opt = SparseOptimizer(t)
    t.train()
    v0 = t.version
    t(torch.tensor([1, 2, 3])).sum().backward()
    opt.step(); opt.zero_grad()
    ids, values, state = t.changed_since(v0)
    assert ids.tolist() == [1, 2, 3] and values.shape == (3, 4) and state == {}
    assert torch.equal(values.float(), t.get(ids)[0])
    v1 = t.version
    assert t.changed_since(v1)[0].numel() == 0
    t.set(torch.tensor([3, 9]), torch.ones(2, 4))
    t.delete(torch.tensor([2, 77]))
    assert t.changed_since(v1)[0].tolist() == [3, 9]
    assert t.evicted_since(v1).tolist() == [2]
    assert t.evicted_since(v0).tolist() == [2]
    v2 = t.version
    with torch.no_grad():
        t(torch.tensor([2]))  # re-inserted: no longer reported as evicted
    assert t.evicted_since(v0).tolist() == []
    assert t.changed_since(v2)[0].tolist() == [2]
    assert t.version > v2
    t.trim_tombstones(t.version)
    with pytest.raises(ValueError, match="resync"):
        t.evicted_since(v0)


def test_set_get_delete(backend):
    t = make(backend, optimizer=OptimizerConfig("adagrad"))
    ids = torch.tensor([4, -4])
    t.set(ids, torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), optimizer_state={"sum": torch.full((2, 4), 0.5)})
    vals, present = t.get(torch.tensor([-4, 4, 0]))
    assert present.tolist() == [True, True, False]
    assert vals[0].tolist() == [5, 6, 7, 8] and vals[2].tolist() == [0, 0, 0, 0]
    assert torch.equal(t.changed_since(0)[2]["sum"], torch.full((2, 4), 0.5))
    assert t.delete(torch.tensor([4, 4, 5])).tolist() == [True, True, False]
    assert len(t) == 1


def _bad_calls(t):
    yield TypeError, "float ids", lambda: t(torch.tensor([1.0, 2.0]))
    yield TypeError, "int64", lambda: t(torch.tensor([1, 2], dtype=torch.int32))
    yield TypeError, "torch.Tensor", lambda: t([1, 2])
    yield ValueError, "1-D", lambda: t.lookup_pooled(torch.tensor([[1, 2]]), torch.tensor([0, 2]))
    yield ValueError, "end at len", lambda: t.lookup_pooled(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    yield ValueError, "start at 0", lambda: t.lookup_pooled(torch.tensor([1, 2]), torch.tensor([1, 2]))
    yield ValueError, "non-decreasing", lambda: t.lookup_pooled(torch.tensor([1, 2]), torch.tensor([0, 2, 1, 2]))
    yield TypeError, "offsets", lambda: t.lookup_pooled(torch.tensor([1, 2]), torch.tensor([0.0, 2.0]))
    yield ValueError, "mode", lambda: t.lookup_pooled(torch.tensor([1, 2]), torch.tensor([0, 2]), mode="max")
    yield ValueError, "per_sample_weights", lambda: t.lookup_pooled(
        torch.tensor([1, 2]), torch.tensor([0, 2]), per_sample_weights=torch.ones(3))
    yield ValueError, "mode='sum'", lambda: t.lookup_pooled(
        torch.tensor([1, 2]), torch.tensor([0, 2]), mode="mean", per_sample_weights=torch.ones(2))
    yield ValueError, "shape", lambda: t.set(torch.tensor([1, 2]), torch.ones(2, 5))
    yield ValueError, "distinct", lambda: t.set(torch.tensor([1, 1]), torch.ones(2, 4))
    yield ValueError, "optimizer_state", lambda: t.set(torch.tensor([1]), torch.ones(1, 4), {"nope": torch.ones(1)})
    yield TypeError, "float ids", lambda: t.delete(torch.tensor([1.5]))
    yield ValueError, "table is on cpu", lambda: t(torch.tensor([1], device="meta"))
    yield ValueError, "offsets are on meta", lambda: t.lookup_pooled(torch.tensor([1]), torch.tensor([0, 1], device="meta"))
    if torch.cuda.is_available():
        yield ValueError, "table is on cpu", lambda: t(torch.tensor([1], device="cuda"))
    # Ids that int64 cannot hold exactly (uint64 above 2**63 - 1 would wrap to -1), or that are
    # not integers, are refused by every entry point.
    yield TypeError, "wraps uint64", lambda: t(torch.tensor([2**64 - 1], dtype=torch.uint64))
    entries = (t, t.lookup, t.find, t.contains, t.get, t.remap, t.delete, lambda i: t.evict(ids=i),
               lambda i: t.set(i, torch.ones(2, 4)), lambda i: t.lookup_pooled(i, torch.tensor([0, 2])))
    bad_ids = (torch.tensor([2**64 - 1, 1], dtype=torch.uint64), torch.tensor([1, 2], dtype=torch.uint32),
               torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([True, False]),
               torch.tensor([1.0, 2.0], dtype=torch.float64))
    for entry in entries:
        for ids in bad_ids:
            yield TypeError, "must have dtype torch.int64", lambda e=entry, i=ids: e(i)


def test_bad_input_raises_clearly_and_changes_nothing(backend):
    t = make(backend, optimizer=OptimizerConfig("adagrad"), eviction="lru")
    t.train()
    with torch.no_grad():
        t(torch.tensor([1, 2, 3]))
    before = snapshot(t)
    for exc, match, call in _bad_calls(t):
        with pytest.raises(exc, match=match):
            call()
        assert_same_state(before, snapshot(t))
    t.eval()
    for exc, match, call in _bad_calls(t):
        with pytest.raises(exc, match=match):
            call()
    assert_same_state(before, snapshot(t))


def test_memory_report(backend):
    t = make(backend, initial_capacity=3000, max_capacity=3000, eviction="lru", dim=8)
    t.train()
    with torch.no_grad():
        t(torch.arange(3000))
    rep = t.memory_report()
    assert rep["load_factor"] == pytest.approx(0.75, abs=0.01)
    # 16 B index (12-byte slots at 0.75) + 4 B version stamp + 8 B row -> id (change tracking);
    # LRU reads the version stamp
    assert rep["overhead_bytes_per_row"] == pytest.approx(28, abs=0.1)
    lfu = make(backend, initial_capacity=3000, max_capacity=3000, eviction="lfu", dim=8)
    lfu.train()
    with torch.no_grad():
        lfu(torch.arange(3000))
    assert lfu.memory_report()["overhead_bytes_per_row"] == pytest.approx(32, abs=0.1)  # + 4 B count


@pytest.mark.parametrize("policy", ["lru", "lfu", "ttl"])
def test_fused_victim_selection_matches_the_torch_path(policy):
    """The C++ selection (histogram threshold, ties by id) picks exactly what the torch code picks."""
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():
        pytest.skip(cpu_ext.unavailable_reason())
    g = torch.Generator().manual_seed(5)
    t = make("cpu_ext", initial_capacity=3000, max_capacity=3000, eviction=policy, dim=2)
    t.train()
    with torch.no_grad():
        for _ in range(40):
            t(torch.randint(-2000, 2000, (300,), generator=g) * 7919)
        t.delete(torch.arange(-300, 300) * 7919)  # free some rows
    protect = t.find(torch.arange(-100, 100) * 7919)
    protect = protect[protect >= 0]
    fused = t.index.fused
    for k in (1, 17, 500, 2500, 10_000):
        got = t._select_victims(k, protect)
        t.index.fused = None
        try:
            want = t._select_victims(k, protect)
        finally:
            t.index.fused = fused
        assert torch.equal(got, want), k
    if policy == "lfu":  # a wide score range takes the nth_element path
        t.eviction.rows["count"][:] = torch.randint(0, 2**30, (t.capacity + 1,), dtype=torch.int32, generator=g)
        got = t._select_victims(700, protect)
        t.index.fused = None
        want = t._select_victims(700, protect)
        t.index.fused = fused
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["default", "init", "error"])
def test_eval_unknown_decides_what_unseen_ids_read(backend, policy, dtype):
    t = make(backend, eval_unknown=policy, dtype=dtype, init_min=-1.0, init_max=1.0)
    t(torch.tensor([1, 2]))
    known = t.get(torch.tensor([1, 2]))[0]
    t.eval()
    ids, offsets = torch.tensor([1, 7, 2, 7, 8]), torch.tensor([0, 2, 2, 5])
    before = snapshot(t)
    if policy == "error":
        for call in (lambda: t(ids), lambda: t.lookup_pooled(ids, offsets)):
            with pytest.raises(UnknownIdError, match=r"no row for 2 id\(s\), e.g. \[7, 8\].*eval_unknown='default'"):
                call()
        assert_same_state(before, snapshot(t))
        assert t(torch.tensor([2, 1])).shape == (2, 4)  # known ids read fine
        return
    rows = t(ids)
    pooled = t.lookup_pooled(ids, offsets)
    mean = t.lookup_pooled(ids, offsets, mode="mean")
    assert_same_state(before, snapshot(t))  # eval never inserts, whatever the policy
    if policy == "default":
        expected_unseen = torch.zeros(2, 4)
    else:
        t.train()
        t(torch.tensor([7, 8]))  # what training would insert for them
        expected_unseen = t.get(torch.tensor([7, 8]))[0]
        assert not torch.equal(expected_unseen, torch.zeros(2, 4))
    torch.testing.assert_close(rows, torch.stack([known[0], expected_unseen[0], known[1], expected_unseen[0],
                                                  expected_unseen[1]]), rtol=0, atol=0)
    torch.testing.assert_close(pooled, torch.stack([known[0] + expected_unseen[0], torch.zeros(4),
                                                    known[1] + expected_unseen[0] + expected_unseen[1]]))
    torch.testing.assert_close(mean[2], pooled[2] / 3)


def test_eval_unknown_is_validated_and_serialised(backend):
    with pytest.raises(ValueError, match="eval_unknown must be 'default'.*'init'.*'error', got 'zeros'"):
        make(backend, eval_unknown="zeros")
    t = make(backend, eval_unknown="error")
    assert DynamicTableConfig.from_json(t.config.to_json()).eval_unknown == "error"


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_all_bags_empty_steps_to_a_zero_gradient(backend, optimizer):
    """A pooled lookup whose bags are all empty has no ids but one (zero) output gradient a
    bag: the step applies nothing for it, alone or beside another lookup's gradient."""
    t = make(backend, optimizer=optimizer)
    opt = SparseOptimizer(t)
    t(torch.tensor([1, 2]))
    before = snapshot(t)
    empty, offsets = torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0, 0])
    (t.lookup_pooled(empty, offsets) + 1.0).pow(2).sum().backward()
    opt.step()
    assert not t.has_pending_grads
    for k in before[0]:
        if k == "weight" or k.startswith("opt."):
            assert torch.equal(before[0][k], snapshot(t)[0][k]), k
    # Beside a lookup that does have ids: only that lookup's rows move.
    row1 = t.get(torch.tensor([1]))[0]
    loss = t.lookup_pooled(empty, offsets).sum() + t(torch.tensor([2])).sum()
    loss.backward()
    opt.step()
    assert torch.equal(t.get(torch.tensor([1]))[0], row1)


@pytest.fixture
def fake_world_of_2():
    """An in-process fake process group of world size 2 (no other process needed): what a
    table sees inside DDP / DistributedModelParallel; torn down afterwards.
    tests/torchrec/test_torchrec_distributed.py runs real DDP and DMP on a gloo world of 2."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_training_lookups_refuse_a_multi_rank_group(backend, fake_world_of_2):
    t = make(backend, optimizer="sgd")
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    before = snapshot(t)
    for call in (lambda: t(ids), lambda: t.lookup_pooled(ids, offsets), lambda: t.remap(ids)):
        with pytest.raises(ReplicatedTableError, match="world size 2.*each rank would train its own diverging"):
            call()
        assert_same_state(before, snapshot(t))
    t.eval()
    assert t(ids).shape == (3, 4) and t.lookup_pooled(ids, offsets).shape == (2, 4)
    assert_same_state(before, snapshot(t))


def test_world_size_1_trains(backend):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        t = make(backend)
        t(torch.tensor([1, 2]))
        assert len(t) == 2
    finally:
        dist.destroy_process_group()


def test_stores_refuse_uint64_ids_instead_of_wrapping():
    import numpy as np

    from gauss_plugins.stores.base import as_ids

    for ids in (np.array([2**64 - 1], dtype=np.uint64), torch.tensor([3], dtype=torch.uint64)):
        with pytest.raises(TypeError, match="uint64 ids above 2\\*\\*63 - 1 would wrap"):
            as_ids(ids)
    assert as_ids(np.array([7], dtype=np.uint32)).tolist() == [7]  # exact in int64: accepted


def test_change_log_bytes_count_a_shared_chunk_once():
    """The masked (sync-free) step of a small table files the same all-rows tensor every step:
    memory_report counts the bytes the log holds, not that tensor once per step. (The torch
    index takes the dense-sum step the CUDA tables take; the C++ index has its fused one.)"""
    from gauss_plugins.embedding.optim import SparseOptimizer

    t = make("torch", initial_capacity=64, max_capacity=64, dim=4, optimizer="sgd")
    t.sync_free_step = True  # the CUDA default, here on the CPU (the same torch code)
    opt = SparseOptimizer([t], lr=0.1)
    ids = torch.arange(40)
    for _ in range(5):
        t(ids).sum().backward()
        opt.step()
    n_rows = t.weight.shape[0]
    chunks = list(t._changes._chunks)
    assert sum(c[1].numel() == n_rows for c in chunks) == 5, "each step must file the all-rows chunk"
    log_bytes = t.memory_report()["change_log_bytes"] - t._scratch.nbytes()
    assert log_bytes == n_rows * 8 + 40 * 8 + 40 * 8  # the all-rows chunk once, the insertion's rows and ids
