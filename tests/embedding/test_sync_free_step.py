"""The sync-free optimizer step of small tables (``DynamicEmbeddingTable.sync_free_step``, on by
default on CUDA): every row stepped under a "touched and finite" mask, the finite check a
flag on the device. It must give the listed-rows step's results bit for bit (on CPU, where
both run the same torch arithmetic), leave untouched rows and a bad step's rows exactly as
they were, report a bad step from a later call, and issue no device-to-host sync."""
from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer
from gauss_plugins.embedding.sparse_rules import SparseRule, SparseSGD

DIM = 8
RULES = [
    OptimizerConfig("sgd", lr=0.1, weight_decay=0.01),
    OptimizerConfig("adagrad", lr=0.1, eps=1e-10, initial_accumulator_value=0.1, weight_decay=0.01),
    OptimizerConfig("rowwise_adagrad", lr=0.1, eps=1e-10),
    OptimizerConfig("adam", lr=0.01, eps=1e-8, beta1=0.8, beta2=0.95, weight_decay=0.001),
]
# ops that copy a device value to the host (each one a sync on CUDA)
SYNCING = {"nonzero", "_local_scalar_dense", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
           "argwhere", "equal"}


def _table(cfg, sync_free, name="t", backend="torch", **kw):
    t = DynamicEmbeddingTable(DynamicTableConfig(name=name, dim=DIM, initial_capacity=256, backend=backend,
                                                 optimizer=cfg, init_min=-0.5, init_max=0.5, **kw))
    t.sync_free_step = sync_free
    t.train()
    return t


def _batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(dict(a=torch.randint(-20, 40, (12,), generator=g), b=torch.randint(-20, 40, (3, 4), generator=g),
                        valid=torch.rand(3, 4, generator=g) > 0.3, bag_ids=torch.randint(-20, 40, (10,), generator=g),
                        psw=torch.rand(10, generator=g), w=torch.randn(DIM, generator=g)))
    return out


def _loss(table, x):
    """Two plain lookups (repeats), a masked one and a weighted pooled one."""
    out = (table(x["a"]).sum(0) + table.lookup(x["b"], valid=x["valid"]).sum((0, 1))
           + table.lookup_pooled(x["bag_ids"], torch.tensor([0, 3, 3, 10]), per_sample_weights=x["psw"]).sum(0))
    return (out * x["w"]).sum()


def _snapshot(table):
    return {"weight": table.weight.clone(), "stamps": table.row_stamps.clone(),
            **{f"opt.{k}": v.clone() for k, v in table.opt_state.items()}}


def _assert_same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("default", ["zeros", "unknown"])
@pytest.mark.parametrize("cfg", RULES, ids=lambda c: c.name)
def test_masked_step_is_bit_identical_to_the_listed_rows_step(cfg, default):
    tables = {flag: _table(cfg, flag, default=default) for flag in (True, False)}
    versions = {flag: t.version for flag, t in tables.items()}
    for x in _batches(6):
        for t in tables.values():
            opt = SparseOptimizer(t)
            _loss(t, x).backward()
            opt.step()
            opt.zero_grad()
    masked, listed = tables[True], tables[False]
    _assert_same(_snapshot(masked), _snapshot(listed))
    assert masked.default_row == listed.default_row
    if default == "zeros":
        assert torch.equal(masked.weight[masked.default_row], torch.zeros(DIM))
    # change tracking sees the same rows, though the masked step logs every row of the table
    assert masked.version == listed.version and versions[True] == versions[False]
    for v in (0, versions[True] + 3):
        ids_m, values_m, state_m = masked.changed_since(v)
        ids_l, values_l, state_l = listed.changed_since(v)
        assert ids_m.numel() and torch.equal(ids_m, ids_l) and torch.equal(values_m, values_l)
        _assert_same(state_m, state_l)
    # one more step: each table reports exactly the two rows it trained since its own version
    last = {flag: t.version for flag, t in tables.items()}
    for t in tables.values():
        t(torch.tensor([3, 5, 3])).sum().backward()
        SparseOptimizer(t).step()
    for flag, t in tables.items():
        assert torch.equal(t.changed_since(last[flag])[0], torch.tensor([3, 5])), flag


