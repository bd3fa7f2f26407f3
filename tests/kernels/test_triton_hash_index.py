"""TritonHashIndex against the reference TorchHashIndex.

The CPU tests run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, tiny
shapes). ``triton.jit`` picks interpreter or compiler when a kernel module is imported,
so the ``interp`` fixture imports fresh copies of the kernel modules with the variable set
and drops them again afterwards; other tests in the session see compiled kernels. The
``gpu`` tests compile the kernels for real on a CUDA device.
"""
from __future__ import annotations

import os

import pytest
import torch

from gauss_plugins.embedding.index import IndexFullError, TorchHashIndex, home_slots

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

pytest.importorskip("triton")


@pytest.fixture(params=[4, 64], ids=["block4", "block64"])
def make(interp, request):
    """Build interpreted indexes with a given keys-per-program (4: many programs and
    lanes of one program racing for one slot; 64: one program for most batches)."""

    class Index(interp.TritonHashIndex):
        BLOCK = request.param

    return lambda capacity: Index(capacity, "cpu")


def _keys(*values):
    return torch.tensor(values, dtype=torch.int64)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for name in sb:
        assert torch.equal(sa[name], sb[name]), name
    assert len(a) == len(b)


def _key_pool(gen, size):
    """Distinct keys with int64 extremes, negatives and neighbours of the extremes."""
    special = _keys(I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, -1, 0, 1, -2, -3)
    rand = torch.randint(I64_MIN, I64_MAX, (size,), generator=gen, dtype=torch.int64)
    return torch.unique(torch.cat([special, rand]))[:size]


