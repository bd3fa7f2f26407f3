"""Property test: random interleavings of training lookups (with SGD updates), eval lookups,
set, delete, evictions and checkpoint/restore agree with a plain-dict model of the table."""
from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gauss_plugins.embedding import (
    DynamicEmbeddingTable,
    DynamicTableConfig,
    OptimizerConfig,
    SparseOptimizer,
    TableFullError,
    load_table,
    save_table,
)
from gauss_plugins.embedding.initializers import deterministic_uniform

DIM, SEED, LR = 3, 11, 0.5
INITIAL, MAX, GROWTH = 2, 12, 2.0
ids_st = st.lists(st.one_of(st.integers(-12, 12), st.sampled_from([-(2**63), 2**63 - 1])), min_size=1, max_size=8)


class DictModel:
    """The table's contract with a dict: id -> value, LRU by (last touch, id); a touch is a
    training read, an optimizer update or a set."""

    def __init__(self, evict: bool):
        self.values, self.last = {}, {}
        self.tick, self.capacity, self.evict = 0, INITIAL, evict
        self.touched = set()  # ids touched since the test's last mark_version

    def touch(self, ids):
        self.tick += 1
        for i in ids:
            self.last[i] = self.tick
        self.touched.update(ids)

    def _room(self, n_new, protect):
        free = self.capacity - len(self.values)
        if n_new <= free:
            return
        if self.capacity < MAX:
            self.capacity = min(MAX, max(math.ceil(self.capacity * GROWTH), len(self.values) + n_new))
            free = self.capacity - len(self.values)
            if n_new <= free:
                return
        if not self.evict:
            raise TableFullError("full")
        need = n_new - free  # evict_fraction 0: exactly what is needed
        order = sorted((self.last[i], i) for i in self.values if i not in protect)
        if len(order) < need:
            raise TableFullError("batch too large")
        for _, i in order[:need]:
            self.remove(i)

    def remove(self, i):
        del self.values[i], self.last[i]

    def train_lookup(self, ids):
        present = {i for i in ids if i in self.values}
        new = sorted(set(ids) - present)
        self._room(len(new), present)  # on TableFullError nothing is touched
        if new:
            init = deterministic_uniform(torch.tensor(new), DIM, SEED, -0.1, 0.1)
            for i, v in zip(new, init):
                self.values[i] = v.clone()
        self.touch(set(ids))

    def apply_grads(self, ids, coef):
        summed = {}
        for i, c in zip(ids, coef):
            summed[i] = summed[i] + c if i in summed else torch.zeros(DIM) + c
        for i, g in summed.items():
            self.values[i] = self.values[i] - LR * g
        self.touch(summed)

    def read(self, ids):
        return torch.stack([self.values.get(i, torch.zeros(DIM)) for i in ids])