def test_untouched_rows_keep_values_and_adam_state_exactly():
    table = _table(RULES[3], True)
    opt = SparseOptimizer(table)
    table(torch.tensor([1, 2, 3, 4])).sum().backward()
    opt.step()
    opt.zero_grad()
    rows = table.find(torch.tensor([1, 2, 3, 4]))
    before = _snapshot(table)
    (table(torch.tensor([2, 2])) * 3.0).sum().backward()
    opt.step()
    after = _snapshot(table)
    others = rows[torch.tensor([0, 2, 3])]
    for k in ("weight", "opt.exp_avg", "opt.exp_avg_sq", "opt.step"):
        assert torch.equal(after[k][others], before[k][others]), k
    assert after["opt.step"][rows[1]] == 2 and bool((after["opt.step"][others] == 1).all())
    assert not torch.equal(after["weight"][rows[1]], before["weight"][rows[1]])


def test_non_finite_step_changes_nothing_and_the_next_call_raises():
    cfg = OptimizerConfig("adam", lr=0.1)
    a, b = _table(cfg, True, name="a"), _table(cfg, True, name="b")
    opt = SparseOptimizer([a, b])
    ids = torch.tensor([1, 2, 3])
    (a(ids).sum() + b(ids).sum()).backward()
    opt.step()
    opt.zero_grad()
    before = [_snapshot(t) for t in (a, b)]
    (a(ids).sum() + (b(ids) * torch.tensor([1.0, float("nan"), 1.0])[:, None]).sum()).backward()
    opt.step()  # checked on the device: no exception here, and no row of either table moves
    for t, saved in zip((a, b), before):
        _assert_same({k: v for k, v in _snapshot(t).items() if k != "stamps"},
                     {k: v for k, v in saved.items() if k != "stamps"})
        assert not t.has_pending_grads
    (a(ids).sum() + b(ids).sum()).backward()
    with pytest.raises(FloatingPointError, match=r"\['b'\] at an earlier sync-free step"):
        opt.step()
    for t, saved in zip((a, b), before):  # the call that raised changed nothing either
        assert torch.equal(t.weight, saved["weight"]) and not t.has_pending_grads
    opt.check_finite()  # reported once
    (a(ids).sum() + b(ids).sum()).backward()
    opt.step()
    assert not torch.equal(a.weight, before[0]["weight"])


def test_a_bad_step_is_reported_by_a_new_optimizer_over_the_table():
    """``SparseOptimizer(table).step()`` each step (as the README shows): the skipped step is
    kept on the table, so the next optimizer reports it."""
    table = _table(RULES[3], True)
    ids = torch.tensor([1, 2])
    table(ids).sum().backward()
    SparseOptimizer(table).step()
    before = table.weight.clone()
    (table(ids) * float("nan")).sum().backward()
    SparseOptimizer(table).step()
    assert torch.equal(table.weight, before)
    table(ids).sum().backward()
    with pytest.raises(FloatingPointError, match="earlier sync-free step"):
        SparseOptimizer(table).step()
    assert torch.equal(table.weight, before) and not table.has_pending_grads
    table(ids).sum().backward()
    SparseOptimizer(table).step()  # reported once
    assert not torch.equal(table.weight, before)


def test_check_finite_reports_a_bad_step_at_once():
    table = _table(RULES[0], True)
    opt = SparseOptimizer(table)
    (table(torch.tensor([1, 2])) * float("inf")).sum().backward()
    opt.step()
    with pytest.raises(FloatingPointError, match=r"\['t'\]"):
        opt.check_finite()
    opt.check_finite()


def test_a_host_checked_table_beside_keeps_the_all_or_nothing_contract():
    """One table sync-free, one not: the flag is read in the call (one sync) so that a bad
    sync-free table still leaves the other unchanged and raises at once."""
    cfg = OptimizerConfig("sgd", lr=0.1)
    free, host = _table(cfg, True, name="free"), _table(cfg, False, name="host")
    opt = SparseOptimizer([free, host])
    ids = torch.tensor([1, 2])
    (free(ids).sum() + host(ids).sum()).backward()
    opt.step()
    before = [t.weight.clone() for t in (free, host)]
    ((free(ids) * float("nan")).sum() + host(ids).sum()).backward()
    with pytest.raises(FloatingPointError, match=r"\['free'\]; no row was updated"):
        opt.step()
    assert torch.equal(free.weight, before[0]) and torch.equal(host.weight, before[1])


