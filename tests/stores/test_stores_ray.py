"""ShardedTierPS on a real local Ray cluster (2 CPUs, 2 shards) and a syncer over it."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

ray = pytest.importorskip("ray")

from gauss_plugins.stores.syncer import Syncer  # noqa: E402
from gauss_plugins.stores.weps import WePS  # noqa: E402


def test_needs_a_running_ray(tmp_path):
    if ray.is_initialized():
        pytest.skip("Ray is running in this process")
    from gauss_integrations.ray.sharded_store import ShardedTierPS

    with pytest.raises(RuntimeError, match="ray.init"):
        ShardedTierPS(4, str(tmp_path), num_shards=2)


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit.
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_sharded_tierps_two_shards(ray_cluster, tmp_path):
    from gauss_integrations.ray.sharded_store import ShardedTierPS

    store = ShardedTierPS(4, str(tmp_path / "sharded"), num_shards=2, state_dim=1, default=-1.0,
                          ram_bytes=300 * (4 * 5 + 25))
    ids = torch.arange(-1000, 1000)
    vals = torch.randn(2000, 4)
    for s in range(0, 2000, 250):
        store.put(ids[s:s + 250], vals[s:s + 250], torch.full((250, 1), 2.0))
    per_shard = store.stats()["shards"]
    assert [s["rows"] for s in per_shard] != [2000, 0] and sum(s["rows"] for s in per_shard) == 2000
    assert all(s["demoted"] > 0 for s in per_shard)  # 300 RAM rows per shard: cold rows went to disk
    store.delete(ids[:10])
    q = torch.cat([ids, torch.tensor([5000])])
    got = store.lookup(q)
    assert got.found.tolist() == [False] * 10 + [True] * 1990 + [False]
    assert torch.equal(got.values[10:2000], vals[10:])
    assert torch.equal(got.values[-1], torch.full((4,), -1.0))
    assert torch.equal(got.state[10:2000], torch.full((1990, 1), 2.0))
    assert len(store) == 1990
    assert sum(len(b) for b in store.export(batch_size=300)) == 1990

    # a syncer over the shards
    weps = WePS(4)
    syncer = Syncer(store, weps, start=False)
    assert syncer.sync_now()
    assert len(weps) == 1990
    store.put(torch.tensor([7, 8]), torch.ones(2, 4))
    store.delete(torch.tensor([9, 11]))
    assert syncer.sync_now()
    assert weps.lookup(torch.tensor([7, 9, 11])).found.tolist() == [True, False, False]
    assert torch.equal(weps.get(torch.tensor([8])), torch.ones(1, 4))
    assert syncer.reports[-1]["rows"] == 2 and syncer.reports[-1]["deleted"] == 2
    syncer.close()
    store.close()

    # reopened shards hold every row (close flushed them)
    again = ShardedTierPS(4, str(tmp_path / "sharded"), num_shards=2, state_dim=1)
    assert len(again) == 1988
    assert torch.equal(again.get(torch.tensor([8])), torch.ones(1, 4))
    again.close()
