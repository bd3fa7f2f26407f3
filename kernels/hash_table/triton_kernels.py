"""Triton kernels of :class:`~gauss_kernels.hash_table.triton_index.TritonHashIndex`.

Slot layout (the same as :class:`gauss_plugins.embedding.index.TorchHashIndex`): two
arrays of ``num_slots`` entries, ``slot_keys`` int64 and ``slot_rows`` int32. The slot's
state lives in ``slot_rows``: ``>= 0`` a live key and its row, ``-1`` empty, ``-2`` a
tombstone, and, only while an insert kernel runs, ``<= -3`` a slot *claimed* by input
position ``-3 - state``. Keeping the state out of the key word is what lets every int64
be a key (no reserved key values).

Probing is linear from ``home_slot(key)`` (murmur3 fmix64, multiply-shift range
reduction, bit-identical to :func:`gauss_plugins.embedding.index.home_slots`). Each
program handles ``BLOCK`` keys, one per lane; a block loops until all its lanes resolved.

Why a claim names an input position: a lane that loses the race for a slot must learn the
winner's key to know whether it lost to a duplicate of its own key. Reading the key from
the (immutable, fully visible) input array needs no wait for the winner's key store and no
memory fences, so the insert is lock-free and free of spin-waits. Duplicates then
``atomic_max`` their own claim into the slot, so the slot ends up claimed by the *first*
occurrence of its key in the batch; rows are handed out after the kernel in that order,
which makes the result deterministic and equal to the reference index's.

The kernels call only triton.language builtins (no ``@jit`` helpers of its standard
library such as ``tl.max`` or ``tl.zeros``): those are compiled-only objects when triton was
imported before ``TRITON_INTERPRET=1`` was set, which is how the interpreter tests run.
"""
from __future__ import annotations

import triton
import triton.language as tl

EMPTY = -1
TOMBSTONE = -2
# Never a slot state (claims are >= -3 - (2**31 - 5)): a CAS comparing with it never
# succeeds, which is how lanes with nothing to claim take part in a CAS (it has no mask).
NO_MATCH = -(2**31)
# The same values as kernel constants (jit functions read only constexpr globals).
_EMPTY = tl.constexpr(EMPTY)
_TOMBSTONE = tl.constexpr(TOMBSTONE)
_NO_MATCH = tl.constexpr(NO_MATCH)


@triton.jit
def _home_slot(k, num_slots):
    """murmur3 fmix64 of the key, then ``((h >>> 32) * num_slots) >>> 32``."""
    h = k.to(tl.uint64, bitcast=True)
    h = h ^ (h >> 33)
    h = h * 0xFF51AFD7ED558CCD
    h = h ^ (h >> 33)
    h = h * 0xC4CEB9FE1A85EC53
    h = h ^ (h >> 33)
    return (((h >> 32) * num_slots.to(tl.uint64)) >> 32).to(tl.int64)


@triton.jit
def _max_i32(a, b):
    return tl.maximum(a, b)


@triton.jit
def _any(flags):
    """Whether any lane's flag is set (the block's loop condition)."""
    return tl.reduce(flags.to(tl.int32), 0, _max_i32) > 0


@triton.jit
def _next_slot(pos, num_slots):
    pos = pos + 1
    return tl.where(pos == num_slots, 0, pos)