def machine_for(backend: str, evict: bool):
    class TableMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            self.config = DynamicTableConfig(
                name="m", dim=DIM, seed=SEED, initial_capacity=INITIAL, max_capacity=MAX, growth_factor=GROWTH,
                init_min=-0.1, init_max=0.1, eviction="lru" if evict else None, evict_fraction=0.0,
                optimizer=OptimizerConfig("sgd", lr=LR), backend=backend)
            self.table = DynamicEmbeddingTable(self.config)
            self.opt = SparseOptimizer(self.table)
            self.model = DictModel(evict)
            self.seen = set()
            self.tmp = tempfile.TemporaryDirectory()
            self.base = None  # (path, version) of the last full checkpoint
            self.n_ckpt = 0
            self.mark = (self.table.version, set(), set())  # version, live then, inserted since

        def teardown(self):
            self.tmp.cleanup()

        def _note_inserts(self, before):
            self.mark[2].update(set(self.model.values) - before)

        @rule(ids=ids_st, seed=st.integers(0, 2**16))
        def train_step(self, ids, seed):
            self.seen.update(ids)
            coef = torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(seed))
            before = set(self.model.values)
            self.table.train()
            try:
                self.model.train_lookup(ids)
            except TableFullError:
                with pytest.raises(TableFullError):
                    self.table(torch.tensor(ids))
                return
            (self.table(torch.tensor(ids)) * coef).sum().backward()
            self.opt.step()
            self.opt.zero_grad()
            self.model.apply_grads(ids, coef)
            self._note_inserts(before)

        @rule(ids=ids_st)
        def eval_lookup(self, ids):
            self.table.eval()
            torch.testing.assert_close(self.table(torch.tensor(ids)), self.model.read(ids), rtol=0, atol=1e-6)

        @rule(ids=ids_st, value=st.floats(-2, 2, allow_nan=False, width=32))
        def set_values(self, ids, value):
            ids = sorted(set(ids))
            before = set(self.model.values)
            new = [i for i in ids if i not in self.model.values]
            try:
                self.model._room(len(new), set(ids) - set(new))
            except TableFullError:
                with pytest.raises(TableFullError):
                    self.table.set(torch.tensor(ids), torch.full((len(ids), DIM), value))
                return
            self.table.set(torch.tensor(ids), torch.full((len(ids), DIM), value))
            for i in ids:
                self.model.values[i] = torch.full((DIM,), value)
            self.model.touch(ids)
            self.seen.update(ids)
            self._note_inserts(before)

        @rule(ids=ids_st)
        def delete(self, ids):
            present = self.table.delete(torch.tensor(ids)).tolist()
            assert present == [i in self.model.values for i in ids]
            for i in set(ids):
                if i in self.model.values:
                    self.model.remove(i)

        @rule(num=st.integers(0, 4))
        def evict_lowest(self, num):
            if not evict:
                return
            victims = self.table.evict(num=num).tolist()
            order = sorted((self.model.last[i], i) for i in self.model.values)[:num]
            assert sorted(victims) == sorted(i for _, i in order)
            for i in victims:
                self.model.remove(i)

        @rule()
        def checkpoint_restore(self):
            self.n_ckpt += 1
            if self.base is None or self.n_ckpt % 2:
                path = f"{self.tmp.name}/full{self.n_ckpt}"
                self.base = (path, save_table(self.table, path))
                paths = [path]
            else:
                inc = f"{self.tmp.name}/inc{self.n_ckpt}"
                save_table(self.table, inc, since_version=self.base[1])
                paths = [self.base[0], inc]
            fresh = DynamicEmbeddingTable(self.config)
            load_table(fresh, paths)
            assert fresh.version == self.table.version
            self.table, self.opt = fresh, SparseOptimizer(fresh)

        @rule()
        def mark_version(self):
            self.mark = (self.table.version, set(self.model.values), set())
            self.model.touched = set()

        @invariant()
        def agrees_with_model(self):
            if not hasattr(self, "table"):
                return
            assert len(self.table) == len(self.model.values)
            probe = sorted(self.seen | {999})
            vals, present = self.table.get(torch.tensor(probe))
            assert present.tolist() == [i in self.model.values for i in probe]
            torch.testing.assert_close(vals, self.model.read(probe), rtol=0, atol=1e-6)
            version, live_then, inserted = self.mark
            ids, values, _ = self.table.changed_since(version)
            # exactly the live ids touched since the mark (a touch: insert, update, set),
            # whether the change log answered or, after a checkpoint load, a scan did
            assert ids.tolist() == sorted(self.model.touched & set(self.model.values))
            assert set(inserted) & set(self.model.values) <= set(ids.tolist())
            torch.testing.assert_close(values.float(), self.table.get(ids)[0], rtol=0, atol=0)
            gone = set(self.table.evicted_since(version).tolist())
            assert gone == (live_then | inserted) - set(self.model.values)

    return TableMachine


@pytest.mark.parametrize("evict", [True, False], ids=["lru", "no-eviction"])
def test_table_matches_dict_model(backend, evict):
    machine = machine_for(backend, evict)
    machine.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()
