"""The disk tier: random operations against a dict, reopen, torn tails vs damage, repair, compaction, kill -9."""
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


def test_damaged_last_record_of_the_active_segment_is_cut_as_torn(tmp_path):
    # A power loss can leave a full-length last record of zeros: indistinguishable from bit
    # rot there, and never acknowledged if it was a crash, so it is cut like a torn write.
    tier = DiskTier(str(tmp_path), 2)
    tier.put(torch.tensor([1]), torch.ones(1, 2))
    tier.put(torch.tensor([2]), torch.ones(1, 2))
    tier.close()
    seg = tmp_path / sorted(p for p in os.listdir(tmp_path) if p.endswith(".log"))[-1]
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF  # flip a byte of the second (last) record's row
    seg.write_bytes(bytes(data))
    tier = DiskTier(str(tmp_path), 2)
    assert tier.get(torch.tensor([1, 2]))[1].tolist() == [True, False]
    assert tier.torn_bytes_dropped == 48
    tier.close()


def _three_segments(tmp_path) -> list:
    """A log of three segments: seg 1 and 2 sealed (three 64-byte PUT records each), seg 3 active."""
    tier = DiskTier(str(tmp_path), 2, segment_bytes=150)
    for i in range(0, 14, 2):  # ids 0..13, two per record, values = id
        ids = torch.tensor([i, i + 1])
        tier.put(ids, ids.float()[:, None].repeat(1, 2), version=i)
    tier.close()
    segs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".log"))
    assert len(segs) == 3 and [(tmp_path / s).stat().st_size for s in segs] == [192, 192, 64]
    return [tmp_path / s for s in segs]


def _snapshot(folder) -> dict:
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder))}


def test_bit_rot_in_a_sealed_segment_is_an_error_and_changes_nothing(tmp_path):
    from gauss_plugins.stores.disk import CorruptLogError

    segs = _three_segments(tmp_path)
    data = bytearray(segs[0].read_bytes())
    data[64 + 50] ^= 0x01  # a row byte of the second record (ids 2, 3) of the sealed seg 1
    segs[0].write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(CorruptLogError) as err:
        DiskTier(str(tmp_path), 2)
    msg = str(err.value)
    assert str(segs[0]) in msg and "offset 64" in msg and "CRC mismatch" in msg and "sealed" in msg
    assert f"gauss store repair {tmp_path}" in msg
    assert err.value.path == str(segs[0]) and err.value.offset == 64
    assert _snapshot(tmp_path) == before, "a refused open must not truncate or delete anything"
    with pytest.raises(CorruptLogError):  # the failed open released the directory lock
        DiskTier(str(tmp_path), 2)


def test_bit_rot_in_the_middle_of_the_active_segment_is_an_error(tmp_path):
    from gauss_plugins.stores.disk import CorruptLogError

    tier = DiskTier(str(tmp_path), 2)
    for i in range(3):
        tier.put(torch.tensor([i]), torch.ones(1, 2))
    tier.close()
    seg = tmp_path / "seg-00000001.log"
    data = bytearray(seg.read_bytes())
    data[48 + 4] ^= 0x10  # the CRC field of the second of three records
    seg.write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(CorruptLogError, match=r"offset 48 .*followed by valid records at byte 96"):
        DiskTier(str(tmp_path), 2)
    assert _snapshot(tmp_path) == before


def test_damaged_reset_header_never_deletes_older_segments(tmp_path):
    from gauss_plugins.stores.disk import CorruptLogError

    segs = _three_segments(tmp_path)
    data = bytearray(segs[1].read_bytes())
    data[8] = 3  # the first record of seg 2 now claims to be a RESET ("forget the segments before")
    segs[1].write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(CorruptLogError, match="seg-00000002.log.*offset 0 "):
        DiskTier(str(tmp_path), 2)
    assert _snapshot(tmp_path) == before


def test_repair_reports_and_drops_exactly_the_damaged_records(tmp_path, capsys):
    from gauss_plugins.cli import main

    segs = _three_segments(tmp_path)
    data = bytearray(segs[0].read_bytes())
    data[64 + 50] ^= 0x01  # payload of the record holding ids 2, 3
    segs[0].write_bytes(bytes(data))
    data = bytearray(segs[1].read_bytes())
    data[128 + 24] ^= 0xFF  # the payload-length field of the record holding ids 10, 11
    segs[1].write_bytes(bytes(data))
    with open(segs[2], "ab") as f:
        f.write(b"RLPG" + bytes(13))  # and a torn tail on the active segment
    before = _snapshot(tmp_path)

    assert main(["store", "repair", str(tmp_path), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert _snapshot(tmp_path) == before, "--dry-run changed files"
    assert f"would drop {segs[0]}: bytes 64..128 (64 bytes, damaged: CRC mismatch)" in out
    assert "PUT of 2 rows, version 2; ids as stored: [2, 3]" in out
    assert f"would drop {segs[1]}: bytes 128..192 (64 bytes, damaged: record of" in out
    assert "record header unreadable" in out  # its length field is the damage
    assert f"would drop {segs[2]}: bytes 64..81 (17 bytes, torn tail of the active segment" in out
    assert "would drop 3 damaged range(s), 145 bytes" in out

    assert main(["store", "repair", str(tmp_path)]) == 0
    assert "dropped 3 damaged range(s)" in capsys.readouterr().out
    assert [s.stat().st_size for s in segs] == [128, 128, 64]
    tier = DiskTier(str(tmp_path), 2)
    rows, found = tier.get(torch.arange(14))
    assert found.tolist() == [i not in (2, 3, 10, 11) for i in range(14)]
    assert torch.equal(rows[found][:, 0], torch.arange(14)[found].float())
    assert tier.torn_bytes_dropped == 0
    tier.close()
    assert main(["store", "repair", str(tmp_path)]) == 0
    assert "nothing to drop" in capsys.readouterr().out


def test_repair_refuses_an_open_store_and_a_folder_without_a_log(tmp_path, capsys):
    from gauss_plugins.cli import main

    tier = DiskTier(str(tmp_path / "s"), 2)
    tier.put(torch.tensor([1]), torch.ones(1, 2))
    assert main(["store", "repair", str(tmp_path / "s")]) == 2
    assert "close the store first" in capsys.readouterr().err
    tier.close()
    assert main(["store", "repair", str(tmp_path / "empty")]) == 2
    assert "holds no segment log" in capsys.readouterr().err


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
