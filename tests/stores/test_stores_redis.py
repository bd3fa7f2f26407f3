"""RedisWePS against a real redis-server on loopback, and the syncer's fault handling."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from gauss_plugins.stores.base import ChangeBatch
from gauss_plugins.stores.syncer import Syncer
from gauss_plugins.stores.tierps import TierPS

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.redis  # every test here runs a real redis-server
from gauss_integrations.redis.store import RedisWePS, row_keys  # noqa: E402

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def test_roundtrip_default_and_delete(redis_server):
    store = RedisWePS(4, port=redis_server.port, model="m", table="t", default=-1.0, chunk_size=7)
    ids = torch.tensor([0, -5, INT64_MIN, INT64_MAX, 123456789012345, 3])
    vals = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    store.put(ids, vals)
    got = store.lookup(torch.cat([ids, torch.tensor([42])]))
    assert torch.equal(got.values[:6], vals)
    assert got.found.tolist() == [True] * 6 + [False]
    assert torch.equal(got.values[6], torch.full((4,), -1.0))
    assert len(store) == 6
    store.delete(ids[:2])
    got = store.lookup(ids)
    assert got.found.tolist() == [False, False, True, True, True, True]
    # deleted ids read as the default, never as their old rows
    assert torch.equal(got.values[:2], torch.full((2, 4), -1.0))
    # duplicates: the last occurrence wins
    store.put(torch.tensor([9, 9, 9]), torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4]))
    assert torch.equal(store.get(torch.tensor([9])), torch.full((1, 4), 3.0))
    exported = {i: v for b in store.export(batch_size=2) for i, v in zip(b.ids.tolist(), b.values)}
    assert set(exported) == {INT64_MIN, INT64_MAX, 123456789012345, 3, 9}
    assert torch.equal(exported[3], vals[5])
    assert store.clear() == 5 and len(store) == 0


def test_keys_are_readable_fixed_width(redis_server):
    store = RedisWePS(2, port=redis_server.port, prefix="p", model="m", table="t")
    store.put(torch.tensor([-1, 255]), torch.ones(2, 2))
    keys = sorted(redis_server.client().keys("p:m:t:*"))
    assert keys == [b"p:m:t:00000000000000ff", b"p:m:t:ffffffffffffffff"]
    assert row_keys(b"x:", torch.tensor([1])).tobytes() == b"x:0000000000000001"


def test_state_ttl_and_version(redis_server):
    store = RedisWePS(3, state_dim=2, port=redis_server.port, ttl_s=30)
    ids = torch.tensor([1, 2])
    store.apply_changes(ChangeBatch(ids, torch.ones(2, 3), torch.full((2, 2), 7.0), torch.empty(0, dtype=torch.int64), 17))
    got = store.lookup(ids)
    assert torch.equal(got.state, torch.full((2, 2), 7.0))
    assert store.version == 17
    ttl = redis_server.client().pttl(row_keys(store.key_prefix, ids[:1]).tobytes())
    assert 0 < ttl <= 30_000


def test_bad_input_changes_nothing(redis_server):
    store = RedisWePS(4, port=redis_server.port)
    with pytest.raises(ValueError):
        store.put(torch.tensor([1, 2]), torch.ones(3, 4))
    with pytest.raises(TypeError):
        store.put(torch.tensor([1.5]), torch.ones(1, 4))
    with pytest.raises(ValueError):
        store.put(torch.tensor([1]), torch.ones(1, 4), state=torch.ones(1, 2))  # store keeps no state
    assert len(store) == 0
    with pytest.raises(ValueError):
        RedisWePS(4, port=redis_server.port, model="a:b")
    # rows of another width under the same prefix are an error, not data
    RedisWePS(8, port=redis_server.port).put(torch.tensor([5]), torch.ones(1, 8))
    with pytest.raises(ValueError, match="expected 16"):
        store.get(torch.tensor([5]))


def _send_timeout(sock) -> tuple:
    import socket
    import struct

    return struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.calcsize("@ll")))


def test_large_push_goes_out_in_few_writes_and_restores_the_socket(redis_server, monkeypatch):
    """A push far larger than the socket buffers: it leaves in a few blocking writes, a group
    of whole chunks each (no return to Python per partial send, which waits for the GIL when
    training runs Python in another thread; the next group is encoded while Redis executes
    this one), every row lands, and the connection keeps its timeout."""
    import gauss_integrations.redis.store as store_module

    writes = []
    real = store_module._send_blocking
    monkeypatch.setattr(store_module, "_send_blocking", lambda sock, bufs: (writes.append(len(bufs)), real(sock, bufs)))
    monkeypatch.setattr(store_module, "_GROUP_BYTES", 4 << 20)
    store = RedisWePS(64, port=redis_server.port, chunk_size=1000, ttl_s=60, socket_timeout=3.0)
    ids = torch.arange(-30_000, 30_000) * 7919  # 15 MB of rows, 60 MSET + 60 EVAL commands
    vals = torch.randn(ids.numel(), 64)
    store.put(ids, vals)
    # 13 chunks of 309-byte records per 4 MB group: 4 full groups and one of 8 chunks
    # (MSET: head + records; EVAL: head + records + tail)
    assert writes == [13 * 2 + 13 * 3] * 4 + [8 * 2 + 8 * 3]
    assert torch.equal(store.get(ids), vals)  # (the MGETs: one more write)
    conn = store.client.connection_pool.get_connection()
    try:
        assert conn._sock.gettimeout() == 3.0
        assert _send_timeout(conn._sock) == (0, 0)
    finally:
        store.client.connection_pool.release(conn)
    assert 0 < redis_server.client().pttl(row_keys(store.key_prefix, ids[-1:]).tobytes()) <= 60_000


def test_write_to_a_frozen_server_times_out_and_the_store_recovers(redis_server):
    """redis-server SIGSTOPped during a write larger than the kernel buffers: the blocking
    write gives up after the socket timeout (a TimeoutError, not a hang), the half-written
    connection is dropped, and after SIGCONT the store works again."""
    import os
    import signal

    store = RedisWePS(64, port=redis_server.port, socket_timeout=1.0)
    store.put(torch.tensor([1]), torch.ones(1, 64))  # a pooled connection exists
    # 56 MB of commands, more than both sockets' buffers hold; the chunks before the stall
    # may land (a failed push is retried whole by the syncer), so these ids stay apart
    ids = torch.arange(10, 200_010)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            store.put(ids, torch.zeros(ids.numel(), 64))
        assert time.monotonic() - t0 < 20
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    store.put(torch.tensor([2, 3]), torch.full((2, 64), 5.0))
    assert torch.equal(store.get(torch.tensor([1, 2, 3])), torch.cat([torch.ones(1, 64), torch.full((2, 64), 5.0)]))


def test_password_passed_through(make_redis_server):
    server = make_redis_server("--requirepass", "s3cret")
    with pytest.raises(redis.exceptions.AuthenticationError):
        RedisWePS(2, port=server.port, password="wrong").put(torch.tensor([1]), torch.ones(1, 2))
    store = RedisWePS(2, port=server.port, password="s3cret")
    store.put(torch.tensor([1]), torch.ones(1, 2))
    assert store.lookup(torch.tensor([1])).found.item()
    with pytest.raises(ValueError):
        RedisWePS(2, client=store.client, password="x")


def test_cluster_client_accepted(make_redis_server, tmp_path):
    """A one-node Redis Cluster holding all 16384 slots, through redis.cluster.RedisCluster."""
    from redis.cluster import RedisCluster

    import socket

    with socket.socket() as sock:  # the bus port would be port + 10000, past 65535 for high ports
        sock.bind(("127.0.0.1", 0))
        bus_port = sock.getsockname()[1]
    server = make_redis_server("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
                               "--cluster-port", str(bus_port))
    if True:
        plain = server.client()
        plain.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(100):
            if b"cluster_state:ok" in plain.execute_command("CLUSTER", "INFO"):
                break
            time.sleep(0.05)
        client = RedisCluster(host="127.0.0.1", port=server.port)
        store = RedisWePS(4, client=client, model="c")
        assert store.is_cluster
        ids = torch.arange(-50, 50)
        vals = torch.randn(100, 4)
        store.apply_changes(ChangeBatch(ids, vals, None, torch.empty(0, dtype=torch.int64), 3))
        assert torch.equal(store.get(ids), vals)
        store.delete(ids[:10])
        assert store.lookup(ids).found.sum().item() == 90
        assert store.version == 3 and len(store) == 90
        assert store.instance_id()


def _check_all_in_redis(ps: TierPS, store: RedisWePS, deleted: set) -> int:
    """Rows of the training store missing or different in Redis (0 = nothing lost)."""
    bad = 0
    for batch in ps.export(50_000):
        got = store.lookup(batch.ids)
        bad += int((~got.found).sum()) + int((got.found & (got.values != batch.values).any(1)).sum())
    if deleted:
        d = torch.tensor(sorted(deleted))
        held = ps.lookup(d, promote=False).found
        bad += int(store.lookup(d[~held]).found.sum())
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("pending_budget", [256 << 20, 4096], ids=["memory", "spill"])
def test_redis_killed_and_restarted_mid_training(redis_server, tmp_path, pending_budget):
    """Kill -9 redis-server while training writes; restart it empty; every row must arrive."""
    dim = 8
    ps = TierPS(dim, str(tmp_path / "ps"), ram_bytes=2000 * (4 * dim + 32))  # small RAM: demotion too
    store = RedisWePS(dim, port=redis_server.port, model="fault", socket_timeout=1.0, socket_connect_timeout=0.5)
    syncer = Syncer(ps, store, interval_s=0.05, max_pending_bytes=pending_budget, spill_dir=str(tmp_path / "spill"))
    g = torch.Generator().manual_seed(1)
    deleted: set = set()
    slowest = 0.0
    phase_steps = 60

    def train(steps: int) -> None:
        nonlocal slowest
        for _ in range(steps):
            ids = torch.randint(-5000, 5000, (256,), generator=g)
            t0 = time.monotonic()
            ps.put(ids, torch.randn(256, dim, generator=g))
            if torch.rand(1, generator=g).item() < 0.2:
                d = torch.randint(-5000, 5000, (16,), generator=g)
                ps.delete(d)
                deleted.update(d.tolist())
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.002)

    train(phase_steps)                       # Redis up
    redis_server.kill()
    train(phase_steps)                       # Redis down: training goes on
    down = syncer.stats()
    assert down["consecutive_failures"] > 0 and down["pending_rows"] > 0
    redis_server.start()                     # Redis back, empty
    train(phase_steps)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = syncer.stats()
        if s["pending_rows"] == 0 and s["pushed_version"] == ps.version and s["consecutive_failures"] == 0:
            break
        time.sleep(0.05)
    syncer.close()
    stats = syncer.stats()
    assert stats["resyncs"] >= 1
    if pending_budget < 1 << 20:
        assert stats["spills"] > 0
    assert slowest < 0.5, f"a training step waited {slowest:.3f}s: the syncer blocked training"
    assert _check_all_in_redis(ps, store, deleted) == 0
    assert store.version == ps.version
    ps.close()


@pytest.mark.slow
def test_syncer_and_redis_stop_while_push_in_flight(redis_server, tmp_path):
    """Stop Redis between cycles many times; the syncer keeps retrying without losing rows."""
    ps = TierPS(4, str(tmp_path / "ps"))
    store = RedisWePS(4, port=redis_server.port, model="flap", socket_timeout=1.0, socket_connect_timeout=0.5)
    syncer = Syncer(ps, store, interval_s=0.02)
    g = torch.Generator().manual_seed(2)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            ps.put(torch.randint(0, 20_000, (2000,), generator=g), torch.randn(2000, 4, generator=g))
            time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            redis_server.kill()
            time.sleep(0.2)
            redis_server.start()
    finally:
        stop.set()
        t.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (syncer.stats()["pushed_version"] == ps.version
                                               and syncer.stats()["consecutive_failures"] == 0):
        time.sleep(0.05)
    syncer.close()
    assert _check_all_in_redis(ps, store, set()) == 0
    ps.close()


def test_first_sync_removes_rows_the_source_lacks(redis_server, tmp_path):
    """A syncer attached to a prefix that holds rows of an older run: its first (full) push
    leaves Redis holding exactly the training store's rows."""
    store = RedisWePS(4, port=redis_server.port, model="late")
    store.put(torch.arange(10), torch.zeros(10, 4))          # left over from before
    ps = TierPS(4, str(tmp_path / "ps"))
    ps.put(torch.arange(5), torch.ones(5, 4))
    syncer = Syncer(ps, store, start=False)
    assert syncer.sync_now()
    assert store.lookup(torch.arange(10)).found.tolist() == [True] * 5 + [False] * 5
    assert torch.equal(store.get(torch.arange(5)), torch.ones(5, 4))
    assert sorted(store.stored_ids().tolist()) == [0, 1, 2, 3, 4]
    syncer.close()
    ps.close()


