"""The write-after-next-commit rule of elastic table rows, without Ray or a process group."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.elastic.rows import RowCommitLog, check_table, install_ids
from gauss_plugins.elastic.synthetic import SyntheticIdStream, TableRegressionModel, table_mse_loss
from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, SparseOptimizer
from gauss_plugins.embedding.backing import state_layout
from gauss_plugins.stores.tierps import TierPS


@pytest.fixture
def setup(tmp_path):
    model = TableRegressionModel()
    table = model.table
    width = sum(w for _, _, w in state_layout(table))
    store = TierPS(table.dim, str(tmp_path / "ps"), state_dim=width)
    table.attach_store(store)
    yield model, table, store
    store.close()


def _train_step(model, sparse, stream, step):
    batch = stream.batch(torch.arange(step * 8, step * 8 + 8))
    table_mse_loss(model, batch).backward()
    sparse.step()
    return torch.unique(batch[0])


def test_a_step_is_written_only_after_the_next_commit_with_its_own_values(setup):
    model, table, store = setup
    stream, sparse, log = SyntheticIdStream(num_ids=16), SparseOptimizer(model), RowCommitLog({"items": table})
    ids1 = _train_step(model, sparse, stream, 1)
    after1 = table.get(ids1)[0].clone()
    log.applied(1, {"items": ids1})
    assert not bool(store.lookup(ids1).found.any()), "a step's rows reached the store before the next commit"
    ids2 = _train_step(model, sparse, stream, 2)
    log.applied(2, {"items": ids2})
    assert log.committed_through(1) == ids1.numel()
    assert log.acked_step == 1 and sorted(log.pending) == [2]
    got = store.lookup(ids1)
    assert bool(got.found.all())
    # The step-1 snapshot, not the rows as step 2 left them.
    assert torch.equal(got.values, after1)
    assert not torch.equal(table.get(ids1)[0], after1)
    assert got.state is not None and bool((got.state > 0).any()), "the optimizer state was not written"


def test_an_abandoned_group_writes_nothing_and_the_next_group_writes_its_start_state(setup):
    model, table, store = setup
    stream, sparse, log = SyntheticIdStream(num_ids=16), SparseOptimizer(model), RowCommitLog({"items": table})
    ids = _train_step(model, sparse, stream, 1)
    log.applied(1, {"items": ids})
    log.discard()  # the group ended before step 2's all-reduce
    assert log.committed_through(5) == 0 and log.acked_step == 0
    assert not bool(store.lookup(ids).found.any())
    written = log.write_all(1)  # the next group's rank 0: every resident row of step 1
    keys, _ = table.index.keys_and_rows()
    assert written == keys.numel()
    got = store.lookup(keys.sort().values)
    assert torch.equal(got.values, table.get(keys.sort().values)[0]) and log.acked_step == 1


def test_steps_apply_in_order(setup):
    model, table, _ = setup
    log = RowCommitLog({"items": table})
    ids = torch.tensor([1, 2])
    table.set(ids, torch.ones(2, table.dim))
    log.applied(3, {"items": ids})
    with pytest.raises(ValueError, match="in order"):
        log.applied(3, {"items": ids})


def test_install_takes_the_stored_row_or_the_initializers(setup):
    model, table, store = setup
    fresh = TableRegressionModel().table  # the same seed: the initializer's rows of any id
    store.put(torch.tensor([5]), torch.full((1, table.dim), 0.5), torch.zeros(1, store.state_dim))
    assert install_ids(table, torch.tensor([5, 6])) == 2
    assert torch.equal(table.get(torch.tensor([5]))[0], torch.full((1, table.dim), 0.5))
    fresh.train()
    with torch.no_grad():
        init6 = fresh(torch.tensor([6]))
    assert torch.equal(table.get(torch.tensor([6]))[0], init6)
    assert install_ids(table, torch.tensor([5, 6])) == 0


@pytest.mark.parametrize("options, what", [({"eviction": "lru"}, "eviction"), ({"admission": "counting"}, "admission"),
                                           ({"default": "unknown"}, "default")])
def test_tables_replicas_could_disagree_on_are_refused(options, what):
    table = DynamicEmbeddingTable(DynamicTableConfig(name="t", dim=4, **options))
    with pytest.raises(ValueError, match=what):
        check_table(table)
