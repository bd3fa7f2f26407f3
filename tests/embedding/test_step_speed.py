"""The GPU-minded training step: masked lookups (``lookup(ids, valid=)``) and the dense
per-row gradient sum of small tables must give the same results as the paths they replace,
and must not bring back the host syncs and sorts they remove."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gauss_plugins.embedding.table as table_module
from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer

DIM = 8
RULES = [
    OptimizerConfig("sgd", lr=0.1, weight_decay=0.01),
    OptimizerConfig("adagrad", lr=0.1, eps=1e-10, initial_accumulator_value=0.1),
    OptimizerConfig("rowwise_adagrad", lr=0.1, eps=1e-10),
    OptimizerConfig("adam", lr=0.01, eps=1e-8, beta1=0.8, beta2=0.95, weight_decay=0.001),
]


def _table(cfg, backend="torch", **kw):
    t = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=DIM, initial_capacity=256, backend=backend,
                                                 optimizer=cfg, init_min=-0.5, init_max=0.5, **kw))
    t.train()
    return t


def _train(table, steps=5, seed=0):
    """Steps of two plain lookups, a masked one and a weighted pooled one, with repeats."""
    g = torch.Generator().manual_seed(seed)
    opt = SparseOptimizer(table)
    for _ in range(steps):
        a = torch.randint(-20, 40, (12,), generator=g)
        b = torch.randint(-20, 40, (3, 4), generator=g)
        valid = torch.rand(3, 4, generator=g) > 0.3
        bag_ids = torch.randint(-20, 40, (10,), generator=g)
        offsets = torch.tensor([0, 3, 3, 10])
        psw = torch.rand(10, generator=g)
        out = (table(a).sum(0) + table.lookup(b, valid=valid).sum((0, 1))
               + table.lookup_pooled(bag_ids, offsets, per_sample_weights=psw).sum(0))
        (out * torch.randn(DIM, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()


def _state(table):
    ids = torch.arange(-20, 40)
    values, present = table.get(ids)
    rows = table.find(ids[present])
    return values, present, {k: v[rows].clone() for k, v in table.opt_state.items()}


@pytest.mark.parametrize("cfg", RULES, ids=lambda c: c.name)
def test_dense_gradient_sum_is_bit_identical_to_the_sorted_sum(monkeypatch, cfg):
    calls = collections.Counter()
    real = DynamicEmbeddingTable._prepare_dense

    def spy(self, records):
        calls["dense"] += 1
        return real(self, records)

    monkeypatch.setattr(DynamicEmbeddingTable, "_prepare_dense", spy)
    dense = _table(cfg)
    _train(dense)
    assert calls["dense"] == 5
    monkeypatch.setattr(table_module, "_DENSE_SUM_MIN_ROWS", 0)  # 257 rows > 4 x 34 ids: sorted path
    calls.clear()
    sorted_ = _table(cfg)
    _train(sorted_)
    assert calls["dense"] == 0
    for x, y in zip(_state(dense), _state(sorted_)):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), k
        else:
            assert torch.equal(x, y)


def test_dense_sum_keeps_the_default_row_untrained_and_catches_non_finite():
    table = _table(RULES[3])
    opt = SparseOptimizer(table)
    ids = torch.tensor([1, 2, 3])
    table(ids)  # insert
    table.eval()
    absent = table(torch.tensor([99])).sum()  # eval: no insert, reads the default row
    table.train()
    loss = table(ids).sum() + table.lookup(torch.tensor([7, 8]), valid=torch.tensor([False, False])).sum() + absent
    loss.backward()
    opt.step()
    assert torch.equal(table.weight[table.default_row], torch.zeros(DIM))
    assert len(table) == 3
    before = table.get(ids)[0].clone()
    (table(ids) * float("nan")).sum().backward()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(table.get(ids)[0], before)


@pytest.mark.parametrize("backend", ["torch", "cpu_ext"])
def test_masked_lookup_reads_zeros_inserts_nothing_and_trains_only_valid_ids(backend):
    if backend == "cpu_ext":
        from gauss_kernels.hash_table import cpu_ext

        if not cpu_ext.available():
            pytest.skip(f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}")
    cfg = OptimizerConfig("sgd", lr=1.0)
    masked, compact = _table(cfg, backend), _table(cfg, backend)
    ids = torch.tensor([[5, 7, 0, 0], [7, 9, -4, 0]])
    valid = ids > 0
    weights = torch.randn(2, 4, DIM)
    out = masked.lookup(ids, valid=valid)
    assert torch.equal(out[~valid], torch.zeros(int((~valid).sum()), DIM))
    assert len(masked) == 3 and bool((masked.find(torch.tensor([0, -4])) < 0).all())
    ref = compact.lookup(ids[valid])
    assert torch.equal(out[valid], ref)
    (out * weights).sum().backward()
    (ref * weights[valid]).sum().backward()
    SparseOptimizer(masked).step()
    SparseOptimizer(compact).step()
    probe = torch.tensor([5, 7, 9])
    assert torch.equal(masked.get(probe)[0], compact.get(probe)[0])
    assert torch.equal(masked.weight[masked.default_row], torch.zeros(DIM))


def test_masked_lookup_in_eval_mode_never_calls_padding_unknown():
    table = _table(OptimizerConfig("sgd", lr=0.1), eval_unknown="error")
    table(torch.tensor([3, 4]))
    table.eval()
    ids = torch.tensor([3, 0, 4, 0])
    out = table.lookup(ids, valid=ids > 0)
    assert torch.equal(out[1], torch.zeros(DIM)) and torch.equal(out[0], table.get(torch.tensor([3]))[0][0])
    with pytest.raises(table_module.UnknownIdError):
        table.lookup(torch.tensor([3, 8]), valid=torch.tensor([True, True]))


@pytest.mark.parametrize("bad", [torch.ones(3, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
                                 torch.ones(1, 3, dtype=torch.bool)])
def test_bad_mask_is_refused_before_anything_changes(bad):
    table = _table(OptimizerConfig("sgd", lr=0.1))
    version = table.version
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        table.lookup(torch.tensor([1, 2, 3]), valid=bad)
    assert len(table) == 0 and table.version == version


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_steady_state_lookup_has_one_host_sync_and_the_step_sorts_nothing():
    """On CUDA each nonzero / unique / item is a device-to-host sync: a training lookup whose
    ids all have rows runs one (the absent-id check); the optimizer step of a small table
    sorts nothing (no unique) and syncs twice (finiteness, the touched rows)."""
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():  # its probe is one C++ op; the torch probe syncs per round
        pytest.skip(f"cpu_ext unavailable: {cpu_ext.unavailable_reason()}")
    ids = torch.randint(1, 50, (4, 30))
    lookup_table = _table(OptimizerConfig("adam", lr=0.01), backend="cpu_ext")
    lookup_table.lookup(ids, valid=ids > 0)
    with _CountOps() as counter:
        lookup_table.lookup(ids, valid=ids > 0)
    # (.item() is left out here: cpu_ext keeps its capacity in a CPU tensor, where reading it
    # syncs nothing; the CUDA index keeps it in a Python int.)
    syncing = {k: v for k, v in counter.ops.items() if k in ("nonzero", "_unique2", "unique_dim", "masked_select",
                                                             "sort")}
    assert syncing == {"nonzero": 1}

    step_table = _table(OptimizerConfig("adam", lr=0.01), backend="torch")
    opt = SparseOptimizer(step_table)
    step_table.lookup(ids).sum().backward()
    step_table.lookup(ids[:, :5], valid=ids[:, :5] > 3).sum().backward()
    with _CountOps() as counter:
        opt.step()
    assert not {"_unique2", "unique_dim", "sort", "argsort"} & set(counter.ops)
    assert counter.ops["_local_scalar_dense"] + counter.ops["nonzero"] <= 2
