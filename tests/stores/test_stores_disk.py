"""The disk tier: random operations against a dict, reopen, torn tails, compaction, kill -9."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gauss_plugins.stores.disk import DiskTier


def _matches(tier: DiskTier, model: dict, space: torch.Tensor) -> bool:
    rows, found = tier.get(space)
    for j, i in enumerate(space.tolist()):
        if found[j].item() != (i in model):
            return False
        if found[j] and not torch.equal(rows[j], model[i]):
            return False
    return len(tier) == len(model)


def _random_ops(tier: DiskTier, model: dict, seed: int, steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids = torch.unique(torch.randint(-500, 500, (120,), generator=g))
        rows = torch.randn(ids.numel(), tier.width, generator=g)
        tier.put(ids, rows, version=step)
        for i, r in zip(ids.tolist(), rows):
            model[i] = r
        if step % 3 == 0:
            d = torch.randint(-500, 500, (40,), generator=g)
            tier.delete(d, version=step)
            for i in d.tolist():
                model.pop(i, None)


def test_random_ops_reopen_and_compaction(tmp_path):
    tier = DiskTier(str(tmp_path), 5, segment_bytes=20_000, min_compact_bytes=50_000)
    model: dict = {}
    _random_ops(tier, model, seed=0, steps=80)
    space = torch.arange(-500, 500)
    assert tier.compactions > 0, "the workload should have triggered compaction"
    assert _matches(tier, model, space)
    tier.close()
    tier = DiskTier(str(tmp_path), 5)
    assert _matches(tier, model, space)
    assert tier.max_version == 79
    tier.close()


def test_torn_tail_is_dropped(tmp_path):
    tier = DiskTier(str(tmp_path), 3)
    model: dict = {}
    _random_ops(tier, model, seed=1, steps=10)
    tier.close()
    seg = sorted(p for p in os.listdir(tmp_path) if p.endswith(".log"))[-1]
    with open(tmp_path / seg, "ab") as f:  # half a record, as a crash mid-write leaves it
        f.write(b"RLPG" + os.urandom(57))
    tier = DiskTier(str(tmp_path), 3)
    assert tier.torn_bytes_dropped == 61
    assert _matches(tier, model, torch.arange(-500, 500))
    tier.put(torch.tensor([10_000]), torch.ones(1, 3))  # appends cleanly after the cut
    tier.close()
    tier = DiskTier(str(tmp_path), 3)
    assert tier.get(torch.tensor([10_000]))[1].item()
    tier.close()


def test_corrupt_crc_in_the_middle_is_detected_as_torn(tmp_path):
    tier = DiskTier(str(tmp_path), 2)
    tier.put(torch.tensor([1]), torch.ones(1, 2))
    tier.put(torch.tensor([2]), torch.ones(1, 2))
    tier.close()
    seg = tmp_path / sorted(p for p in os.listdir(tmp_path) if p.endswith(".log"))[-1]
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF  # flip a byte of the second record's row
    seg.write_bytes(bytes(data))
    tier = DiskTier(str(tmp_path), 2)
    assert tier.get(torch.tensor([1, 2]))[1].tolist() == [True, False]
    tier.close()


def test_wrong_width_and_second_opener_are_errors(tmp_path):
    tier = DiskTier(str(tmp_path), 4)
    tier.put(torch.tensor([1]), torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="another process"):
        DiskTier(str(tmp_path), 4)
    with pytest.raises(ValueError):
        tier.put(torch.tensor([1, 1]), torch.ones(2, 4))
    with pytest.raises(ValueError):
        tier.put(torch.tensor([1]), torch.ones(1, 3))
    tier.close()
    from gauss_plugins.stores.disk import CorruptLogError
    with pytest.raises(CorruptLogError, match="another dim"):
        DiskTier(str(tmp_path), 8)


def test_leftovers_of_an_interrupted_compaction_are_cleaned(tmp_path):
    tier = DiskTier(str(tmp_path), 2, min_compact_bytes=1 << 30)
    tier.put(torch.tensor([1, 2]), torch.ones(2, 2))
    tier.compact()
    tier.put(torch.tensor([3]), torch.ones(1, 2))
    tier.close()
    # a compaction output that was never renamed, and an old segment whose unlink was cut short
    (tmp_path / "seg-00000009.log.tmp").write_bytes(b"junk")
    (tmp_path / "seg-00000001.log").write_bytes(b"")
    tier = DiskTier(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["LOCK", "seg-00000002.log"]
    assert tier.get(torch.tensor([1, 2, 3]))[1].all()
    tier.close()


_WRITER = textwrap.dedent("""
    import sys, torch
    from gauss_plugins.stores.tierps import TierPS
    path, seed = sys.argv[1], int(sys.argv[2])
    # Small RAM and segments so that demotion, rotation and compaction all happen under the kill.
    ps = TierPS(4, path, ram_bytes=300 * 57, segment_bytes=64 << 10, min_compact_bytes=128 << 10)
    g = torch.Generator().manual_seed(seed)
    gen = 0
    while True:
        gen += 1
        ids = torch.randint(0, 2000, (200,), generator=g)
        # every value encodes (id, generation): the checker knows which values were ever written
        vals = torch.stack([ids.double(), torch.full((200,), float(gen), dtype=torch.float64)], 1).float()
        ps.put(ids, torch.cat([vals, vals], 1))
        if gen % 3 == 0:
            ps.delete(torch.randint(0, 2000, (20,), generator=g))
        if gen % 5 == 0:
            v = ps.flush()
            print(f"ACK {gen} {v}", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_kill_9_at_any_moment_keeps_acknowledged_rows(tmp_path, seed):
    """A TierPS writer in a subprocess is SIGKILLed at a random moment; the reopened store must
    hold every row state acknowledged by flush() (same set of ids, each with its acked value
    or a later written one), and must open cleanly."""
    path = str(tmp_path / "ps")
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), path, str(seed)], stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # blocks until the writer is up (imports take a while)
    assert first.startswith("ACK"), first
    acked_gen = int(first.split()[1])
    # Kill after a random while: somewhere in a put, a demotion, a flush, a rotation or a compaction.
    deadline = time.monotonic() + random.Random(seed).uniform(0.5, 2.0)
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        acked_gen = int(line.split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    # Lines still in the pipe were acknowledged too: the last one is the newest ack.
    for line in proc.stdout.read().splitlines():
        acked_gen = int(line.split()[1])
    assert acked_gen > 0, "the writer never acknowledged a flush"

    # Replay the writer's deterministic stream to know each id's value at every generation.
    g = torch.Generator().manual_seed(seed)
    history: dict = {}   # id -> list of (gen, alive)
    for gen in range(1, acked_gen + 50):  # the writer is at most 5 generations past its last ack
        ids = torch.randint(0, 2000, (200,), generator=g)
        for i in ids.tolist():
            history.setdefault(i, []).append((gen, True))
        if gen % 3 == 0:
            for i in torch.randint(0, 2000, (20,), generator=g).tolist():
                history.setdefault(i, []).append((gen, False))

    from gauss_plugins.stores.tierps import TierPS
    ps = TierPS(4, path, ram_bytes=300 * 57)
    got = ps.lookup(torch.arange(2000), promote=False)
    for i in range(2000):
        events = history.get(i, [])
        at_ack = [e for e in events if e[0] <= acked_gen]
        state_at_ack = at_ack[-1] if at_ack else (0, False)
        later = [e for e in events if e[0] > acked_gen]
        allowed_alive = {state_at_ack[1]} | {e[1] for e in later}
        assert got.found[i].item() in allowed_alive, (i, state_at_ack, later[:3])
        if got.found[i]:
            gen_seen = int(got.values[i, 1].item())
            assert int(got.values[i, 0].item()) == i
            allowed_gens = ({state_at_ack[0]} if state_at_ack[1] else set()) | {e[0] for e in later if e[1]}
            assert gen_seen in allowed_gens, (i, gen_seen, state_at_ack, later[:3])
    ps.close()