def test_random_operations_agree_with_reference(make):
    gen = torch.Generator().manual_seed(0)
    pool = _key_pool(gen, 40)
    cap = 24  # 32 slots for up to 40 distinct keys: long probe chains and collisions
    tri, ref = make(cap), TorchHashIndex(cap)
    for step in range(24):
        op = step % 3
        keys = pool[torch.randint(0, pool.numel(), (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen)]
        if op == 0:
            try:
                want = ref.insert(keys)
            except IndexFullError:
                with pytest.raises(IndexFullError):
                    tri.insert(keys)
            else:
                got = tri.insert(keys)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        elif op == 1:
            assert torch.equal(tri.remove(keys), ref.remove(keys))
        else:
            assert torch.equal(tri.find(keys, default=-5), ref.find(keys, default=-5))
        _assert_same_state(tri, ref)
    assert torch.equal(tri.find(pool), ref.find(pool))


def test_duplicates_share_one_row_and_first_occurrence_is_new(make):
    tri = make(16)
    keys = _keys(7, I64_MIN, 7, 7, I64_MAX, I64_MIN, -1, 7)
    rows, is_new = tri.insert(keys)
    assert rows.tolist() == [0, 1, 0, 0, 2, 1, 3, 0]
    assert is_new.tolist() == [True, True, False, False, True, False, True, False]
    rows2, is_new2 = tri.insert(keys)
    assert torch.equal(rows2, rows) and not is_new2.any()
    assert len(tri) == 4


def test_colliding_keys_all_resolve(make, interp):
    # 8 slots (the minimum) and 6 keys sharing one home slot: one probe chain of 6.
    tri, ref = make(6), TorchHashIndex(6)
    cand = torch.arange(-5000, 5000, dtype=torch.int64)
    homes = home_slots(cand, tri.num_slots)
    same_home = cand[homes == homes[0]][:6]
    assert same_home.numel() == 6
    both = [idx.insert(same_home.flip(0)) for idx in (tri, ref)]
    assert torch.equal(both[0][0], both[1][0])
    assert torch.equal(tri.find(same_home), ref.find(same_home))
    # Remove from the middle of the chain: later keys stay reachable past the tombstone.
    mid = same_home[2:3]
    assert torch.equal(tri.remove(mid), ref.remove(mid))
    assert torch.equal(tri.find(same_home), ref.find(same_home))
    tomb = (tri.slot_rows == tri.TOMBSTONE).nonzero().squeeze(1)
    assert tomb.numel() == 1 and tri._tombstones == 1
    # Reinsert: the tombstone slot is reused and the row comes back from the free stack.
    assert torch.equal(tri.insert(mid)[0], ref.insert(mid)[0])
    assert tri.slot_keys[tomb].item() == mid.item() and tri.slot_rows[tomb].item() >= 0
    assert tri._tombstones == 0
    _assert_same_state(tri, ref)


def test_kernel_hash_matches_reference_home_slot(make):
    keys = _keys(I64_MIN, I64_MAX, -1, 0, 1, 123456789, -987654321987)
    for key in keys:
        tri = make(100)
        tri.insert(key.reshape(1))
        slot = (tri.slot_rows >= 0).nonzero().item()
        assert slot == home_slots(key.reshape(1), tri.num_slots).item()


def test_full_table_raises_and_changes_nothing(make):
    tri, ref = make(5), TorchHashIndex(5)
    first = _keys(1, 2, 3, -4)
    tri.insert(first), ref.insert(first)
    tri.remove(_keys(2)), ref.remove(_keys(2))  # a tombstone and a free row in play
    before = tri.state_dict()
    slots_before = (tri.slot_keys.clone(), tri.slot_rows.clone())
    for batch in (_keys(10, 11, 12, 1), torch.arange(100, 140, dtype=torch.int64)):  # rows run out / slots run out
        with pytest.raises(IndexFullError, match="capacity 5"):
            tri.insert(batch)
        with pytest.raises(IndexFullError):
            ref.insert(batch)
        after = tri.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(tri.slot_rows, slots_before[1])
    # Exactly filling the table still works.
    fill = _keys(10, 11, 1)
    assert torch.equal(tri.insert(fill)[0], ref.insert(fill)[0])
    assert len(tri) == 5
    _assert_same_state(tri, ref)


def test_remove_then_reinsert_reuses_rows_in_reference_order(make):
    tri, ref = make(10), TorchHashIndex(10)
    keys = torch.arange(-4, 6, dtype=torch.int64)
    for idx in (tri, ref):
        idx.insert(keys)
    gone = _keys(3, -4, 3, 99, 0)
    assert torch.equal(tri.remove(gone), ref.remove(gone))
    assert tri.find(_keys(3, -4, 0)).tolist() == [-1, -1, -1]
    back = _keys(50, 51, 50, 52)
    rows_t, new_t = tri.insert(back)
    rows_r, new_r = ref.insert(back)
    assert torch.equal(rows_t, rows_r) and torch.equal(new_t, new_r)
    # Freed rows come back in the order their keys were first named in remove: 3, -4, 0.
    assert rows_t.tolist() == [7, 0, 7, 4]
    with pytest.raises(IndexFullError):
        tri.insert(_keys(60))
    _assert_same_state(tri, ref)


def test_many_removals_trigger_rebuild_keeping_rows(make):
    tri, ref = make(12), TorchHashIndex(12)
    keys = torch.arange(1000, 1012, dtype=torch.int64)
    tri.insert(keys), ref.insert(keys)
    for k in keys[:8].tolist():
        tri.remove(_keys(k)), ref.remove(_keys(k))
    assert tri._tombstones * 4 <= tri.num_slots  # rebuilt along the way
    assert torch.equal(tri.find(keys), ref.find(keys))
    _assert_same_state(tri, ref)


def test_rehash_and_state_round_trip(make):
    tri, ref = make(6), TorchHashIndex(6)
    keys = _keys(I64_MIN, -9, 0, 9, I64_MAX)
    tri.insert(keys), ref.insert(keys)
    tri.remove(_keys(0)), ref.remove(_keys(0))
    tri.rehash(40), ref.rehash(40)
    assert tri.capacity == 40 and tri.num_slots == ref.num_slots
    assert torch.equal(tri.find(keys), ref.find(keys))
    _assert_same_state(tri, ref)
    with pytest.raises(ValueError, match="only grow"):
        tri.rehash(10)
    # State moves between backends exactly, allocator order included.
    other = make(1)
    other.load_state_dict(ref.state_dict())
    _assert_same_state(other, ref)
    more = _keys(5, 6, 7)
    assert torch.equal(other.insert(more)[0], ref.insert(more)[0])


def test_bad_input_is_rejected_without_change(make):
    tri = make(8)
    tri.insert(_keys(1, 2))
    before = tri.state_dict()
    with pytest.raises(TypeError, match="int64"):
        tri.insert(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="int64"):
        tri.find(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D"):
        tri.remove(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="meta"):
        tri.insert(torch.zeros(2, dtype=torch.int64, device="meta"))
    bad = dict(before, next_row=torch.tensor(1))
    with pytest.raises(ValueError, match="index state"):
        tri.load_state_dict(bad)
    after = tri.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_find_and_gather_matches_index_select(make):
    tri = make(20)
    keys = _keys(3, -3, I64_MAX, 8, 13)
    tri.insert(keys)
    values = torch.randn(20, 5)
    query = _keys(-3, 42, I64_MAX, 3, 3, I64_MIN)
    rows, out = tri.find_and_gather(query, values)
    assert torch.equal(rows, tri.find(query))
    want = torch.where((rows >= 0)[:, None], values[rows.clamp_min(0)], torch.zeros(()))
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="2-D"):
        tri.find_and_gather(query, values[0])


def test_needs_cuda_unless_interpreting(interp, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        interp.TritonHashIndex(8, "cpu")


def test_registered_as_triton_table_backend(fresh_registry):
    comp = fresh_registry.get_registry().get("table_backend", "triton")
    assert comp.factory == "gauss_kernels.hash_table.triton_index:TritonHashIndex"
    assert bool(comp.availability()) == torch.cuda.is_available()


# ------------------------------------------------------------------------------ GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                         reason="needs a CUDA device (and compiled kernels: TRITON_INTERPRET unset)")


@pytest.mark.gpu
@gpu
def test_gpu_matches_reference_at_scale():
    """Thousands of lanes racing: duplicates spread over many blocks, rows exact."""
    from gauss_kernels.hash_table.triton_index import TritonHashIndex
    from gauss_kernels.hash_table.triton_kernels import find_kernel

    assert type(find_kernel).__name__ == "JITFunction", "kernels must be compiled here, not interpreted"
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(1)
    cap = 200_000
    tri, ref = TritonHashIndex(cap, dev), TorchHashIndex(cap, dev)
    universe = torch.randint(I64_MIN, I64_MAX, (150_000,), device=dev, generator=gen)
    universe[:4] = torch.tensor([I64_MIN, I64_MAX, -1, 0], device=dev)
    for step in range(8):
        # Few distinct keys drawn many times: every key occurs in many blocks.
        keys = universe[torch.randint(0, 18_000 * (step + 1), (100_000,), device=dev, generator=gen)]
        rows_t, new_t = tri.insert(keys)
        rows_r, new_r = ref.insert(keys)
        assert torch.equal(rows_t, rows_r) and torch.equal(new_t, new_r)
        gone = universe[torch.randint(0, 150_000, (5_000,), device=dev, generator=gen)]
        assert torch.equal(tri.remove(gone), ref.remove(gone))
        assert torch.equal(tri.find(universe), ref.find(universe))
        _assert_same_state(tri, ref)
    values = torch.randn(cap, 64, device=dev)
    rows, out = tri.find_and_gather(universe, values)
    assert torch.equal(rows, ref.find(universe))
    assert torch.equal(out[rows >= 0], values[rows[rows >= 0]])
    assert not out[rows < 0].any()


@pytest.mark.gpu
@gpu
def test_gpu_full_table_rolls_back():
    from gauss_kernels.hash_table.triton_index import TritonHashIndex

    dev = torch.device("cuda", torch.cuda.current_device())
    tri = TritonHashIndex(1000, dev)
    tri.insert(torch.arange(900, device=dev))
    before = (tri.slot_keys.clone(), tri.slot_rows.clone())
    with pytest.raises(IndexFullError):
        tri.insert(torch.arange(500, 5000, device=dev))
    assert torch.equal(tri.slot_rows, before[1]) and len(tri) == 900
    assert torch.equal(tri.find(torch.arange(900, device=dev)), torch.arange(900, device=dev))