@pytest.mark.slow
def test_unreachable_redis_never_blocks_training(redis_server, tmp_path):
    """redis-server frozen (SIGSTOP: connections hang, nothing answers) while training writes:
    puts stay fast, the syncer times out and retries, and after SIGCONT every row arrives."""
    import os
    import signal

    ps = TierPS(4, str(tmp_path / "ps"))
    # A socket timeout longer than the allowed put time: a design that made training wait for
    # Redis would show puts of 1 s and more (2 s with redis-py's one retry).
    store = RedisWePS(4, port=redis_server.port, model="frozen", socket_timeout=1.0, socket_connect_timeout=1.0)
    syncer = Syncer(ps, store, interval_s=0.05)
    g = torch.Generator().manual_seed(3)
    slowest = 0.0
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            ps.put(torch.randint(0, 3000, (500,), generator=g), torch.randn(500, 4, generator=g))
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.005)
        assert syncer.stats()["consecutive_failures"] > 0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (syncer.stats()["pushed_version"] == ps.version
                                               and syncer.stats()["consecutive_failures"] == 0):
        time.sleep(0.05)
    syncer.close()
    assert slowest < 0.5, f"a put waited {slowest:.3f}s while Redis was frozen"
    assert _check_all_in_redis(ps, store, set()) == 0
    ps.close()