def test_a_rule_without_step_rows_keeps_the_listed_rows_step():
    class OnlyUpdate(SparseRule):  # a plugin rule written against the older interface
        name = "only_update"

        def update(self, weight, state, rows, grads):
            weight[rows] = (weight[rows].to(torch.float32) - 0.5 * grads).to(weight.dtype)

    table = _table(RULES[0], True)
    table.rule = OnlyUpdate(OptimizerConfig("sgd", lr=0.5))
    table(torch.tensor([4])).sum().backward()
    before = table.get(torch.tensor([4]))[0]
    SparseOptimizer(table).step()
    assert torch.equal(table.get(torch.tensor([4]))[0], before - 0.5)


def test_masked_update_matches_update_on_a_block_of_rows():
    rule = SparseSGD(OptimizerConfig("sgd", lr=0.25, weight_decay=0.1))
    weight = torch.randn(6, DIM)
    grads = torch.randn(6, DIM)
    apply = torch.tensor([True, False, True, False, False, True])
    listed = weight.clone()
    rule.update(listed, {}, apply.nonzero().squeeze(1), grads[apply])
    masked = weight.clone()
    rule.masked_update(masked, {}, grads, apply)
    assert torch.equal(masked, listed) and torch.equal(masked[~apply], weight[~apply])


