"""Triton kernels of fused HSTU attention on jagged sequences: forward, dK/dV, dQ.

Per sequence b (rows ``offsets[b]:offsets[b+1]`` of the jagged ``[T, H, d]`` tensors) and
head h::

    s   = alpha * q k^T + rab[b, h, :n, :n] + position_bias[pidx(i, j)] + time_bias[tidx(i, j)]
    p   = silu(s) * valid(i, j) * scale          # scale = 1 / normaliser
    out = p v

and the backward pass, with sigma = sigmoid(s)::

    dv   = p^T do
    ds   = (do v^T) * sigma * (1 + s * (1 - sigma)) * valid * scale      (= drab)
    dq   = alpha * ds k,   dk = alpha * ds^T q
    d position_bias[r] = sum of ds over (b, h, i, j) with pidx(i, j) = r   (time_bias alike)

The relative-bias indices (``pidx`` from the position ids, ``tidx`` the log-time bucket of
``t_next(i) - t_j``; see :mod:`gauss_plugins.hstu.attention`) are computed per tile from
row/column numbers and the per-token timestamps; the 1-D tables stay in cache, so no
``[B, N, N]`` bias or bias gradient exists. When ids are plain positions (no targets, no
contextual prefix) the position bias is instead read from a "strip" (``_strip_pointers``): a
``[128, 2L + 128]`` layout of the halved table in which a tile's bias is one unit-stride 2-D
load, as a K tile is; per-element index arithmetic and gathers made the bias cost 2.4x the
unbiased fwd+bwd at N=4096 on the H200, the strips 1.28x (2026-11-29). The dK/dV kernel reduces the tables' gradients
into fp32 rows, one per (sequence, head) for the position table ([B * H, 2L - 1]) and one
per program for the time table ([programs, num_buckets + 1]), summed by one small torch
reduction after: with relaxed atomics per (query, key) pair for
the time table and, with targets or a contextual prefix, the position table; when ids are
plain positions, the position index is constant along a tile's diagonals, so a register
gather rotates each key row, each thread sums its rows of every diagonal, and the partial
sums a later query block still adds to are carried to it in registers: BLOCK_M bins (one
partial per warp) go out per block instead of one atomic per pair
(:func:`_diagonal_position_grads_carried`). The atomics make the tables' gradients
deterministic only up to fp32 rounding order; dq, dk, dv stay atomic-free and deterministic.

``valid(i, j)`` is computed from the row and column indices inside the kernels (see
:func:`_valid`); it is the same definition as
:func:`gauss_plugins.hstu.attention.attention_mask`, checked against it by the tests.

Design choices (and why):
- Three kernels: forward; dK/dV (one program per key block, looping over query blocks);
  dQ (one program per query block, looping over key blocks). The separate dQ pass
  recomputes q k^T and do v^T but accumulates dq in fp32 registers of one program, so there
  are no atomics and no rounding of partial sums in a low-precision buffer: dq stays as
  accurate at N=4096 as at N=256, and the result is deterministic.
- The 1/normaliser scale is applied once at the end (to out, dv, dk, dq) rather than per
  element: one multiply less per score, and fp16 scores are not pushed towards subnormals.
- The kernels work with u = s / 2 (alpha / 2 folded into the score scale): then
  ``silu(s) = u + u * tanh(u)`` and ``2 silu'(s) = (1 + t)(1 + u - u t)`` with t = tanh(u).
  In bf16/fp16 t is the hardware ``tanh.approx.f32``: one special-function instruction and
  a few FMAs per score instead of exp + reciprocal + multiplies; the special-function unit
  and the FMA pipe, not the tensor cores, otherwise bound this kernel. Its error (~2^-11
  relative) is below the bf16/fp16 rounding of p. In fp32/fp64, and under the
  interpreter, the exact sigmoid is used.
- Pure causal masking (no targets, no contextual prefix, no window) splits each row block's
  loop into the blocks strictly below the diagonal, which need no mask at all, and the
  diagonal blocks, which do. Other mask modes evaluate ``valid`` on every block they visit,
  but visit only the blocks the mask can reach.
- Programs are launched heaviest first (the longest causal rows), so the tail of the grid is
  made of short programs.
"""
from __future__ import annotations

import triton
import triton.language as tl


# Only triton builtins inside the kernels (tl.full, not the @jit stdlib tl.zeros): the
# stdlib functions are decorated when triton.language is imported, so under the
# interpreter they would be compiled-mode functions if triton was imported first.

# ------------------------------------------------------------------ elementwise helpers
@triton.jit
def _tanh_approx(x):
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _silu_half(u, FAST: tl.constexpr):
    """silu(s) from u = s / 2: ``s * sigmoid(s) = u * (1 + tanh(u))``, one special-function
    instruction and one FMA on the fast path."""
    if FAST:
        return u + u * _tanh_approx(u)
    else:
        return 2.0 * u / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _silu_and_grad_half(u, FAST: tl.constexpr):
    """(silu(s), 2 * silu'(s)) from u = s / 2, with t = tanh(u), sigmoid(s) = (1 + t) / 2:
    ``silu'(s) = sigmoid(s) (1 + s (1 - sigmoid(s))) = (1 + t)(1 + u (1 - t)) / 2``; the
    factor 1/2 is applied once to the final sums by the caller."""
    if FAST:
        t = _tanh_approx(u)
        one_t = 1.0 + t
        return u * one_t, one_t * (1.0 + (u - u * t))
    else:
        sig = 1.0 / (1.0 + tl.exp(-2.0 * u))
        return 2.0 * u * sig, 2.0 * sig * (1.0 + 2.0 * u * (1.0 - sig))


@triton.jit
def _ids(pos, last, contextual_len, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr):
    """Position -> mask id (attention_mask rules 1 and 2): the contextual prefix shares
    id 0, the targets share the id ``last`` of the first target."""
    ids = pos
    if HAS_CONTEXT:
        ids = tl.maximum(pos - contextual_len + 1, 0)
    if HAS_TARGETS:
        ids = tl.minimum(ids, last)
    return ids