# Sizes are not specialised on (triton would compile a variant per divisibility of n).
@triton.jit(do_not_specialize=["n", "num_slots", "default"])
def find_kernel(keys_ptr, rows_out_ptr, slots_out_ptr, slot_keys_ptr, slot_rows_ptr,
                n, num_slots, default,
                WRITE_SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """rows_out[i] = row of keys[i] or ``default``; slots_out[i] = its slot or -1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(keys_ptr + offs, mask=mask, other=0)
    pos = _home_slot(k, num_slots)
    row = tl.full([BLOCK], -1, tl.int64)
    slot = tl.full([BLOCK], -1, tl.int64)
    active = mask
    steps = 0
    # A probe ends at the key or at an empty slot; the step bound only matters for a
    # table with no empty slot left (live + tombstones == num_slots).
    while (_any(active)) & (steps < num_slots):
        # Both loads are issued together (the key load does not wait for the state): a
        # probe step costs one memory latency, not two.
        s = tl.load(slot_rows_ptr + pos, mask=active, other=_EMPTY)
        sk = tl.load(slot_keys_ptr + pos, mask=active, other=0)
        hit = active & (s >= 0) & (sk == k)
        row = tl.where(hit, s.to(tl.int64), row)
        slot = tl.where(hit, pos, slot)
        active = active & (~hit) & (s != _EMPTY)
        pos = _next_slot(pos, num_slots)
        steps += 1
    tl.store(rows_out_ptr + offs, tl.where(slot >= 0, row, default), mask=mask)
    if WRITE_SLOTS:
        tl.store(slots_out_ptr + offs, slot, mask=mask)


@triton.jit(do_not_specialize=["n", "num_slots", "dim"])
def find_gather_kernel(keys_ptr, values_ptr, out_ptr, rows_out_ptr, slot_keys_ptr, slot_rows_ptr,
                       n, num_slots, dim, stride_v, stride_o,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Probe, then copy each found key's value row into ``out`` (zeros where absent)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(keys_ptr + offs, mask=mask, other=0)
    pos = _home_slot(k, num_slots)
    row = tl.full([BLOCK], -1, tl.int64)
    active = mask
    steps = 0
    while (_any(active)) & (steps < num_slots):
        # Both loads are issued together (the key load does not wait for the state): a
        # probe step costs one memory latency, not two.
        s = tl.load(slot_rows_ptr + pos, mask=active, other=_EMPTY)
        sk = tl.load(slot_keys_ptr + pos, mask=active, other=0)
        hit = active & (s >= 0) & (sk == k)
        row = tl.where(hit, s.to(tl.int64), row)
        active = active & (~hit) & (s != _EMPTY)
        pos = _next_slot(pos, num_slots)
        steps += 1
    tl.store(rows_out_ptr + offs, row, mask=mask)
    # One [BLOCK, BLOCK_D] tile covers the whole row (BLOCK_D >= dim, a power of two).
    found = row >= 0
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < dim
    v = tl.load(values_ptr + row[:, None] * stride_v + cols[None, :],
                mask=found[:, None] & cmask[None, :], other=0)
    tl.store(out_ptr + offs[:, None] * stride_o + cols[None, :], v,
             mask=mask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["n", "num_slots"])
def insert_claim_kernel(keys_ptr, slots_out_ptr, won_out_ptr, slot_keys_ptr, slot_rows_ptr,
                        n, num_slots, BLOCK: tl.constexpr):
    """Find or claim a slot for every key of a batch (rows are written afterwards).

    Outputs: ``slots_out[i]`` the slot holding keys[i] (a live slot, or one claimed in this
    call; -1 if no free slot was left), ``won_out[i]`` the slot's previous state (-1 or -2)
    if lane i's CAS claimed it, else 0 (the caller needs it to roll a failed insert back).

    Lanes run a small state machine. SEARCH walks the probe sequence to the first empty
    slot, remembering the first tombstone; reaching the empty slot proves the key absent
    from the pre-existing entries. CLAIM then walks from that tombstone (or the empty slot)
    and CASes the first free slot. Slots only go free -> claimed during the call, so two
    lanes with one key walk the same sequence and meet at one slot: one wins the CAS, the
    other sees a claim whose input key equals its own. Stale plain loads are harmless for
    the same reason: a stale "free" is corrected by the CAS, which returns the real state.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(keys_ptr + offs, mask=mask, other=0)
    me = (-3 - offs).to(tl.int32)  # this lane's claim marker
    pos = _home_slot(k, num_slots)
    mode = tl.where(mask, 0, 2)  # 0 SEARCH, 1 CLAIM, 2 DONE
    first_free = tl.full([BLOCK], -1, tl.int64)
    slot = tl.full([BLOCK], -1, tl.int64)
    won = tl.full([BLOCK], 0, tl.int32)
    steps = 0
    # SEARCH and CLAIM each visit at most num_slots slots.
    while (_any(mode < 2)) & (steps <= 2 * num_slots + 1):
        running = mode < 2
        s = tl.load(slot_rows_ptr + pos, mask=running, other=_EMPTY)
        # Loaded with the state, not after it (one latency per step). Only a live slot's
        # key is used, and live slots never change during the call.
        sk = tl.load(slot_keys_ptr + pos, mask=running & (mode == 0), other=0)
        free = (s == _EMPTY) | (s == _TOMBSTONE)
        # Claim here: in CLAIM at any free slot, or in SEARCH at an empty slot with no
        # tombstone seen before it (the usual case: claim without a second walk).
        want = running & free & ((mode == 1) | ((s == _EMPTY) & (first_free < 0)))
        # atomic_cas has no mask: every lane of the block would issue an atomic, so skip the
        # whole CAS on the (frequent, at high load) steps where no lane wants one.
        if _any(want):
            old = tl.atomic_cas(slot_rows_ptr + pos, tl.where(want, s, _NO_MATCH), me, sem="relaxed")
        else:
            old = s
        got = want & (old == s)
        s = tl.where(want & (~got), old, s)  # lost the race: `old` is a claim
        tl.store(slot_keys_ptr + pos, k, mask=got)
        # Claimed in this call by input position -3 - s: compare with that input key.
        claimed = running & (~got) & (s <= -3)
        owner = tl.where(claimed, -3 - s.to(tl.int64), 0)
        owner_key = tl.load(keys_ptr + owner, mask=claimed, other=0)
        same = claimed & (owner_key == k)
        tl.atomic_max(slot_rows_ptr + pos, me, mask=same, sem="relaxed")  # first occurrence wins
        # A live key (states >= 0 are never created during the call, so only SEARCH looks).
        hit = running & (mode == 0) & (s >= 0) & (sk == k)
        done = got | same | hit
        slot = tl.where(done, pos, slot)
        won = tl.where(got, s, won)
        first_free = tl.where(running & (mode == 0) & (s == _TOMBSTONE) & (first_free < 0), pos, first_free)
        end_search = running & (mode == 0) & (~done) & (s == _EMPTY) & (first_free >= 0)
        nxt = _next_slot(pos, num_slots)
        pos = tl.where(end_search, first_free, tl.where(running & (~done), nxt, pos))
        # A SEARCH lane that lost its CAS at an empty slot continues as CLAIM from there.
        lost_at_empty = running & (mode == 0) & want & (~done)
        mode = tl.where(done, 2, tl.where(end_search | lost_at_empty, 1, mode))
        steps += 1
    tl.store(slots_out_ptr + offs, slot, mask=mask)
    tl.store(won_out_ptr + offs, won, mask=mask)


@triton.jit(do_not_specialize=["n", "num_slots"])
def place_kernel(keys_ptr, rows_ptr, slot_keys_ptr, slot_rows_ptr, n, num_slots, BLOCK: tl.constexpr):
    """Write distinct keys that are absent from the table with given rows (rebuild, load).

    With distinct keys no lane ever needs another's key, so the CAS publishes the row
    directly. The caller guarantees more empty slots than keys, so every lane terminates.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(keys_ptr + offs, mask=mask, other=0)
    r = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int32)
    pos = _home_slot(k, num_slots)
    active = mask
    while _any(active):
        s = tl.load(slot_rows_ptr + pos, mask=active, other=0)
        want = active & (s == _EMPTY)
        if _any(want):
            old = tl.atomic_cas(slot_rows_ptr + pos, tl.where(want, _EMPTY, _NO_MATCH), r, sem="relaxed")
        else:
            old = s
        got = want & (old == _EMPTY)
        tl.store(slot_keys_ptr + pos, k, mask=got)
        active = active & (~got)
        pos = tl.where(active, _next_slot(pos, num_slots), pos)


# --------------------------------------------------------------------------- sparse optimizer
@triton.jit
def _add_f32(a, b):
    return a + b


@triton.jit
def _pow_f64(base, t):
    """``base ** t`` for fp64 ``base`` and int64 ``t >= 0`` by square-and-multiply: libdevice's
    pow does not run under the interpreter. Exact for t <= 2 and within a few fp64 ulps
    beyond, which the float32 results below never see."""
    result = tl.full(base.shape, 1.0, tl.float64)
    for i in range(63):  # a loop, not unrolled: the kernel stays small
        result = tl.where(((t >> i) & 1) != 0, result * base, result)
        base = base * base
    return result


@triton.jit(do_not_specialize=["n_rows", "dim", "stamp_value"])
def masked_update_kernel(weight_ptr, grads_ptr, touched_ptr, ok_ptr, state1_ptr, state2_ptr, step_ptr, hp_ptr,
                         stamp_ptr, n_rows, dim, stamp_value, lr, eps, weight_decay, w1, w2, b2,
                         KIND: tl.constexpr, HAS_DECAY: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One sparse-optimizer step of every row where ``touched[row] and ok[0]`` (the
    table's sync-free step): the others, and all rows when ``ok[0]`` is False (a NaN/inf in
    the step), are neither read nor written. Rows are contiguous ``[n_rows, dim]`` arrays;
    ``grads`` float32 sums. KIND: 0 sgd, 1 adagrad (state1 ``[n, dim]``), 2 rowwise adagrad
    (state1 ``[n]``), 3 adam (state1/state2 moments ``[n, dim]``, ``step`` int64 ``[n]``,
    ``hp`` float64 ``[lr, beta1, beta2]`` for the bias corrections, which torch computes in
    float64). The float32 arithmetic follows
    :class:`gauss_plugins.embedding.sparse_rules.SparseRule` step by step (IEEE division and
    square root); the compiler may fuse a multiply and an add, so results agree with the
    torch rules within a float32 ulp or two rather than bit for bit. Also stamps the updated
    rows with ``stamp_value`` (int32)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = r < n_rows
    ok = tl.load(ok_ptr).to(tl.int32) != 0
    apply = in_range & (tl.load(touched_ptr + r, mask=in_range, other=0).to(tl.int32) != 0) & ok
    d = tl.arange(0, BLOCK_D)
    m2 = apply[:, None] & (d < dim)[None, :]
    off = r[:, None] * dim + d[None, :]
    w_raw = tl.load(weight_ptr + off, mask=m2, other=0.0)
    w = w_raw.to(tl.float32)
    g = tl.load(grads_ptr + off, mask=m2, other=0.0)
    if HAS_DECAY:
        g = g + weight_decay * w
    if KIND == 0:
        new_w = w - lr * g
    elif KIND == 1:
        s = tl.load(state1_ptr + off, mask=m2, other=0.0) + g * g
        tl.store(state1_ptr + off, s, mask=m2)
        new_w = w - lr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
    elif KIND == 2:
        s = tl.load(state1_ptr + r, mask=apply, other=0.0) + tl.div_rn(tl.reduce(g * g, 1, _add_f32),
                                                                       dim.to(tl.float32))
        tl.store(state1_ptr + r, s, mask=apply)
        mult = tl.div_rn(tl.full(s.shape, 0.0, tl.float32) + lr, tl.sqrt_rn(s) + eps)
        new_w = w - mult[:, None] * g
    else:
        t = tl.load(step_ptr + r, mask=apply, other=0) + 1
        tl.store(step_ptr + r, t, mask=apply)
        lr64 = tl.load(hp_ptr)
        bc1 = 1.0 - _pow_f64(tl.full(t.shape, 0.0, tl.float64) + tl.load(hp_ptr + 1), t)
        bc2 = 1.0 - _pow_f64(tl.full(t.shape, 0.0, tl.float64) + tl.load(hp_ptr + 2), t)
        # float64 division and square root are IEEE (round to nearest) on the GPU as written
        step_size = ((tl.full(t.shape, 0.0, tl.float64) + lr64) / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        m0 = tl.load(state1_ptr + off, mask=m2, other=0.0)
        m = m0 + w1 * (g - m0)
        v = tl.load(state2_ptr + off, mask=m2, other=0.0) * b2 + w2 * (g * g)
        tl.store(state1_ptr + off, m, mask=m2)
        tl.store(state2_ptr + off, v, mask=m2)
        den = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt[:, None]) + eps
        new_w = w - step_size[:, None] * tl.div_rn(m, den)
    tl.store(weight_ptr + off, new_w.to(w_raw.dtype), mask=m2)
    tl.store(stamp_ptr + r, tl.full(r.shape, 0, tl.int32) + stamp_value, mask=apply)