class _SyncOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", RULES, ids=lambda c: c.name)
def test_sync_free_backward_and_step_call_no_syncing_op(cfg):
    """The ops that read a device value on the host (nonzero, item, unique, ...) are what
    syncs on CUDA; the same torch code runs here on CPU, so none may be called."""
    table = _table(cfg, True)
    opt = SparseOptimizer(table)
    ids = torch.randint(1, 50, (4, 30))
    _loss(table, _batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    out = table.lookup(ids, valid=ids > 3)
    with _SyncOps() as spy:
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    assert dict(spy.ops) == {}
    listed = _table(cfg, False)
    SparseOptimizer(listed)
    listed.lookup(ids).sum().backward()
    with _SyncOps() as spy:
        SparseOptimizer(listed).step()
    assert spy.ops["nonzero"] + spy.ops["_local_scalar_dense"] == 2  # the spy sees the syncs it must


# ---------------------------------------------------------------- the Triton kernel (interpreter)


@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", RULES, ids=lambda c: c.name)
def test_triton_masked_update_kernel_matches_the_torch_rule(interp, cfg, dtype, ok):
    from gauss_plugins.embedding.sparse_rules import make_rule

    g = torch.Generator().manual_seed(1)
    n, dim = 11, 6  # dim not a power of two: the kernel masks the tile's spare columns
    rule = make_rule(cfg)
    weight = torch.randn(n, dim, generator=g).to(dtype)
    grads = torch.randn(n, dim, generator=g)
    touched = torch.rand(n, generator=g) > 0.4
    state = {}
    for name, (shape, sdtype, _) in rule.state_fields(dim).items():
        if sdtype == torch.int64:
            state[name] = torch.randint(0, 5, (n, *shape), generator=g)
        else:
            state[name] = torch.rand((n, *shape), generator=g)
    stamp = torch.randint(-1, 5, (n,), generator=g, dtype=torch.int32)
    ref_w, ref_state, ref_stamp = weight.clone(), {k: v.clone() for k, v in state.items()}, stamp.clone()
    apply = touched & torch.tensor(ok)
    rule.masked_update(ref_w, ref_state, grads, apply)
    ref_stamp.masked_fill_(apply, 9)
    names = {0: (), 1: ("sum",), 2: ("sum",), 3: ("exp_avg", "exp_avg_sq", "step")}[rule.kind]
    args = [state[k] for k in names] + [None] * (3 - len(names))
    index = interp.TritonHashIndex(16, "cpu")
    index.masked_sparse_update(rule.kind, weight, grads, touched, torch.tensor(ok), *args, rule.hyperparams(),
                               stamp, 9)
    assert torch.equal(stamp, ref_stamp)
    assert torch.equal(weight[~apply], ref_w[~apply])  # untouched rows: not written at all
    # float32: within ulps (square-and-multiply bias corrections, the row sum's order);
    # bf16: one storage ulp, from rounding a float32 value that may sit an ulp apart
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(weight.float(), ref_w.float(), **tol)
    for k in state:
        if state[k].dtype == torch.int64:
            assert torch.equal(state[k], ref_state[k]), k
        else:
            assert torch.equal(state[k][~apply], ref_state[k][~apply]), k
            torch.testing.assert_close(state[k], ref_state[k], rtol=2e-6, atol=1e-7)


def test_triton_index_table_steps_like_the_torch_table(interp, monkeypatch):
    """A whole sync-free table on the Triton index (its one-kernel step) against the same
    table on the torch index (the torch masked step): same rows, values within float32 ulps."""
    monkeypatch.setattr(DynamicEmbeddingTable, "_make_index",
                        lambda self, capacity: interp.TritonHashIndex(capacity, self.device))
    cfg = RULES[3]
    kernel_table = DynamicEmbeddingTable(DynamicTableConfig(name="k", dim=DIM, initial_capacity=64, optimizer=cfg,
                                                            init_min=-0.5, init_max=0.5))
    monkeypatch.undo()
    torch_table = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=DIM, initial_capacity=64, optimizer=cfg,
                                                           init_min=-0.5, init_max=0.5, backend="torch"))
    for t in (kernel_table, torch_table):
        t.sync_free_step = True
        t.train()
    calls = collections.Counter()
    real = kernel_table.index.masked_sparse_update
    kernel_table.index.masked_sparse_update = lambda *a: (calls.update(["kernel"]), real(*a))
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        ids = torch.randint(1, 30, (20,), generator=g)
        w = torch.randn(20, DIM, generator=g)
        for t in (kernel_table, torch_table):
            loss = (t(ids) * w).sum()
            with _SyncOps() as spy:
                loss.backward()
                SparseOptimizer(t).step()
            assert dict(spy.ops) == {}, (t.name, step, dict(spy.ops))
    assert calls["kernel"] == 3
    probe = torch.arange(1, 30)
    a, b = kernel_table.get(probe), torch_table.get(probe)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    rows = kernel_table.find(probe[a[1]])
    assert torch.equal(kernel_table.opt_state["step"][rows], torch_table.opt_state["step"][torch_table.find(probe[a[1]])])


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_steady_state_step_issues_no_host_sync():
    """On CUDA (Triton index when available), after warm-up: backward + SparseOptimizer.step
    of the small table run under sync debug mode "error", so any device-to-host sync fails;
    a training lookup of ids that all have rows issues exactly its one absent-id check."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import warnings

    table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=50, initial_capacity=4096, device="cuda",
                                                     initializer="normal", init_std=0.02,
                                                     optimizer=OptimizerConfig("adam", lr=1e-3, eps=1e-8)))
    assert table.sync_free_step
    opt = SparseOptimizer(table)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 3707, (128, 200), device="cuda", generator=g)
    for _ in range(3):  # warm-up: rows inserted, kernels compiled
        (table.lookup(ids, valid=ids > 0) * 2).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    out = table.lookup(ids, valid=ids > 0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        (out * 2).sum().backward()
        opt.step()
        opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            table.lookup(ids, valid=ids > 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = {(os.path.basename(w.filename), w.lineno) for w in caught if "synchroniz" in str(w.message).lower()}
    # the lookup's only sync: the absent-id check of _rows_for_training (its nonzero)
    assert len(sites) == 1 and next(iter(sites))[0] == "table.py", sites
    # a bad step on the device: nothing moves, and check_finite reports it
    before = table.weight.clone()
    (table.lookup(ids, valid=ids > 0) * float("nan")).sum().backward()
    opt.step()
    with pytest.raises(FloatingPointError):
        opt.check_finite()
    assert torch.equal(table.weight, before)