@triton.jit
def _valid(
    rows,
    cols,
    seq_len,
    last,
    contextual_len,
    max_attn_len,
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Which (row, col) positions of one sequence attend; rows [M, 1], cols [1, N].

    Exactly :func:`gauss_plugins.hstu.attention.attention_mask`: ids from positions,
    ``dist = id_i - id_j`` (absolute when not causal); attend when ``i == j`` or
    ``dist > 0``, and ``dist <= max_attn_len`` with a window; prefix rows (id 0) also
    attend to every non-target key (``id_j < last``); nothing outside the sequence.
    """
    ri = _ids(rows, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    ci = _ids(cols, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    dist = ri - ci
    if not CAUSAL:
        dist = tl.abs(dist)
    valid = (rows == cols) | (dist > 0)
    if HAS_WINDOW:
        valid = valid & (dist <= max_attn_len)
    if HAS_CONTEXT:
        valid = valid | ((ri == 0) & (ci < last))
    return valid & (rows < seq_len) & (cols < seq_len)


@triton.jit
def _first_pos_with_id(x, contextual_len, HAS_CONTEXT: tl.constexpr):
    """Smallest position whose id is >= x (for x <= last)."""
    if HAS_CONTEXT:
        return tl.where(x > 0, x + contextual_len - 1, 0)
    else:
        return tl.maximum(x, 0)


@triton.jit
def _end_pos_with_id(y, seq_len, last, contextual_len, HAS_CONTEXT: tl.constexpr):
    """One past the largest position whose id is <= y."""
    if HAS_CONTEXT:
        end = y + contextual_len
    else:
        end = y + 1
    return tl.where(y >= last, seq_len, tl.minimum(end, seq_len))


@triton.jit
def _col_range(
    start_m,
    seq_len,
    last,
    contextual_len,
    max_attn_len,
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key range [lo, hi) (lo BLOCK_N-aligned) holding every key that the query rows
    [start_m, start_m + BLOCK_M) attend to. Ids grow with position, which bounds it:
    causal rows see ids below theirs (keys j < i) and, for prefix rows, all the history;
    a window keeps ids >= id(first row) - w."""
    end_m = tl.minimum(start_m + BLOCK_M, seq_len)
    hi = seq_len
    lo = seq_len * 0
    if CAUSAL:
        hi = end_m
        if HAS_CONTEXT:
            hi = tl.where(start_m < contextual_len, seq_len, hi)
    if HAS_WINDOW:
        first_id = _ids(start_m, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
        lo = _first_pos_with_id(first_id - max_attn_len, contextual_len, HAS_CONTEXT)
        lo = (lo // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            last_id = _ids(end_m - 1, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
            hi = _end_pos_with_id(last_id + max_attn_len, seq_len, last, contextual_len, HAS_CONTEXT)
            if HAS_CONTEXT:
                hi = tl.where(start_m < contextual_len, seq_len, hi)
    return lo, hi


@triton.jit
def _row_range(
    start_n,
    seq_len,
    last,
    contextual_len,
    max_attn_len,
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Query rows that attend to some key of [start_n, start_n + BLOCK_N), as two
    BLOCK_M-aligned disjoint ranges: the prefix rows [0, pre_hi) (which see every
    non-target key, window or not) and the main range [lo, hi)."""
    end_n = tl.minimum(start_n + BLOCK_N, seq_len)
    first_id = _ids(start_n, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    lo = seq_len * 0
    hi = seq_len
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M + lo
    if HAS_WINDOW:
        last_id = _ids(end_n - 1, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
        hi = _end_pos_with_id(last_id + max_attn_len, seq_len, last, contextual_len, HAS_CONTEXT)
        if not CAUSAL:
            lo = _first_pos_with_id(first_id - max_attn_len, contextual_len, HAS_CONTEXT)
            lo = (lo // BLOCK_M) * BLOCK_M
    pre_hi = lo * 0
    if HAS_CONTEXT:
        pre_hi = tl.minimum(((contextual_len + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
        pre_hi = tl.where(first_id < last, pre_hi, 0)
    lo = tl.maximum(lo, pre_hi)
    return pre_hi, lo, hi


# ------------------------------------------------------------------ per-program setup
@triton.jit
def _sequence(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS: tl.constexpr,
              HAS_CONTEXT: tl.constexpr):
    """Start row, length and the id ``last`` of the first target of sequence b."""
    seq_start = tl.load(seq_offsets + b)
    seq_len = (tl.load(seq_offsets + b + 1) - seq_start).to(tl.int32)
    last = seq_len
    if HAS_CONTEXT:
        last = last - contextual_len + 1
    if HAS_TARGETS:
        last = last - tl.load(num_targets + b).to(tl.int32)
    return seq_start, seq_len, last


@triton.jit
def _row_scale(scale, seq_len, SCALE_BY_SEQ_LEN: tl.constexpr):
    """1 / normaliser: the constant ``scale`` (1 / max_seq_len) or 1 / this length."""
    if SCALE_BY_SEQ_LEN:
        return 1.0 / seq_len.to(tl.float32)
    else:
        return scale


# ------------------------------------------------------------------ relative bias from tables
@triton.jit
def _history_end(num_targets, b, seq_len, HAS_TARGETS: tl.constexpr):
    """First position of sequence b that is a target (its length without targets)."""
    if HAS_TARGETS:
        return seq_len - tl.load(num_targets + b).to(tl.int32)
    else:
        return seq_len


@triton.jit
def _query_times(TS, seq_start, rows, seq_len, history_end):
    """t_next of query rows: the next event's time while the next position is history,
    else the row's own time (targets; the last history row)."""
    use_next = rows + 1 < history_end
    t_next = tl.load(TS + seq_start + rows + 1, mask=use_next, other=0)
    t_own = tl.load(TS + seq_start + rows, mask=(rows < seq_len) & (rows + 1 >= history_end), other=0)
    return tl.where(use_next, t_next, t_own)


@triton.jit
def _position_index(row_ids, col_ids, pos_center):
    """Index into position_bias [2 * pos_center + 1]; the clamp only matters for rows or
    columns past the sequence (masked), whose ids can be out of the table's range."""
    return tl.minimum(tl.maximum(col_ids - row_ids + pos_center, 0), 2 * pos_center)


@triton.jit
def _time_index(query_times, key_times, inv_scale, num_buckets):
    """floor(log(max(|dt|, 1)) * inv_scale) clamped to [0, num_buckets], in fp32 exactly as
    the reference computes it (so both pick the same bucket)."""
    gap = tl.maximum(tl.abs(query_times - key_times), 1).to(tl.float32)
    bucket = tl.floor(tl.log(gap) * inv_scale).to(tl.int32)
    return tl.minimum(tl.maximum(bucket, 0), num_buckets)


@triton.jit
def _add_table_bias(u, row_ids, col_ids, query_times, key_times, POS, TB, pos_center, inv_scale, num_buckets,
                    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, IN_RANGE: tl.constexpr):
    """u + bias / 2 (the kernels work with u = s / 2); tables are tiny and cached, so the
    gathers cost little next to the tile's dots. IN_RANGE: every row and column is inside
    the sequence (unmasked blocks), so the position index needs no clamp."""
    if HAS_POS:
        if IN_RANGE:
            index = col_ids - row_ids + pos_center
        else:
            index = _position_index(row_ids, col_ids, pos_center)
        u += 0.5 * tl.load(POS + index).to(tl.float32)
    if HAS_TIME:
        u += 0.5 * tl.load(TB + _time_index(query_times, key_times, inv_scale, num_buckets)).to(tl.float32)
    return u


@triton.jit
def _table_bias_grads(ds, mask, row_ids, col_ids, query_times, key_times, DPOS, DTB, pos_center, inv_scale,
                      num_buckets, POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr):
    """Adds ds into this program's rows of the table-gradient buffers, by index:
    relaxed atomics (many pairs share an index), summed over the rows on the host."""
    if POS_GRAD:
        tl.atomic_add(DPOS + _position_index(row_ids, col_ids, pos_center), ds.to(DPOS.dtype.element_ty),
                      mask=mask, sem="relaxed")
    if TIME_GRAD:
        tl.atomic_add(DTB + _time_index(query_times, key_times, inv_scale, num_buckets),
                      ds.to(DTB.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _strip_pointers(PS, stride_ps, shift, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Pointers into a position strip built by :func:`hstu_position_strips_kernel`:
    ``strip[r, x] = position_bias[pos_center + x - ps_shift - r] / 2`` for the forward and dQ
    tiles (rows = queries), and ``position_bias[pos_center + r - x + ps_shift] / 2`` for the
    dK/dV kernel's transposed tiles (rows = keys). A tile's half-bias is then one unit-stride
    load at ``strip[r, c + start]`` (``shift`` folds this program's row block in) instead of a
    gather with index arithmetic per element; rows start 16-byte aligned so loads vectorise."""
    return PS + tl.arange(0, ROWS)[:, None] * stride_ps + tl.arange(0, COLS)[None, :] + shift


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _diagonal_position_grads(dst, start_n, start_m, pos_center, DPOS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adds a transposed dS tile ``dst`` [keys, queries] into the position-bias gradient
    when ids are positions (no targets, no contextual prefix): then a pair's index is
    ``start_n - start_m + pos_center + (jl - il)``, constant along the tile's diagonals.

    Each key row jl is rotated by jl (one register gather), so that column c holds the
    pairs with ``jl - il = c (mod BLOCK_M)``; masked column sums, one per wrap m, give the
    diagonal sums, added with BLOCK_M atomics per wrap instead of one per pair. Pairs the
    mask removed hold dS = 0, so they add nothing."""
    jl = tl.arange(0, BLOCK_N)[:, None]
    c = tl.arange(0, BLOCK_M)[None, :]
    il = (jl - c + BLOCK_M) % BLOCK_M
    rotated = tl.gather(dst, tl.broadcast_to(il, (BLOCK_N, BLOCK_M)), 1)
    wrap = (jl - il - c + 2 * BLOCK_M) // BLOCK_M - 2  # (jl - il - c) / BLOCK_M, exactly
    base = start_n - start_m + pos_center
    cols = tl.arange(0, BLOCK_M)
    for m in tl.static_range(-1, (BLOCK_N - 1) // BLOCK_M + 1):
        sums = tl.reduce(tl.where(wrap == m, rotated, 0.0), 0, _add)
        index = base + cols + m * BLOCK_M
        tl.atomic_add(DPOS + index, sums.to(DPOS.dtype.element_ty), mask=(index >= 0) & (index <= 2 * pos_center),
                      sem="relaxed")


@triton.jit
def _diagonal_position_grads_by_rows(dst, start_n, start_m, pos_center, DPOS, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr):
    """As :func:`_diagonal_position_grads`, rotating the other way: query column il is
    rotated by il along the key rows (a gather across rows), so that row r holds the pairs
    with ``jl - il = r - BLOCK_N * q`` (q = (r + il) // BLOCK_N); the diagonal sums are then
    row sums, a reduction along the tile's column axis (inside a warp) instead of across warps."""
    r = tl.arange(0, BLOCK_N)[:, None]
    il = tl.arange(0, BLOCK_M)[None, :]
    jl = tl.broadcast_to((r + il) % BLOCK_N, (BLOCK_N, BLOCK_M))
    rotated = tl.gather(dst, jl, 0)
    wrap = (r + il) // BLOCK_N
    base = start_n - start_m + pos_center
    rows = tl.arange(0, BLOCK_N)
    for q in tl.static_range(0, (BLOCK_N + BLOCK_M - 2) // BLOCK_N + 1):
        sums = tl.reduce(tl.where(wrap == q, rotated, 0.0), 1, _add)
        index = base + rows - q * BLOCK_N
        tl.atomic_add(DPOS + index, sums.to(DPOS.dtype.element_ty), mask=(index >= 0) & (index <= 2 * pos_center),
                      sem="relaxed")


@triton.jit
def _diagonal_position_grads_carried(dst, scale, carry0, carry1, start_n, start_m, pos_center, DPOS,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """As :func:`_diagonal_position_grads` (key rows rotated along the queries), but without
    a reduction across warps and with the wraps carried from one query block to the next.

    - The rotated tile is summed over its key rows only within each thread: reshaped to
      ``[BLOCK_N / G, G, BLOCK_M]`` (key row ``G a + b``; G, the number of warps, is the
      carries' first dim), summed over ``a``; the G partial rows of each diagonal sum go out
      as atomics. With the warps along the key rows, as triton lays out the rotated tile,
      the rows of one ``a`` are in different warps and the sum over ``a`` stays inside each
      thread. A full column sum (shared memory and barriers, once per wrap) stalled every
      warp of the program once per wrap and tile.
    - The dK/dV loops advance ``start_m`` by exactly BLOCK_M, so the bins of wrap m of one
      query block are the bins of wrap m + 1 of the next. The partials of the wraps whose
      bins later blocks still reach are carried in registers (``carry0``: the bins of wrap 0
      of this block, ``carry1``: wrap 1) and added to the next block's, so each bin goes
      out once per program: BLOCK_M bins per block instead of BLOCK_M per wrap.
      :func:`_flush_position_carry` sends the carried partials after the last block.
    - ``dst`` is dS up to the factor ``scale`` (constant per program), applied to the sums as
      they go out rather than to every pair.
    - Each pair belongs to exactly one wrap, so wrap 0's partials are the row sums minus the
      other wraps' (one select and add per pair fewer; the rounding error stays within that
      of summing the same pairs).
    This needs BLOCK_N <= 2 * BLOCK_M (at most three wraps); wider key tiles send every
    wrap's partials at once, carrying nothing."""
    jl = tl.arange(0, BLOCK_N)[:, None]
    c = tl.arange(0, BLOCK_M)[None, :]
    rotated = tl.gather(dst, tl.broadcast_to((jl - c + BLOCK_M) % BLOCK_M, (BLOCK_N, BLOCK_M)), 1)
    G: tl.constexpr = carry0.shape[0]
    rotated = tl.reshape(rotated, (BLOCK_N // G, G, BLOCK_M))
    jl3 = tl.arange(0, BLOCK_N // G)[:, None, None] * G + tl.arange(0, G)[None, :, None]
    c3 = tl.arange(0, BLOCK_M)[None, None, :]
    il3 = (jl3 - c3 + BLOCK_M) % BLOCK_M
    wrap = (jl3 - il3 - c3 + 2 * BLOCK_M) // BLOCK_M - 2  # (jl - il - c) / BLOCK_M, exactly
    bins = start_n - start_m + pos_center + tl.arange(0, BLOCK_M)[None, :]
    MAX_WRAP: tl.constexpr = (BLOCK_N - 1) // BLOCK_M
    below = tl.reduce(tl.where(wrap == -1, rotated, 0.0), 0, _add)
    if MAX_WRAP == 0:
        # wrap 0 is complete with what the previous block carried; wrap -1 is the next block's wrap 0
        here = tl.reduce(rotated, 0, _add) - below
        _add_position_bins(DPOS, bins, (here + carry0) * scale, pos_center)
        carry0 = below
    elif MAX_WRAP == 1:
        above = tl.reduce(tl.where(wrap == 1, rotated, 0.0), 0, _add)
        here = tl.reduce(rotated, 0, _add) - below - above
        _add_position_bins(DPOS, bins + BLOCK_M, (above + carry1) * scale, pos_center)
        carry1 = here + carry0
        carry0 = below
    else:
        here = tl.reduce(tl.where(wrap == 0, rotated, 0.0), 0, _add)
        _add_position_bins(DPOS, bins - BLOCK_M, below * scale, pos_center)
        _add_position_bins(DPOS, bins, here * scale, pos_center)
        for m in tl.static_range(1, MAX_WRAP + 1):
            _add_position_bins(DPOS, bins + m * BLOCK_M,
                               tl.reduce(tl.where(wrap == m, rotated, 0.0), 0, _add) * scale, pos_center)
    return carry0, carry1


@triton.jit
def _add_position_bins(DPOS, bins, sums, pos_center):
    """Atomically adds partial diagonal sums [G, BLOCK_M] into the position-gradient row at
    ``bins`` [1, BLOCK_M] (bins outside the table only ever hold zeros)."""
    index = tl.broadcast_to(bins, sums.shape)
    tl.atomic_add(DPOS + index, sums.to(DPOS.dtype.element_ty), mask=(index >= 0) & (index <= 2 * pos_center),
                  sem="relaxed")


@triton.jit
def _flush_position_carry(carry0, carry1, scale, start_n, next_m, pos_center, DPOS, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """Sends what :func:`_diagonal_position_grads_carried` still carries after the block
    before ``next_m`` (the bins of wraps 0 and 1 of a block at ``next_m``)."""
    bins = start_n - next_m + pos_center + tl.arange(0, BLOCK_M)[None, :]
    MAX_WRAP: tl.constexpr = (BLOCK_N - 1) // BLOCK_M
    if MAX_WRAP <= 1:
        _add_position_bins(DPOS, bins, carry0 * scale, pos_center)
    if MAX_WRAP == 1:
        _add_position_bins(DPOS, bins + BLOCK_M, carry1 * scale, pos_center)


@triton.jit
def hstu_position_strips_kernel(POS, OUT, pos_center, shift, cols, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_X: tl.constexpr):
    """Writes the position strips (see :func:`_strip_pointers` and
    ``triton_attention._build_position_strips``) in one launch: ``OUT[z, r, x] = position_bias[i] / 2``
    with ``i = pos_center + (x - shift - r)`` for z = 0 (forward, dQ) and ``pos_center -
    (x - shift - r)`` for z = 1 (the reversed strip of dK/dV), clamped to the table. Grid
    (ROWS / BLOCK_R, cdiv(cols, BLOCK_X), strips). Built with torch ops, a strip took three
    kernels (gather, halve, convert); a forward + backward needs three strips."""
    z = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)[None, :]
    offset = x - shift - r
    index = pos_center + tl.where(z == 0, offset, -offset)
    index = tl.minimum(tl.maximum(index, 0), 2 * pos_center)
    ok = (x < cols) & (r < ROWS)
    vals = tl.load(POS + index, mask=ok)
    if POS.dtype.element_ty != tl.float64:
        vals = vals.to(tl.float32)  # exact, as is the halving: the strip is the table's value / 2 rounded once
    half = vals * 0.5
    tl.store(OUT + (z * ROWS + r) * cols + x, half.to(OUT.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------ forward
@triton.jit
def _fwd_block(
    acc, sb, q, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale, num_buckets,
    start_n, offs_m, offs_n, mask_dq, mask_dv,
    stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
    tma_row, tma_kcol, tma_vcol,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RAB: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_STRIP: tl.constexpr, STRIP_PREFETCH: tl.constexpr, STEP: tl.constexpr, APPLY_MASK: tl.constexpr,
    FAST_SILU: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, USE_TMA: tl.constexpr,
):
    cols = start_n + offs_n
    col_ok = cols < seq_len
    bias = sb
    if HAS_POS and POS_STRIP and STRIP_PREFETCH:
        # the next block's strip tile, in flight while this block's dots run
        sb = tl.load(PS_ptrs + (start_n + STEP))
    if USE_TMA:
        # K_ptrs / V_ptrs are tensor descriptors over [T, H * d]: rows past this sequence
        # belong to the next one (or are zero past T); every block that reaches them is
        # masked below, and p = 0 there multiplies finite values of v
        k = K_ptrs.load([(tma_row + start_n).to(tl.int32), tma_kcol])
        u = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * half_alpha
    else:
        kt = tl.load(K_ptrs + start_n * stride_t_qk, mask=mask_dq[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * half_alpha
    if HAS_RAB:
        rab = tl.load(RAB_ptrs + start_n, mask=(offs_m < seq_len)[:, None] & col_ok[None, :], other=0.0)
        u += 0.5 * rab.to(tl.float32)
    if HAS_POS and POS_STRIP:
        if STRIP_PREFETCH:
            u += bias.to(u.dtype)  # half the bias, from the strip (see _strip_pointers)
        else:
            u += tl.load(PS_ptrs + start_n).to(u.dtype)
    TABLE_POS: tl.constexpr = HAS_POS and not POS_STRIP
    if TABLE_POS or HAS_TIME:
        # tma_row is the sequence's first row
        key_times = tl.load(TS + tma_row + cols, mask=col_ok, other=0) if HAS_TIME else cols
        col_ids = _ids(cols, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
        u = _add_table_bias(u, row_ids[:, None], col_ids[None, :], query_times[:, None], key_times[None, :],
                            POS, TB, pos_center, inv_scale, num_buckets, TABLE_POS, HAS_TIME, not APPLY_MASK)
    p = _silu_half(u, FAST_SILU)
    if APPLY_MASK:
        valid = _valid(
            offs_m[:, None], cols[None, :], seq_len, last, contextual_len, max_attn_len,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW,
        )
        p = tl.where(valid, p, 0.0)
    if USE_TMA:
        v = V_ptrs.load([(tma_row + start_n).to(tl.int32), tma_vcol])
    else:
        v = tl.load(V_ptrs + start_n * stride_t_v, mask=col_ok[:, None] & mask_dv[None, :], other=0.0)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION, out_dtype=ACC), sb


@triton.jit
def hstu_fwd_kernel(
    Q, K, V, RAB, POS, TB, TS, PS, Out, seq_offsets, num_targets,
    stride_rb, stride_rh, stride_rm,
    H, half_alpha, scale, contextual_len, max_attn_len, pos_center, inv_scale, num_buckets, stride_ps, ps_shift,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RAB: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_STRIP: tl.constexpr, STRIP_PREFETCH: tl.constexpr, SCALE_BY_SEQ_LEN: tl.constexpr,
    FAST_SILU: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """out [T, H, D_V] from contiguous q, k [T, H, D_QK], v [T, H, D_V].
    Grid (B * H, cdiv(max_seq_len, BLOCK_M)); BLOCK_N divides BLOCK_M. With USE_TMA, K and
    V are host tensor descriptors over [T, H * d] with blocks [BLOCK_N, d] (d a power of
    two); WARP_SPEC asks triton to warp-specialize the main loop (loads / MMA / SiLU)."""
    off_bh = tl.program_id(0)
    # heaviest (latest) row blocks first: axis 0 runs fastest, so the first wave holds the
    # last row block of every (sequence, head)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    seq_start, seq_len, last = _sequence(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    stride_t_qk = H * D_QK
    stride_t_v = H * D_V

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dq = offs_dq < D_QK
    mask_dv = offs_dv < D_V
    row_ok = offs_m < seq_len

    q = tl.load(
        Q + (seq_start + offs_m[:, None]) * stride_t_qk + h * D_QK + offs_dq[None, :],
        mask=row_ok[:, None] & mask_dq[None, :], other=0.0,
    )
    if USE_TMA:
        K_ptrs = K
        V_ptrs = V
    else:
        K_ptrs = K + (seq_start + offs_n[None, :]) * stride_t_qk + h * D_QK + offs_dq[:, None]
        V_ptrs = V + (seq_start + offs_n[:, None]) * stride_t_v + h * D_V + offs_dv[None, :]
    RAB_ptrs = RAB
    if HAS_RAB:
        RAB_ptrs = RAB + b * stride_rb + h * stride_rh + offs_m[:, None] * stride_rm + offs_n[None, :]
    PS_ptrs = PS
    if POS_STRIP:
        PS_ptrs = _strip_pointers(PS, stride_ps, ps_shift - start_m, BLOCK_M, BLOCK_N)
    row_ids = _ids(offs_m, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    query_times = offs_m
    if HAS_TIME:
        query_times = _query_times(TS, seq_start, offs_m, seq_len,
                                   _history_end(num_targets, b, seq_len, HAS_TARGETS))
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, ACC)

    PURE_CAUSAL: tl.constexpr = CAUSAL and not (HAS_TARGETS or HAS_CONTEXT or HAS_WINDOW)
    if PURE_CAUSAL:
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + 0)
        # key blocks strictly below the diagonal: every pair valid and in range
        for start_n in tl.range(0, start_m, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, sb = _fwd_block(
                acc, sb, q, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale,
                num_buckets, start_n, offs_m, offs_n, mask_dq, mask_dv,
                stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
                seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB, HAS_POS, HAS_TIME, POS_STRIP, STRIP_PREFETCH, BLOCK_N, False, FAST_SILU,
                PRECISION, ACC, USE_TMA,
            )
        for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N):
            acc, sb = _fwd_block(
                acc, sb, q, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale,
                num_buckets, start_n, offs_m, offs_n, mask_dq, mask_dv,
                stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
                seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB, HAS_POS, HAS_TIME, POS_STRIP, STRIP_PREFETCH, BLOCK_N, True, FAST_SILU,
                PRECISION, ACC, USE_TMA,
            )
    else:
        lo, hi = _col_range(
            start_m, seq_len, last, contextual_len, max_attn_len,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, BLOCK_M, BLOCK_N,
        )
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + lo)
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, sb = _fwd_block(
                acc, sb, q, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale,
                num_buckets, start_n, offs_m, offs_n, mask_dq, mask_dv,
                stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
                seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB, HAS_POS, HAS_TIME, POS_STRIP, STRIP_PREFETCH, BLOCK_N, True, FAST_SILU,
                PRECISION, ACC, USE_TMA,
            )

    acc = acc * _row_scale(scale, seq_len, SCALE_BY_SEQ_LEN)
    tl.store(
        Out + (seq_start + offs_m[:, None]) * stride_t_v + h * D_V + offs_dv[None, :],
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & mask_dv[None, :],
    )


# ------------------------------------------------------------------ backward: dK, dV (and dRAB)
@triton.jit
def _bwd_dkdv_block(
    dk, dv, sb, carry0, carry1, k, v, Q_ptrs, DO_ptrs, RAB_ptrs, DRAB_ptrs, PS_ptrs, POS, TB, TS, DPOS, DTB, col_ids, key_times, history_end,
    pos_center, inv_scale, num_buckets, start_m, start_n, offs_m, cols, mask_dq, mask_dv,
    stride_t_qk, stride_t_v, stride_rm, stride_drm, seq_len, last, contextual_len, max_attn_len,
    half_alpha, row_scale, tma_row, tma_qcol, tma_docol,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RAB: tl.constexpr, RAB_GRAD: tl.constexpr,
    RAB_GRAD_ATOMIC: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, POS_GRAD: tl.constexpr,
    TIME_GRAD: tl.constexpr, POS_GRAD_DIAGONAL: tl.constexpr, POS_STRIP: tl.constexpr, STRIP_PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPLY_MASK: tl.constexpr, FAST_SILU: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    # transposed tiles, [keys, queries]: dk and dv come out of the dots in key-row order
    bias = sb
    if HAS_POS and POS_STRIP and STRIP_PREFETCH:
        sb = tl.load(PS_ptrs + (start_m + BLOCK_M))  # the next query block's, in flight during the dots
    rows = start_m + offs_m
    row_ok = rows < seq_len
    col_ok = cols < seq_len
    if USE_TMA:
        # descriptors over [T, H * d]: rows past the sequence are another sequence's (or
        # zero); the caller masks every block that reaches them
        q_rows = Q_ptrs.load([(tma_row + start_m).to(tl.int32), tma_qcol])
        qt = tl.trans(q_rows)
    else:
        qt = tl.load(Q_ptrs + start_m * stride_t_qk, mask=mask_dq[:, None] & row_ok[None, :], other=0.0)
        q_rows = tl.trans(qt)
    ut = tl.dot(k, qt, input_precision=PRECISION, out_dtype=ACC) * half_alpha
    if HAS_RAB:
        rab = tl.load(RAB_ptrs + start_m * stride_rm, mask=col_ok[:, None] & row_ok[None, :], other=0.0)
        ut += 0.5 * rab.to(tl.float32)
    row_ids = _ids(rows, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    query_times = rows
    if HAS_TIME:
        query_times = _query_times(TS, tma_row, rows, seq_len, history_end)  # tma_row: the sequence's first row
    if HAS_POS and POS_STRIP:
        if STRIP_PREFETCH:
            ut += bias.to(ut.dtype)  # the reversed strip: rows are keys here
        else:
            ut += tl.load(PS_ptrs + start_m).to(ut.dtype)
    TABLE_POS: tl.constexpr = HAS_POS and not POS_STRIP
    if TABLE_POS or HAS_TIME:
        ut = _add_table_bias(ut, row_ids[None, :], col_ids[:, None], query_times[None, :], key_times[:, None],
                             POS, TB, pos_center, inv_scale, num_buckets, TABLE_POS, HAS_TIME, not APPLY_MASK)
    pt, g2t = _silu_and_grad_half(ut, FAST_SILU)
    if APPLY_MASK:
        valid = _valid(
            rows[None, :], cols[:, None], seq_len, last, contextual_len, max_attn_len,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW,
        )
        pt = tl.where(valid, pt, 0.0)
    if USE_TMA:
        do = DO_ptrs.load([(tma_row + start_m).to(tl.int32), tma_docol])
    else:
        do = tl.load(DO_ptrs + start_m * stride_t_v, mask=row_ok[:, None] & mask_dv[None, :], other=0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION, out_dtype=ACC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
    dst = dpt * g2t  # twice the true ds: halved in the final scale
    if APPLY_MASK:
        dst = tl.where(valid, dst, 0.0)
    if RAB_GRAD:
        drab_mask = col_ok[:, None] & row_ok[None, :]
        if RAB_GRAD_ATOMIC:
            # rab broadcasts over sequences or heads: programs of several (b, h) add here
            tl.atomic_add(DRAB_ptrs + start_m * stride_drm, (dst * (0.5 * row_scale)).to(tl.float32),
                          mask=drab_mask)
        else:
            tl.store(DRAB_ptrs + start_m * stride_drm,
                     (dst * (0.5 * row_scale)).to(DRAB_ptrs.dtype.element_ty), mask=drab_mask)
    if POS_GRAD or TIME_GRAD:
        if APPLY_MASK:
            grad_mask = valid
        else:
            grad_mask = col_ok[:, None] & row_ok[None, :]
        ds_true = dst * (0.5 * row_scale)
        DIAGONAL: tl.constexpr = POS_GRAD and POS_GRAD_DIAGONAL > 0 and not (HAS_TARGETS or HAS_CONTEXT)
        if DIAGONAL:
            if POS_GRAD_DIAGONAL == 3:
                carry0, carry1 = _diagonal_position_grads_carried(dst, 0.5 * row_scale, carry0, carry1, start_n,
                                                                  start_m, pos_center, DPOS, BLOCK_M, BLOCK_N)
            elif POS_GRAD_DIAGONAL == 2:
                _diagonal_position_grads_by_rows(ds_true, start_n, start_m, pos_center, DPOS, BLOCK_M, BLOCK_N)
            else:
                _diagonal_position_grads(ds_true, start_n, start_m, pos_center, DPOS,
                                         BLOCK_M, BLOCK_N)
        _table_bias_grads(ds_true, grad_mask, row_ids[None, :], col_ids[:, None], query_times[None, :],
                          key_times[:, None], DPOS, DTB, pos_center, inv_scale, num_buckets,
                          POS_GRAD and not DIAGONAL, TIME_GRAD)
    dk = tl.dot(dst.to(q_rows.dtype), q_rows, dk, input_precision=PRECISION, out_dtype=ACC)
    return dk, dv, sb, carry0, carry1


@triton.jit
def hstu_bwd_dkdv_kernel(
    Q, K, V, DO, RAB, DRAB, POS, TB, TS, PS, DPOS, DTB, DK, DV, seq_offsets, num_targets,
    stride_rb, stride_rh, stride_rm, stride_drb, stride_drh, stride_drm, stride_dpos, stride_dtb,
    H, half_alpha, scale, contextual_len, max_attn_len, pos_center, inv_scale, num_buckets, stride_ps, ps_shift,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RAB: tl.constexpr, RAB_GRAD: tl.constexpr,
    RAB_GRAD_ATOMIC: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, POS_GRAD: tl.constexpr,
    TIME_GRAD: tl.constexpr, POS_GRAD_DIAGONAL: tl.constexpr, POS_STRIP: tl.constexpr, STRIP_PREFETCH: tl.constexpr,
    SCALE_BY_SEQ_LEN: tl.constexpr, FAST_SILU: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, USE_TMA: tl.constexpr, NUM_WARPS: tl.constexpr,
):
    """dk, dv (and drab) for one key block per program. Grid (B * H, cdiv(max_seq_len,
    BLOCK_N)); in causal mode the first key blocks carry the most work and start first.
    NUM_WARPS is the launch's num_warps (the carried position partials keep one row per warp)."""
    off_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    seq_start, seq_len, last = _sequence(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    start_n = pid_n * BLOCK_N
    if start_n >= seq_len:
        return
    stride_t_qk = H * D_QK
    stride_t_v = H * D_V
    row_scale = _row_scale(scale, seq_len, SCALE_BY_SEQ_LEN)

    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dq = offs_dq < D_QK
    mask_dv = offs_dv < D_V
    col_ok = cols < seq_len

    k = tl.load(
        K + (seq_start + cols[:, None]) * stride_t_qk + h * D_QK + offs_dq[None, :],
        mask=col_ok[:, None] & mask_dq[None, :], other=0.0,
    )
    v = tl.load(
        V + (seq_start + cols[:, None]) * stride_t_v + h * D_V + offs_dv[None, :],
        mask=col_ok[:, None] & mask_dv[None, :], other=0.0,
    )
    if USE_TMA:
        Q_ptrs = Q
        DO_ptrs = DO
    else:
        Q_ptrs = Q + (seq_start + offs_m[None, :]) * stride_t_qk + h * D_QK + offs_dq[:, None]
        DO_ptrs = DO + (seq_start + offs_m[:, None]) * stride_t_v + h * D_V + offs_dv[None, :]
    RAB_ptrs = RAB
    DRAB_ptrs = DRAB
    if HAS_RAB:
        RAB_ptrs = RAB + b * stride_rb + h * stride_rh + offs_m[None, :] * stride_rm + cols[:, None]
    if RAB_GRAD:
        DRAB_ptrs = DRAB + b * stride_drb + h * stride_drh + offs_m[None, :] * stride_drm + cols[:, None]
    # the reversed strip, rows = keys (see _strip_pointers)
    PS_ptrs = PS
    if POS_STRIP:
        PS_ptrs = _strip_pointers(PS, stride_ps, ps_shift - start_n, BLOCK_N, BLOCK_M)
    col_ids = _ids(cols, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    key_times = cols
    history_end = seq_len
    if HAS_TIME:
        key_times = tl.load(TS + seq_start + cols, mask=col_ok, other=0)
        history_end = _history_end(num_targets, b, seq_len, HAS_TARGETS)
    # this program's rows of the table-gradient buffers (position: per (sequence, head); time: per program)
    DPOS_row = DPOS + off_bh * stride_dpos
    DTB_row = DTB + (off_bh * tl.num_programs(1) + pid_n) * stride_dtb
    dk = tl.full([BLOCK_N, BLOCK_DQ], 0.0, ACC)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, ACC)
    # the position-gradient partials carried from one query block to the next
    # (POS_GRAD_DIAGONAL == 3, see _diagonal_position_grads_carried); unused otherwise
    carry0 = tl.full([NUM_WARPS, BLOCK_M], 0.0, ACC)
    carry1 = tl.full([NUM_WARPS, BLOCK_M], 0.0, ACC)

    PURE_CAUSAL: tl.constexpr = CAUSAL and not (HAS_TARGETS or HAS_CONTEXT or HAS_WINDOW)
    if PURE_CAUSAL:
        # query blocks that overlap the diagonal of this key block need the mask...
        lo = (start_n // BLOCK_M) * BLOCK_M
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + lo)
        for start_m in range(lo, tl.minimum(start_n + BLOCK_N, seq_len), BLOCK_M):
            dk, dv, sb, carry0, carry1 = _bwd_dkdv_block(
                dk, dv, sb, carry0, carry1, k, v, Q_ptrs, DO_ptrs, RAB_ptrs, DRAB_ptrs, PS_ptrs, POS, TB, TS, DPOS_row, DTB_row, col_ids,
                key_times, history_end, pos_center, inv_scale, num_buckets, start_m, start_n, offs_m, cols,
                mask_dq, mask_dv, stride_t_qk, stride_t_v, stride_rm, stride_drm, seq_len, last,
                contextual_len, max_attn_len, half_alpha, row_scale, seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT,
                HAS_WINDOW, HAS_RAB, RAB_GRAD, RAB_GRAD_ATOMIC, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
                POS_GRAD_DIAGONAL, POS_STRIP, STRIP_PREFETCH, BLOCK_M, BLOCK_N, True, FAST_SILU, PRECISION, ACC, USE_TMA,
            )
        # ...those wholly below it and inside the sequence do not...
        full_lo = ((start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        full_hi = (seq_len // BLOCK_M) * BLOCK_M
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + full_lo)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv, sb, carry0, carry1 = _bwd_dkdv_block(
                dk, dv, sb, carry0, carry1, k, v, Q_ptrs, DO_ptrs, RAB_ptrs, DRAB_ptrs, PS_ptrs, POS, TB, TS, DPOS_row, DTB_row, col_ids,
                key_times, history_end, pos_center, inv_scale, num_buckets, start_m, start_n, offs_m, cols,
                mask_dq, mask_dv, stride_t_qk, stride_t_v, stride_rm, stride_drm, seq_len, last,
                contextual_len, max_attn_len, half_alpha, row_scale, seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT,
                HAS_WINDOW, HAS_RAB, RAB_GRAD, RAB_GRAD_ATOMIC, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
                POS_GRAD_DIAGONAL, POS_STRIP, STRIP_PREFETCH, BLOCK_M, BLOCK_N, False, FAST_SILU, PRECISION, ACC, USE_TMA,
            )
        # ...and the last, partial block is masked (past the length, rows are zeros or, with
        # descriptors, another sequence's rows)
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + tl.maximum(full_lo, full_hi))
        for start_m in range(tl.maximum(full_lo, full_hi), seq_len, BLOCK_M):
            dk, dv, sb, carry0, carry1 = _bwd_dkdv_block(
                dk, dv, sb, carry0, carry1, k, v, Q_ptrs, DO_ptrs, RAB_ptrs, DRAB_ptrs, PS_ptrs, POS, TB, TS, DPOS_row, DTB_row, col_ids,
                key_times, history_end, pos_center, inv_scale, num_buckets, start_m, start_n, offs_m, cols,
                mask_dq, mask_dv, stride_t_qk, stride_t_v, stride_rm, stride_drm, seq_len, last,
                contextual_len, max_attn_len, half_alpha, row_scale, seq_start, h * D_QK, h * D_V, CAUSAL,
                HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB, RAB_GRAD, RAB_GRAD_ATOMIC, HAS_POS, HAS_TIME,
                POS_GRAD, TIME_GRAD, POS_GRAD_DIAGONAL, POS_STRIP, STRIP_PREFETCH, BLOCK_M, BLOCK_N, True, FAST_SILU, PRECISION, ACC, USE_TMA,
            )
        # the three loops visit every query block from lo to the last, one after another
        next_m = ((seq_len + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        pre_hi, lo, hi = _row_range(
            start_n, seq_len, last, contextual_len, max_attn_len,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, BLOCK_M, BLOCK_N,
        )
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + 0)
        for start_m in range(0, pre_hi, BLOCK_M):
            dk, dv, sb, carry0, carry1 = _bwd_dkdv_block(
                dk, dv, sb, carry0, carry1, k, v, Q_ptrs, DO_ptrs, RAB_ptrs, DRAB_ptrs, PS_ptrs, POS, TB, TS, DPOS_row, DTB_row, col_ids,
                key_times, history_end, pos_center, inv_scale, num_buckets, start_m, start_n, offs_m, cols,
                mask_dq, mask_dv, stride_t_qk, stride_t_v, stride_rm, stride_drm, seq_len, last,
                contextual_len, max_attn_len, half_alpha, row_scale, seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT,
                HAS_WINDOW, HAS_RAB, RAB_GRAD, RAB_GRAD_ATOMIC, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
                POS_GRAD_DIAGONAL, POS_STRIP, STRIP_PREFETCH, BLOCK_M, BLOCK_N, True, FAST_SILU, PRECISION, ACC, USE_TMA,
            )
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + lo)
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv, sb, carry0, carry1 = _bwd_dkdv_block(
                dk, dv, sb, carry0, carry1, k, v, Q_ptrs, DO_ptrs, RAB_ptrs, DRAB_ptrs, PS_ptrs, POS, TB, TS, DPOS_row, DTB_row, col_ids,
                key_times, history_end, pos_center, inv_scale, num_buckets, start_m, start_n, offs_m, cols,
                mask_dq, mask_dv, stride_t_qk, stride_t_v, stride_rm, stride_drm, seq_len, last,
                contextual_len, max_attn_len, half_alpha, row_scale, seq_start, h * D_QK, h * D_V,
                CAUSAL, HAS_TARGETS, HAS_CONTEXT,
                HAS_WINDOW, HAS_RAB, RAB_GRAD, RAB_GRAD_ATOMIC, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
                POS_GRAD_DIAGONAL, POS_STRIP, STRIP_PREFETCH, BLOCK_M, BLOCK_N, True, FAST_SILU, PRECISION, ACC, USE_TMA,
            )
        # the carried position partials exist only without a prefix, when the first loop is
        # empty and the second visits the blocks from lo on, one after another
        next_m = lo + ((tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if POS_GRAD and POS_GRAD_DIAGONAL == 3 and not (HAS_TARGETS or HAS_CONTEXT):
        _flush_position_carry(carry0, carry1, 0.5 * row_scale, start_n, next_m, pos_center, DPOS_row, BLOCK_M,
                              BLOCK_N)

    dk = dk * (half_alpha * row_scale)
    dv = dv * row_scale
    tl.store(
        DK + (seq_start + cols[:, None]) * stride_t_qk + h * D_QK + offs_dq[None, :],
        dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & mask_dq[None, :],
    )
    tl.store(
        DV + (seq_start + cols[:, None]) * stride_t_v + h * D_V + offs_dv[None, :],
        dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & mask_dv[None, :],
    )


# ------------------------------------------------------------------ backward: dQ
@triton.jit
def _bwd_dq_block(
    dq, sb, q, do, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale, num_buckets,
    start_n, offs_m, offs_n, mask_dq, mask_dv,
    stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
    tma_row, tma_kcol, tma_vcol,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RAB: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_STRIP: tl.constexpr, STRIP_PREFETCH: tl.constexpr, STEP: tl.constexpr, APPLY_MASK: tl.constexpr,
    FAST_SILU: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, USE_TMA: tl.constexpr,
):
    cols = start_n + offs_n
    col_ok = cols < seq_len
    bias = sb
    if HAS_POS and POS_STRIP and STRIP_PREFETCH:
        # the next block's strip tile, in flight while this block's dots run
        sb = tl.load(PS_ptrs + (start_n + STEP))
    if USE_TMA:
        # descriptors over [T, H * d]: rows past the sequence are another sequence's (or zero)
        # and only ever reach masked blocks
        k = K_ptrs.load([(tma_row + start_n).to(tl.int32), tma_kcol])
        kt = tl.trans(k)
        vt = tl.trans(V_ptrs.load([(tma_row + start_n).to(tl.int32), tma_vcol]))
    else:
        kt = tl.load(K_ptrs + start_n * stride_t_qk, mask=mask_dq[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(V_ptrs + start_n * stride_t_v, mask=mask_dv[:, None] & col_ok[None, :], other=0.0)
        k = tl.trans(kt)
    u = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * half_alpha
    if HAS_RAB:
        rab = tl.load(RAB_ptrs + start_n, mask=(offs_m < seq_len)[:, None] & col_ok[None, :], other=0.0)
        u += 0.5 * rab.to(tl.float32)
    if HAS_POS and POS_STRIP:
        if STRIP_PREFETCH:
            u += bias.to(u.dtype)
        else:
            u += tl.load(PS_ptrs + start_n).to(u.dtype)
    TABLE_POS: tl.constexpr = HAS_POS and not POS_STRIP
    if TABLE_POS or HAS_TIME:
        # tma_row is the sequence's first row
        key_times = tl.load(TS + tma_row + cols, mask=col_ok, other=0) if HAS_TIME else cols
        col_ids = _ids(cols, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
        u = _add_table_bias(u, row_ids[:, None], col_ids[None, :], query_times[:, None], key_times[None, :],
                            POS, TB, pos_center, inv_scale, num_buckets, TABLE_POS, HAS_TIME, not APPLY_MASK)
    _, g2 = _silu_and_grad_half(u, FAST_SILU)
    dp = tl.dot(do, vt, input_precision=PRECISION, out_dtype=ACC)
    ds = dp * g2  # twice the true ds: halved in the final scale
    if APPLY_MASK:
        valid = _valid(
            offs_m[:, None], cols[None, :], seq_len, last, contextual_len, max_attn_len,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW,
        )
        ds = tl.where(valid, ds, 0.0)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=ACC), sb


@triton.jit
def hstu_bwd_dq_kernel(
    Q, K, V, DO, RAB, POS, TB, TS, PS, DQ, seq_offsets, num_targets,
    stride_rb, stride_rh, stride_rm,
    H, half_alpha, scale, contextual_len, max_attn_len, pos_center, inv_scale, num_buckets, stride_ps, ps_shift,
    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_RAB: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_STRIP: tl.constexpr, STRIP_PREFETCH: tl.constexpr, SCALE_BY_SEQ_LEN: tl.constexpr,
    FAST_SILU: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dq for one query block per program, accumulated in fp32 registers over all key
    blocks (no atomics). Grid (B * H, cdiv(max_seq_len, BLOCK_M)); BLOCK_N divides BLOCK_M."""
    off_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    seq_start, seq_len, last = _sequence(seq_offsets, num_targets, b, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    stride_t_qk = H * D_QK
    stride_t_v = H * D_V

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BLOCK_DQ)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dq = offs_dq < D_QK
    mask_dv = offs_dv < D_V
    row_ok = offs_m < seq_len

    q = tl.load(
        Q + (seq_start + offs_m[:, None]) * stride_t_qk + h * D_QK + offs_dq[None, :],
        mask=row_ok[:, None] & mask_dq[None, :], other=0.0,
    )
    do = tl.load(
        DO + (seq_start + offs_m[:, None]) * stride_t_v + h * D_V + offs_dv[None, :],
        mask=row_ok[:, None] & mask_dv[None, :], other=0.0,
    )
    if USE_TMA:
        K_ptrs = K
        V_ptrs = V
    else:
        K_ptrs = K + (seq_start + offs_n[None, :]) * stride_t_qk + h * D_QK + offs_dq[:, None]
        V_ptrs = V + (seq_start + offs_n[None, :]) * stride_t_v + h * D_V + offs_dv[:, None]
    RAB_ptrs = RAB
    if HAS_RAB:
        RAB_ptrs = RAB + b * stride_rb + h * stride_rh + offs_m[:, None] * stride_rm + offs_n[None, :]
    PS_ptrs = PS
    if POS_STRIP:
        PS_ptrs = _strip_pointers(PS, stride_ps, ps_shift - start_m, BLOCK_M, BLOCK_N)
    row_ids = _ids(offs_m, last, contextual_len, HAS_TARGETS, HAS_CONTEXT)
    query_times = offs_m
    if HAS_TIME:
        query_times = _query_times(TS, seq_start, offs_m, seq_len,
                                   _history_end(num_targets, b, seq_len, HAS_TARGETS))
    dq = tl.full([BLOCK_M, BLOCK_DQ], 0.0, ACC)

    PURE_CAUSAL: tl.constexpr = CAUSAL and not (HAS_TARGETS or HAS_CONTEXT or HAS_WINDOW)
    if PURE_CAUSAL:
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + 0)
        for start_n in range(0, start_m, BLOCK_N):
            dq, sb = _bwd_dq_block(
                dq, sb, q, do, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale,
                num_buckets, start_n, offs_m, offs_n, mask_dq, mask_dv,
                stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
                seq_start, h * D_QK, h * D_V, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB,
                HAS_POS, HAS_TIME, POS_STRIP, STRIP_PREFETCH, BLOCK_N, False,
                FAST_SILU, PRECISION, ACC, USE_TMA,
            )
        for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N):
            dq, sb = _bwd_dq_block(
                dq, sb, q, do, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale,
                num_buckets, start_n, offs_m, offs_n, mask_dq, mask_dv,
                stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
                seq_start, h * D_QK, h * D_V, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB,
                HAS_POS, HAS_TIME, POS_STRIP, STRIP_PREFETCH, BLOCK_N, True,
                FAST_SILU, PRECISION, ACC, USE_TMA,
            )
    else:
        lo, hi = _col_range(
            start_m, seq_len, last, contextual_len, max_attn_len,
            CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, BLOCK_M, BLOCK_N,
        )
        sb = 0.0  # the strip tile of the loop's first block, when prefetching
        if HAS_POS and POS_STRIP and STRIP_PREFETCH:
            sb = tl.load(PS_ptrs + lo)
        for start_n in range(lo, hi, BLOCK_N):
            dq, sb = _bwd_dq_block(
                dq, sb, q, do, K_ptrs, V_ptrs, RAB_ptrs, PS_ptrs, POS, TB, TS, row_ids, query_times, pos_center, inv_scale,
                num_buckets, start_n, offs_m, offs_n, mask_dq, mask_dv,
                stride_t_qk, stride_t_v, seq_len, last, contextual_len, max_attn_len, half_alpha,
                seq_start, h * D_QK, h * D_V, CAUSAL, HAS_TARGETS, HAS_CONTEXT, HAS_WINDOW, HAS_RAB,
                HAS_POS, HAS_TIME, POS_STRIP, STRIP_PREFETCH, BLOCK_N, True,
                FAST_SILU, PRECISION, ACC, USE_TMA,
            )

    dq = dq * (half_alpha * _row_scale(scale, seq_len, SCALE_BY_SEQ_LEN))
    tl.store(
        DQ + (seq_start + offs_m[:, None]) * stride_t_qk + h * D_QK + offs_dq[None, :],
        dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & mask_dq[None, :],
    )
