"""TierPS: RAM budget, demotion/promotion, flush + reopen, change log, registry."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.stores.tierps import TierPS

DIM = 4
ROW = 4 * DIM + 25  # bytes per RAM row (values + bookkeeping), see tierps._RAM_OVERHEAD_BYTES


def _model_check(ps, model, space):
    got = ps.lookup(torch.tensor(space), promote=False)
    for j, i in enumerate(space):
        assert got.found[j].item() == (i in model), i
        if i in model:
            assert torch.equal(got.values[j], model[i]), i
    assert len(ps) == len(model)


def test_ram_budget_demotion_and_promotion(tmp_path):
    ps = TierPS(DIM, str(tmp_path), ram_bytes=100 * ROW, default=-1.0)
    assert ps.max_ram_rows == 100
    model = {}
    for start in range(0, 1000, 50):
        ids = torch.arange(start, start + 50)
        vals = torch.randn(50, DIM)
        ps.put(ids, vals)
        model.update(zip(ids.tolist(), vals))
        assert ps.ram_rows <= 100
    s = ps.stats()
    assert s["demoted"] >= 900 and s["disk_rows"] >= 900
    _model_check(ps, model, list(range(-5, 1005)))
    # reading cold rows promotes them; the hot ones of before are demoted
    cold = torch.arange(0, 40)
    assert not bool((ps._index.find(cold) >= 0).any())
    got = ps.lookup(cold)
    assert got.found.all() and torch.equal(got.values, torch.stack([model[i] for i in range(40)]))
    assert bool((ps._index.find(cold) >= 0).all())
    assert ps.stats()["promoted"] == 40
    # unknown ids read as the default
    assert torch.equal(ps.get([5000]), torch.full((1, DIM), -1.0))
    ps.close()


def test_flush_reopen_and_deletes_survive(tmp_path):
    ps = TierPS(DIM, str(tmp_path), state_dim=2, ram_bytes=64 * (4 * 6 + 25))
    ids = torch.arange(-100, 100)
    vals = torch.randn(200, DIM)
    st = torch.randn(200, 2)
    for c in range(0, 200, 50):  # 64 RAM rows: most rows end up demoted to disk
        ps.put(ids[c:c + 50], vals[c:c + 50], st[c:c + 50])
    ps.delete(torch.arange(-10, 10))
    ps.put(torch.tensor([-100]), torch.zeros(1, DIM))  # state kept when not given
    acked = ps.flush()
    ps.put(torch.tensor([99]), torch.ones(1, DIM))       # after the ack: may or may not survive
    ps.disk.close()                                      # "crash": RAM is gone, no final flush
    ps2 = TierPS(DIM, str(tmp_path), state_dim=2)
    assert ps2.version >= acked
    got = ps2.lookup(ids, promote=False)
    expect_found = ~((ids >= -10) & (ids < 10))
    assert torch.equal(got.found, expect_found)
    assert torch.equal(got.values[0], torch.zeros(DIM))
    assert torch.equal(got.state[0], st[0])
    assert torch.equal(got.values[1:20][expect_found[1:20]], vals[1:20][expect_found[1:20]])
    assert torch.equal(got.state[50:90][expect_found[50:90]], st[50:90][expect_found[50:90]])
    ps2.close()


def test_changes_since_and_log_trimming(tmp_path):
    ps = TierPS(DIM, str(tmp_path), ram_bytes=50 * ROW)
    ps.put(torch.arange(10), torch.zeros(10, DIM))
    ps.register_consumer("a")
    v0 = ps.version
    ps.put(torch.arange(5, 15), torch.ones(10, DIM))
    ps.delete([0, 1, 14])
    ps.put(torch.arange(100, 150), torch.full((50, DIM), 2.0))  # demotes the changed rows
    ps.put(torch.arange(150, 200), torch.full((50, DIM), 2.0))
    assert ps.stats()["demoted"] > 0
    ch = ps.changes_since(v0, consumer="a")
    assert ch.version == ps.version
    assert sorted(ch.deleted.tolist()) == [0, 1, 14]
    assert set(ch.ids.tolist()) == set(range(5, 14)) | set(range(100, 200))
    by_id = dict(zip(ch.ids.tolist(), ch.values))
    assert torch.equal(by_id[5], torch.ones(DIM)) and torch.equal(by_id[150], torch.full((DIM,), 2.0))
    # acknowledging the latest version lets the log go
    ps.changes_since(ch.version, consumer="a")
    assert ps.stats()["change_log_entries"] == 0
    # a consumer behind the log gets everything
    full = ps.changes_since(0, consumer="late")
    assert set(full.ids.tolist()) == set(range(2, 14)) | set(range(100, 200))
    times, rows = ps.update_clock(0, ps.version)
    assert len(times) == len(rows)
    ps.close()


def test_bad_input_changes_nothing(tmp_path):
    ps = TierPS(DIM, str(tmp_path), ram_bytes=10 * ROW)
    ps.put([1], torch.ones(1, DIM))
    v = ps.version
    with pytest.raises(ValueError):
        ps.put([1, 2], torch.ones(1, DIM))
    with pytest.raises(ValueError, match="RAM tier"):
        ps.put(torch.arange(11), torch.ones(11, DIM))
    with pytest.raises(ValueError):
        ps.put([3], torch.ones(1, DIM), state=torch.ones(1, 1))
    assert ps.version == v and len(ps) == 1
    ps.close()


def test_registry_builds_tierps_and_weps(tmp_path, fresh_registry):
    reg = fresh_registry.get_registry()
    assert {"tierps", "weps"} <= set(reg.names("embedding_store"))
    with reg.create("embedding_store", "tierps", dim=3, path=str(tmp_path)) as ps:
        ps.put([1], torch.ones(1, 3))
        assert len(ps) == 1
    weps = reg.create("embedding_store", "weps", dim=3)
    assert weps.get([1]).shape == (1, 3)


def test_damage_in_a_flushed_segment_refuses_to_open_until_repaired(tmp_path):
    import os

    from gauss_plugins.stores.disk import CorruptLogError, repair_log

    ps = TierPS(DIM, str(tmp_path), ram_bytes=30 * ROW, segment_bytes=4096, min_compact_bytes=1 << 30)
    for start in range(0, 400, 20):  # demotion writes everything beyond 10 rows to the log
        ps.put(torch.arange(start, start + 20), torch.full((20, DIM), float(start)))
    ps.flush()
    ps.close()
    segs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".log"))
    assert len(segs) >= 3
    sealed = tmp_path / segs[0]
    data = bytearray(sealed.read_bytes())
    first_end = 32 + int.from_bytes(data[24:32], "little")  # header + payload bytes of record 1
    data[first_end - 1] ^= 0x04  # a value byte of the first record (its ids stay readable)
    sealed.write_bytes(bytes(data))
    size = sealed.stat().st_size
    with pytest.raises(CorruptLogError, match=f"{segs[0]}: damaged record at byte offset 0 "):
        TierPS(DIM, str(tmp_path), ram_bytes=30 * ROW)
    assert sealed.stat().st_size == size
    dropped = repair_log(str(tmp_path))
    assert len(dropped) == 1 and dropped[0].offset == 0 and dropped[0].records[0]["kind"] == "PUT"
    lost = set(dropped[0].records[0]["ids"])
    ps = TierPS(DIM, str(tmp_path), ram_bytes=10 * ROW)
    got = ps.lookup(torch.arange(400), promote=False)
    # only the dropped record's ids are gone (none of them was written again later)
    assert {i for i in range(400) if not got.found[i]} == lost
    ps.close()
