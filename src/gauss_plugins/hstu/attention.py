"""HSTU attention on jagged sequences: the mask, the reference, and the dispatching op.

For each sequence ``b`` and head ``h`` (positions ``i, j`` inside the sequence)::

    S   = alpha * Q K^T + rab + bias                (rab, bias optional)
    P   = SiLU(S) / N  (masked: P[i, j] = 0 where attention_mask(...)[b, i, j] is False)
    out = P V

There is no softmax: rows are not normalised to one, so the backward pass needs nothing but
the inputs (no saved row statistics). ``N`` is the *normaliser*:

* ``"max_seq_len"`` (default, as Meta's generative-recommenders and the paper's research
  code): every row is divided by the same constant ``max_seq_len``.
* ``"seq_len"``: row ``i`` of sequence ``b`` is divided by that sequence's length ``n_b``
  (scale independent of how the batch was padded).

Shapes: ``q, k`` are ``[T, H, d_qk]``, ``v`` is ``[T, H, d_v]`` (``T = offsets[-1]``), all
of one floating dtype; ``offsets`` ``[B + 1]`` int64; ``num_targets`` ``[B]`` integer or
None; ``rab`` ``[B or 1, H or 1, max_seq_len, max_seq_len]`` or None (any float dtype,
differentiable). The output is ``[T, H, d_v]`` in ``q``'s dtype.

Relative attention bias from tables
-----------------------------------
``bias`` is HSTU's relative attention bias, given as two small 1-D tables shared by all
heads and expanded inside the attention (the Triton kernels build it per tile, so no
``[B, ., N, N]`` bias or bias gradient ever exists); either table may be None::

    bias[b, i, j] = position_bias[clamp(id_j - id_i + L - 1, 0, 2L - 2)]
                  + time_bias[clamp(floor(log(max(|t_next(i) - t_j|, 1)) * (1 / time_bucket_scale)),
                                0, num_buckets)]

* ``position_bias`` ``[2L - 1]`` with ``L >= max_seq_len``; ``id_*`` are the position ids
  of :func:`attention_mask` (a contextual prefix shares id 0 and later ids shift; with
  ``num_targets`` every target shares the first target's id), so all candidates of an
  M-FALCON batch see the same position bias.
* ``time_bias`` ``[num_buckets + 1]`` with ``timestamps`` jagged ``[T]`` int64 (required
  exactly when ``time_bias`` is given). ``t_next(i) = t_{i+1}`` when position ``i + 1``
  exists in the same sequence and is not a target, else ``t_i``: history query ``i``
  predicts the next event, and a target / candidate uses its own time, so no candidate's
  bias depends on its slot or on the other candidates. This is the "next timestamp minus
  key timestamp" bucketing of the paper's code (generative-recommenders
  ``RelativeBucketedTimeAndPositionBasedBias``, ``time_bucket_scale = 0.301``). The bucket is
  computed in fp32 (``|dt|`` converted to fp32, ``log``, times the fp32 reciprocal of the
  scale, ``floor``) by the reference and the kernels alike.

Gradients flow to both tables (not to ``timestamps``); ``rab`` still adds on top.
:func:`relative_bias_dense` expands the tables to the dense ``[B, N, N]`` bias (a
cross-check: passing it as ``rab`` gives the same output, and the tables' gradients are that
``rab``'s gradient summed by index).

Backends (the ``attention_backend`` hook)
-----------------------------------------
Under ``torch.compile``, ``torch.export`` or any other tracing, :func:`hstu_attention` is
the ``torch.library`` custom op ``gauss::hstu_attention_fwd`` (with a fake implementation
and autograd through ``gauss::hstu_attention_bwd``), one node in the graph; plain eager
calls run the same code through a ``torch.autograd.Function`` (less host overhead). Either
way the backend is picked at run time with ``get_registry().select("attention_backend",
backend, q=q, k=k, v=v)`` (the choice is cached per registry for each device, dtype and
head shape), and ``component.create()`` is called once per registry to build it. The
factory may return either

1. an object with two methods (see :class:`AttentionBackend`)::

       forward(q, k, v, offsets, *, max_seq_len, alpha, causal, num_targets,
               contextual_len, max_attn_len, rab, position_bias, time_bias, timestamps,
               time_bucket_scale, normalizer) -> out [T, H, d_v]
       backward(grad_out, q, k, v, offsets, *, <the same keywords>, compute_drab,
                compute_dposition_bias, compute_dtime_bias)
           -> (dq, dk, dv, drab, d_position_bias, d_time_bias)

   ``backward`` receives the same inputs as ``forward`` (HSTU has no softmax, so nothing
   else needs saving) and returns gradients shaped like ``q, k, v``, like ``rab`` (summed
   over its broadcast dimensions) and like the two tables; each of the last three may be
   None when its ``compute_*`` flag is False (input absent or not requiring grad). Or
2. a plain callable with the signature of :func:`hstu_attention_reference` (forward only);
   its backward is then :func:`hstu_attention_reference_backward`.

What a backend can rely on: layouts were checked (shapes, dtypes, devices; see
:func:`check_attention_inputs`); every tensor argument, ``grad_out`` included, is
contiguous; ``num_targets`` and ``timestamps`` are int64; ``normalizer`` is one of :data:`NORMALIZERS`. Data
checks (offsets monotone, lengths <= max_seq_len, 0 <= num_targets <= length) ran when
``validate`` was on (by default for CPU tensors; off on accelerators, where they would
synchronise with the host). The output must be a new tensor, not a view of an input.
Every backend is tested against :func:`hstu_attention_reference`, which defines the
semantics, and :func:`attention_mask`, which defines the mask.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Callable, Dict, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn.functional as F

from gauss_plugins.jagged import check_offsets_layout, pad, unpad, validate_offsets

__all__ = [
    "NORMALIZERS",
    "AttentionBackend",
    "TorchReferenceBackend",
    "attention_mask",
    "check_attention_inputs",
    "hstu_attention",
    "hstu_attention_reference",
    "hstu_attention_reference_backward",
    "relative_bias_dense",
    "validate_attention_data",
]

NORMALIZERS = ("max_seq_len", "seq_len")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------- the mask
def attention_mask(
    lengths: torch.Tensor,
    max_seq_len: int,
    *,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
) -> torch.Tensor:
    """The attention mask ``[B, max_seq_len, max_seq_len]`` (bool; ``[b, i, j]`` True when
    query position ``i`` of sequence ``b`` attends to key position ``j``).

    The one definition of the mask semantics; it follows Meta's generative-recommenders.
    Each position ``p < n_b`` gets an *id*; positions at or past the length ``n_b`` attend
    to nothing and are attended by nothing:

    1. ``id = p``. With a contextual prefix (``contextual_len = c > 0``) the first ``c``
       positions share id 0 and later ones shift: ``id = max(p - c + 1, 0)``.
    2. With ``num_targets`` (``t_b``), the last ``t_b`` positions (the targets / candidates)
       share the id of the first target, ``id = min(id, last)``, where ``last`` is the
       first target's id (``n_b - t_b``, or ``n_b - t_b - c + 1`` with a prefix).
    3. ``dist = id_i - id_j`` (its absolute value when ``causal=False``); ``i`` attends to
       ``j`` when ``i == j`` or ``dist > 0``, and, with a local window
       (``max_attn_len = w > 0``), only if also ``dist <= w``.
    4. With a prefix, the prefix rows (``id_i == 0``) also attend to every non-target
       position (``id_j < last``), the whole history included.

    So targets attend to the history and to themselves, never to each other; history never
    attends to targets when causal; every position sees the prefix (within the window).
    ``x`` attends, ``.`` does not (rows = queries)::

        causal, n=6           num_targets=2         contextual_len=2,     max_attn_len=2
                                                    num_targets=2, n=7
        x . . . . .           x . . . . .           x x x x x . .         x . . . . .
        x x . . . .           x x . . . .           x x x x x . .         x x . . . .
        x x x . . .           x x x . . .           x x x . . . .         x x x . . .
        x x x x . .           x x x x . .           x x x x . . .         . x x x . .
        x x x x x .           x x x x x .           x x x x x . .         . . x x x .
        x x x x x x           x x x x . x           x x x x x x .         . . . x x x
                                                    x x x x x . x

    Without ``causal`` the same ids apply with ``|dist|``: every position sees every other
    except that targets still do not see each other (as in the public code, history rows
    then do see the targets).
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError("lengths must be a 1-D integer tensor of shape (B,)")
    if not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise ValueError(f"max_seq_len must be a non-negative int, got {max_seq_len!r}")
    device = lengths.device
    batch = lengths.shape[0]
    n = max_seq_len
    positions = torch.arange(n, device=device)
    lengths = lengths.to(torch.int64).view(batch, 1)
    ids, last = _position_ids(lengths, n, num_targets, contextual_len)
    row = ids.view(batch, n, 1)
    col = ids.view(batch, 1, n)
    dist = row - col
    if not causal:
        dist = dist.abs()
    mask = torch.eye(n, dtype=torch.bool, device=device).view(1, n, n) | (dist > 0)
    if max_attn_len > 0:
        mask = mask & (dist <= max_attn_len)
    if contextual_len > 0:
        mask = mask | ((row == 0) & (col < last.view(batch, 1, 1)))
    inside = positions.view(1, n) < lengths
    return mask & inside.view(batch, n, 1) & inside.view(batch, 1, n)


def _position_ids(lengths: torch.Tensor, n: int, num_targets: Optional[torch.Tensor],
                  contextual_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rules 1 and 2 of :func:`attention_mask`: ids ``[B, n]`` of the positions of each
    sequence, and ``last`` ``[B, 1]``, the id of the first position that is not history."""
    batch = lengths.shape[0]
    lengths = lengths.to(torch.int64).view(batch, 1)
    ids = torch.arange(n, device=lengths.device).view(1, n).expand(batch, n)
    last = lengths
    if contextual_len > 0:
        ids = (ids - contextual_len + 1).clamp(min=0)
        last = last - contextual_len + 1
    if num_targets is not None:
        last = last - num_targets.to(torch.int64).view(batch, 1)
        ids = torch.minimum(ids, last)
    return ids, last


# ---------------------------------------------------------------------------- checks
def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    rab: Optional[torch.Tensor] = None,
    normalizer: str = "max_seq_len",
    position_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    time_bucket_scale: float = 0.301,
) -> None:
    """Check shapes, dtypes, devices and options without reading tensor data (so it is safe
    under ``torch.compile`` and costs no GPU synchronisation). Raises TypeError/ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [T, H, d], got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must agree on [T, H]: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim d_qk, got {q.shape[2]} and {k.shape[2]}")
    check_offsets_layout(offsets)
    for name, t in (("k", k), ("v", v), ("offsets", offsets)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch = offsets.shape[0] - 1
    heads = q.shape[1]
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    for name, val in (("contextual_len", contextual_len), ("max_attn_len", max_attn_len)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if num_targets is not None:
        if not isinstance(num_targets, torch.Tensor):
            raise TypeError(f"num_targets must be a tensor of shape (B,) or None, got {type(num_targets).__name__}")
        if num_targets.dtype.is_floating_point or num_targets.dtype.is_complex or num_targets.dtype == torch.bool:
            raise TypeError(f"num_targets must be an integer tensor, got {num_targets.dtype}")
        if tuple(num_targets.shape) != (batch,):
            raise ValueError(f"num_targets must have shape ({batch},) (one per sequence), got {tuple(num_targets.shape)}")
        if num_targets.device != q.device:
            raise ValueError(f"num_targets is on {num_targets.device} but q is on {q.device}")
    if rab is not None:
        if not isinstance(rab, torch.Tensor):
            raise TypeError(f"rab must be a tensor or None, got {type(rab).__name__}")
        if rab.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"rab must be a floating tensor, got {rab.dtype}")
        if rab.dim() != 4 or rab.shape[0] not in (1, batch) or rab.shape[1] not in (1, heads) \
                or tuple(rab.shape[2:]) != (max_seq_len, max_seq_len):
            raise ValueError(
                f"rab must have shape [B or 1, H or 1, max_seq_len, max_seq_len] = "
                f"[{batch} or 1, {heads} or 1, {max_seq_len}, {max_seq_len}], got {tuple(rab.shape)}")
        if rab.device != q.device:
            raise ValueError(f"rab is on {rab.device} but q is on {q.device}")
    _check_bias_tables(q.device, q.shape[0], max_seq_len, position_bias, time_bias, timestamps, time_bucket_scale)


def _check_bias_tables(device: torch.device, total: Optional[int], max_seq_len: int, position_bias, time_bias,
                       timestamps, time_bucket_scale) -> None:
    """The relative-bias arguments (see the module docstring): tables on ``device``,
    ``timestamps`` with ``total`` rows (any number when None)."""
    for name, table in (("position_bias", position_bias), ("time_bias", time_bias)):
        if table is None:
            continue
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{name} must be a 1-D float tensor or None, got {type(table).__name__}")
        if table.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {table.dtype}")
        if table.device != device:
            raise ValueError(f"{name} is on {table.device} but q is on {device}")
    if position_bias is not None:
        size = position_bias.shape[0] if position_bias.dim() == 1 else -1
        if size < 2 * max_seq_len - 1 or size % 2 == 0:
            raise ValueError(
                f"position_bias must be a 1-D table of odd length 2L - 1 with L >= max_seq_len, i.e. at least "
                f"{2 * max_seq_len - 1} entries for max_seq_len={max_seq_len}; got shape {tuple(position_bias.shape)}")
    if time_bias is not None:
        if time_bias.dim() != 1 or time_bias.shape[0] < 1:
            raise ValueError(f"time_bias must be a 1-D table [num_buckets + 1], got shape {tuple(time_bias.shape)}")
        if timestamps is None:
            raise ValueError("time_bias needs timestamps: pass the jagged [T] int64 event times, or time_bias=None")
    if timestamps is not None:
        if time_bias is None:
            raise ValueError("timestamps were given without time_bias: they only feed the time bias; pass "
                             "time_bias=<table [num_buckets + 1]> or drop timestamps")
        if not isinstance(timestamps, torch.Tensor):
            raise TypeError(f"timestamps must be a jagged [T] integer tensor, got {type(timestamps).__name__}")
        if timestamps.dtype.is_floating_point or timestamps.dtype.is_complex or timestamps.dtype == torch.bool:
            raise TypeError(f"timestamps must be an integer tensor (e.g. seconds), got {timestamps.dtype}")
        if timestamps.dim() != 1 or (total is not None and timestamps.shape[0] != total):
            raise ValueError(f"timestamps must have shape ({'T' if total is None else total},) (one per row of q), "
                             f"got {tuple(timestamps.shape)}")
        if timestamps.device != device:
            raise ValueError(f"timestamps are on {timestamps.device} but q is on {device}")
    scale = time_bucket_scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"time_bucket_scale must be a positive finite number, got {scale!r}")


def validate_attention_data(q: torch.Tensor, offsets: torch.Tensor, max_seq_len: int,
                            num_targets: Optional[torch.Tensor] = None) -> None:
    """The checks that read data (a host synchronisation on GPU): offsets valid for ``T``
    rows, every length <= ``max_seq_len``, and ``0 <= num_targets <= length``."""
    validate_offsets(offsets, q.shape[0])
    lengths = offsets[1:] - offsets[:-1]
    if lengths.numel() and int(lengths.max()) > max_seq_len:
        raise ValueError(f"a sequence has {int(lengths.max())} positions, more than max_seq_len={max_seq_len}")
    if num_targets is not None and num_targets.numel():
        nt = num_targets.to(torch.int64)
        bad = (nt < 0) | (nt > lengths)
        if bool(bad.any()):
            b = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"num_targets[{b}]={int(nt[b])} must be between 0 and the sequence length {int(lengths[b])}")


# ---------------------------------------------------------------------------- reference
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _relative_bias_indices(offsets: torch.Tensor, n: int, *, position_size: Optional[int],
                           num_buckets: Optional[int], timestamps: Optional[torch.Tensor], time_bucket_scale: float,
                           num_targets: Optional[torch.Tensor], contextual_len: int
                           ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Table indices (int64) of the position and time bias of every (query, key) pair: time
    ``[B, n, n]``, position ``[B, n, n]``, or ``[1, n, n]`` when ids are plain positions (no
    targets, no prefix: the same for every sequence); None for an absent table. The one
    definition of the bias, shared by the reference forward (a gather) and backward (a
    reduction by index). Pairs outside a sequence get valid but meaningless indices."""
    lengths = offsets[1:] - offsets[:-1]
    batch = lengths.shape[0]
    position_index = time_index = None
    if position_size is not None:
        if num_targets is None and contextual_len == 0:
            ids, batch = torch.arange(n, device=offsets.device).view(1, n), 1  # ids = positions
        else:
            ids, _ = _position_ids(lengths, n, num_targets, contextual_len)
        half = (position_size + 1) // 2
        position_index = (ids.view(batch, 1, n) - ids.view(batch, n, 1) + (half - 1)).clamp(0, position_size - 1)
    if num_buckets is not None:
        lengths = offsets[1:] - offsets[:-1]
        batch = lengths.shape[0]
        times, _ = pad(timestamps.to(torch.int64), offsets, n, validate=False)  # [B, n]
        positions = torch.arange(n, device=offsets.device).view(1, n)
        history_end = lengths.view(batch, 1)  # first position that is a target (or the length)
        if num_targets is not None:
            history_end = history_end - num_targets.to(torch.int64).view(batch, 1)
        following = torch.cat([times[:, 1:], times[:, -1:]], dim=1)
        query_times = torch.where(positions + 1 < history_end, following, times)  # t_next(i)
        gap = (query_times.view(batch, n, 1) - times.view(batch, 1, n)).abs().clamp(min=1)
        # fp32 on purpose: the kernels compute the same fp32 ops, so both agree on every bucket
        inverse_scale = torch.tensor(1.0 / time_bucket_scale, dtype=torch.float32, device=offsets.device)
        buckets = torch.floor(torch.log(gap.to(torch.float32)) * inverse_scale)
        time_index = buckets.clamp(0, num_buckets).to(torch.int64)
    return position_index, time_index


def _table_sizes(position_bias, time_bias) -> Dict[str, Optional[int]]:
    return dict(position_size=None if position_bias is None else position_bias.shape[0],
                num_buckets=None if time_bias is None else time_bias.shape[0] - 1)


def _dense_bias(offsets, n, position_bias, time_bias, timestamps, time_bucket_scale, num_targets, contextual_len,
                dtype, indices=None) -> Optional[torch.Tensor]:
    """The expanded bias ``[B or 1, n, n]`` in ``dtype`` (None without tables); ``indices``:
    those of :func:`_relative_bias_indices`, when the caller has them."""
    if position_bias is None and time_bias is None:
        return None
    if indices is None:
        indices = _relative_bias_indices(
            offsets, n, **_table_sizes(position_bias, time_bias), timestamps=timestamps,
            time_bucket_scale=time_bucket_scale, num_targets=num_targets, contextual_len=contextual_len)
    position_index, time_index = indices
    bias = None
    for table, index in ((position_bias, position_index), (time_bias, time_index)):
        if table is not None:
            term = table.to(dtype)[index]
            bias = term if bias is None else bias + term
    return bias


def relative_bias_dense(
    offsets: torch.Tensor,
    max_seq_len: int,
    *,
    position_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    time_bucket_scale: float = 0.301,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
) -> torch.Tensor:
    """The relative attention bias of the tables, expanded: ``[B, max_seq_len, max_seq_len]``.

    ``bias[b, i, j]`` as defined in the module docstring, in the tables' (promoted) dtype,
    differentiable in the tables; entries outside a sequence are 0. Passing
    ``rab=relative_bias_dense(...).unsqueeze(1)`` to :func:`hstu_attention` gives the same
    result as passing the tables (which never build this ``O(B N^2)`` tensor): a cross-check
    for tests and for code that builds the bias itself.
    """
    if position_bias is None and time_bias is None:
        raise ValueError("relative_bias_dense needs position_bias, time_bias or both")
    check_offsets_layout(offsets)
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    _check_bias_tables(offsets.device, None, max_seq_len, position_bias, time_bias, timestamps, time_bucket_scale)
    if num_targets is not None and tuple(num_targets.shape) != (offsets.shape[0] - 1,):
        raise ValueError(f"num_targets must have shape ({offsets.shape[0] - 1},), got {tuple(num_targets.shape)}")
    dtypes = [t.dtype for t in (position_bias, time_bias) if t is not None]
    dtype = torch.promote_types(dtypes[0], dtypes[-1])
    bias = _dense_bias(offsets, max_seq_len, position_bias, time_bias, timestamps, time_bucket_scale, num_targets,
                       contextual_len, dtype)
    lengths = offsets[1:] - offsets[:-1]
    bias = bias.expand(lengths.shape[0], max_seq_len, max_seq_len)
    inside = torch.arange(max_seq_len, device=offsets.device).view(1, -1) < lengths.view(-1, 1)
    return torch.where(inside.unsqueeze(2) & inside.unsqueeze(1), bias, bias.new_zeros(()))


def _dense_terms(q, k, v, offsets, max_seq_len, alpha, causal, num_targets, contextual_len,
                 max_attn_len, rab, normalizer, position_bias=None, time_bias=None, timestamps=None,
                 time_bucket_scale=0.301, bias_indices=None):
    """Padded fp32 (fp64 for fp64 input) q, k, v, the scores S, the mask and the divisor."""
    acc = _accumulation_dtype(q.dtype)
    n = max_seq_len
    # offsets were validated by the caller (validate_attention_data): no more host syncs
    qp, _ = pad(q.to(acc), offsets, n, validate=False)  # [B, N, H, d_qk]
    kp, _ = pad(k.to(acc), offsets, n, validate=False)
    vp, _ = pad(v.to(acc), offsets, n, validate=False)  # [B, N, H, d_v]
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * alpha
    if rab is not None:
        scores = scores + rab.to(acc)
    bias = _dense_bias(offsets, n, position_bias, time_bias, timestamps, time_bucket_scale, num_targets,
                       contextual_len, acc, bias_indices)
    if bias is not None:
        scores = scores + bias.unsqueeze(1)
    lengths = offsets[1:] - offsets[:-1]
    mask = attention_mask(lengths, n, causal=causal, num_targets=num_targets,
                          contextual_len=contextual_len, max_attn_len=max_attn_len).unsqueeze(1)
    if normalizer == "max_seq_len":
        divisor: Any = float(n)
    else:  # "seq_len": an empty sequence has no rows, so its divisor never matters
        divisor = lengths.clamp(min=1).to(acc).view(-1, 1, 1, 1)
    return qp, kp, vp, scores, mask, divisor


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    rab: Optional[torch.Tensor] = None,
    position_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    time_bucket_scale: float = 0.301,
    normalizer: str = "max_seq_len",
) -> torch.Tensor:
    """HSTU attention in plain PyTorch: pad, dense masked SiLU attention, unpad.

    Accumulates in fp32 (fp64 for fp64 inputs) and returns ``[T, H, d_v]`` in ``q``'s
    dtype. Differentiable in ``q, k, v, rab`` and the bias tables through ordinary autograd
    (the tables through a dense gather: slow backward; the op's backward,
    :func:`hstu_attention_reference_backward`, reduces by index instead). Checks its inputs
    (layout and data). See the module docstring for the formula and :func:`attention_mask`
    for the mask.
    """
    check_attention_inputs(q, k, v, offsets, max_seq_len=max_seq_len, alpha=alpha, num_targets=num_targets,
                           contextual_len=contextual_len, max_attn_len=max_attn_len, rab=rab,
                           normalizer=normalizer, position_bias=position_bias, time_bias=time_bias,
                           timestamps=timestamps, time_bucket_scale=time_bucket_scale)
    validate_attention_data(q, offsets, max_seq_len, num_targets)
    _, _, vp, scores, mask, divisor = _dense_terms(q, k, v, offsets, max_seq_len, alpha, causal, num_targets,
                                                   contextual_len, max_attn_len, rab, normalizer, position_bias,
                                                   time_bias, timestamps, time_bucket_scale)
    # where, not multiply: a -inf in rab at a masked place must not turn into NaN
    probs = torch.where(mask, F.silu(scores) / divisor, scores.new_zeros(()))
    out = torch.einsum("bhij,bjhd->bihd", probs, vp)
    return unpad(out, offsets, q.shape[0], validate=False).to(q.dtype)


def hstu_attention_reference_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    rab: Optional[torch.Tensor] = None,
    position_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    time_bucket_scale: float = 0.301,
    normalizer: str = "max_seq_len",
    compute_drab: bool = True,
    compute_dposition_bias: bool = True,
    compute_dtime_bias: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """Gradients ``(dq, dk, dv, drab, d_position_bias, d_time_bias)`` of
    :func:`hstu_attention_reference`, written out.

    With ``P = M * SiLU(S) / N`` and ``out = P V``: ``dV = P^T dO``, ``dP = dO V^T``,
    ``dS = M * dP * SiLU'(S) / N`` with ``SiLU'(s) = sig(s) (1 + s (1 - sig(s)))``,
    ``dQ = alpha dS K``, ``dK = alpha dS^T Q``, ``drab = dS`` summed over the dimensions
    ``rab`` broadcasts, and each table's gradient is ``dS`` summed over heads and then by
    table index (one ``index_add_``: no ``[B, N, N]`` gradient of a gathered bias, no sort).
    No autograd involved, so it runs inside custom-op implementations. A gradient is None
    when its input is None or its ``compute_*`` flag is False. Inputs are taken as the
    forward pass checked them (no validation here).
    """
    if tuple(grad_out.shape) != (q.shape[0], q.shape[1], v.shape[2]):
        raise ValueError(f"grad_out must have shape {(q.shape[0], q.shape[1], v.shape[2])}, got {tuple(grad_out.shape)}")
    indices = None
    if position_bias is not None or time_bias is not None:
        indices = _relative_bias_indices(
            offsets, max_seq_len, **_table_sizes(position_bias, time_bias), timestamps=timestamps,
            time_bucket_scale=time_bucket_scale, num_targets=num_targets, contextual_len=contextual_len)
    qp, kp, vp, scores, mask, divisor = _dense_terms(q, k, v, offsets, max_seq_len, alpha, causal, num_targets,
                                                     contextual_len, max_attn_len, rab, normalizer, position_bias,
                                                     time_bias, timestamps, time_bucket_scale, indices)
    zero = scores.new_zeros(())
    probs = torch.where(mask, F.silu(scores) / divisor, zero)
    dop, _ = pad(grad_out.to(scores.dtype), offsets, max_seq_len, validate=False)  # [B, N, H, d_v]
    dvp = torch.einsum("bhij,bihd->bjhd", probs, dop)
    dprobs = torch.einsum("bihd,bjhd->bhij", dop, vp)
    sig = torch.sigmoid(scores)
    dscores = torch.where(mask, dprobs * sig * (1 + scores * (1 - sig)) / divisor, zero)
    dqp = torch.einsum("bhij,bjhd->bihd", dscores, kp) * alpha
    dkp = torch.einsum("bhij,bihd->bjhd", dscores, qp) * alpha
    drab = None
    if rab is not None and compute_drab:
        drab = dscores
        if rab.shape[0] == 1:
            drab = drab.sum(0, keepdim=True)
        if rab.shape[1] == 1:
            drab = drab.sum(1, keepdim=True)
        drab = drab.to(rab.dtype)
    want_position = position_bias is not None and compute_dposition_bias
    want_time = time_bias is not None and compute_dtime_bias
    d_tables: list = [None, None]
    if want_position or want_time:
        per_pair = dscores.sum(1)  # the tables are shared by all heads
        for slot, (table, index, want) in enumerate(((position_bias, indices[0], want_position),
                                                     (time_bias, indices[1], want_time))):
            if want:
                # an index shared by all sequences ([1, n, n]) takes the batch sum first
                pairs = per_pair.sum(0, keepdim=True) if index.shape[0] == 1 else per_pair
                summed = torch.zeros(table.shape[0], dtype=pairs.dtype, device=pairs.device)
                d_tables[slot] = summed.index_add_(0, index.reshape(-1), pairs.reshape(-1)).to(table.dtype)
    total = q.shape[0]
    return (unpad(dqp, offsets, total, validate=False).to(q.dtype),
            unpad(dkp, offsets, total, validate=False).to(k.dtype),
            unpad(dvp, offsets, total, validate=False).to(v.dtype), drab, d_tables[0], d_tables[1])


# ---------------------------------------------------------------------------- backends
@runtime_checkable
class AttentionBackend(Protocol):
    """A backend with its own backward (see the module docstring for the contract)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, *,
                max_seq_len: int, alpha: float, causal: bool, num_targets: Optional[torch.Tensor],
                contextual_len: int, max_attn_len: int, rab: Optional[torch.Tensor],
                position_bias: Optional[torch.Tensor], time_bias: Optional[torch.Tensor],
                timestamps: Optional[torch.Tensor], time_bucket_scale: float, normalizer: str) -> torch.Tensor: ...

    def backward(self, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 offsets: torch.Tensor, *, max_seq_len: int, alpha: float, causal: bool,
                 num_targets: Optional[torch.Tensor], contextual_len: int, max_attn_len: int,
                 rab: Optional[torch.Tensor], position_bias: Optional[torch.Tensor],
                 time_bias: Optional[torch.Tensor], timestamps: Optional[torch.Tensor], time_bucket_scale: float,
                 normalizer: str, compute_drab: bool, compute_dposition_bias: bool, compute_dtime_bias: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                            Optional[torch.Tensor], Optional[torch.Tensor]]: ...


class TorchReferenceBackend:
    """The ``torch`` backend: :func:`hstu_attention_reference` and its written-out backward.

    Runs anywhere torch runs; memory is ``O(B * H * max_seq_len^2)``.
    """

    def forward(self, q, k, v, offsets, **options):
        return hstu_attention_reference(q, k, v, offsets, **options)

    def backward(self, grad_out, q, k, v, offsets, **options):
        return hstu_attention_reference_backward(grad_out, q, k, v, offsets, **options)


class _ForwardOnly:
    """Adapts a forward-only backend callable: backward comes from the reference."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.forward = fn

    def backward(self, grad_out, q, k, v, offsets, **options):
        return hstu_attention_reference_backward(grad_out, q, k, v, offsets, **options)


# registry -> {"instances": {component name: backend}, "choices": {call key: backend}}. Weak
# keys: gauss_plugins.reset() builds a new registry, and with it a fresh choice.
_chosen: "weakref.WeakKeyDictionary[Any, Dict[str, Dict[Any, Any]]]" = weakref.WeakKeyDictionary()
_chosen_lock = threading.Lock()


def _backend_for(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """The backend object for ``name`` ("auto" or a registered name).

    Selection (availability checks, ``supports``, the ``gauss_select_component`` hook) costs
    ~200 us, more than a small attention call, so the choice is remembered per registry for
    each (name, device, dtypes, heads, head dims); each component's backend is built once.
    """
    from gauss_plugins.plugins import get_registry

    registry = get_registry()
    key = (name, q.device, q.dtype, k.dtype, v.dtype, q.shape[1], q.shape[2], v.shape[2])
    state = _chosen.get(registry)
    if state is not None:
        backend = state["choices"].get(key)
        if backend is not None:
            return backend
    component = registry.select("attention_backend", name, q=q, k=k, v=v)
    with _chosen_lock:
        state = _chosen.setdefault(registry, {"instances": {}, "choices": {}})
        backend = state["instances"].get(component.name)
        if backend is None:
            made = component.create()
            if callable(getattr(made, "forward", None)) and callable(getattr(made, "backward", None)):
                backend = made
            elif callable(made):
                backend = _ForwardOnly(made)
            else:
                raise TypeError(
                    f"attention_backend {component.name!r} ({component.provider}) built {made!r}, which is "
                    "neither a callable nor an object with forward and backward methods")
            state["instances"][component.name] = backend
        state["choices"][key] = backend
    return backend


# ---------------------------------------------------------------------------- running a backend
# Options after the tensors, in schema order: (max_seq_len, alpha, causal, contextual_len,
# max_attn_len, time_bucket_scale, normalizer).
_Options = Tuple[int, float, bool, int, int, float, str]


class _Tensors(NamedTuple):
    """The optional tensor arguments besides q, k, v, offsets."""

    num_targets: Optional[torch.Tensor]
    rab: Optional[torch.Tensor]
    position_bias: Optional[torch.Tensor]
    time_bias: Optional[torch.Tensor]
    timestamps: Optional[torch.Tensor]


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _keywords(options: _Options, extra: _Tensors) -> Dict[str, Any]:
    max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer = options
    return dict(max_seq_len=max_seq_len, alpha=alpha, causal=causal, contextual_len=contextual_len,
                max_attn_len=max_attn_len, time_bucket_scale=time_bucket_scale, normalizer=normalizer,
                **{name: _contiguous(t) for name, t in extra._asdict().items()})


def _run_forward(impl: Any, name: str, q, k, v, offsets, extra: _Tensors, options: _Options) -> torch.Tensor:
    out = impl.forward(q.contiguous(), k.contiguous(), v.contiguous(), offsets.contiguous(),
                       **_keywords(options, extra))
    expected = (q.shape[0], q.shape[1], v.shape[2])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected or out.dtype != q.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"attention backend {name!r} returned {got}, expected {expected} {q.dtype}")
    return out


def _run_backward(impl: Any, name: str, grad_out, q, k, v, offsets, extra: _Tensors, options: _Options,
                  wanted: Tuple[bool, bool, bool]):
    """``wanted``: whether the gradients of rab, position_bias and time_bias are needed."""
    result = impl.backward(grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                           offsets.contiguous(), compute_drab=wanted[0], compute_dposition_bias=wanted[1],
                           compute_dtime_bias=wanted[2], **_keywords(options, extra))
    if not isinstance(result, tuple) or len(result) != 6:
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise RuntimeError(f"attention backend {name!r}: backward must return (dq, dk, dv, drab, d_position_bias, "
                           f"d_time_bias), got {got}")
    dq, dk, dv = result[:3]
    grads = []
    for want, grad, what, like in zip(wanted, result[3:], ("rab", "position_bias", "time_bias"), extra[1:4]):
        if not want:
            grads.append(None)
            continue
        if grad is None or tuple(grad.shape) != tuple(like.shape):
            got = "None" if grad is None else str(tuple(grad.shape))
            raise RuntimeError(f"attention backend {name!r} returned {got} as the gradient of {what}, expected "
                               f"{tuple(like.shape)}")
        grads.append(grad)
    return (dq, dk, dv, *grads)


def _wanted(extra: _Tensors, needs: Tuple[bool, bool, bool]) -> Tuple[bool, bool, bool]:
    return tuple(t is not None and need for t, need in zip(extra[1:4], needs))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the custom op
@torch.library.custom_op("gauss::hstu_attention_fwd", mutates_args=())
def _hstu_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor], rab: Optional[torch.Tensor], position_bias: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor], timestamps: Optional[torch.Tensor],
    max_seq_len: int, alpha: float, causal: bool, contextual_len: int, max_attn_len: int,
    time_bucket_scale: float, normalizer: str, backend: str, validate: bool,
) -> torch.Tensor:
    if validate:
        validate_attention_data(q, offsets, max_seq_len, num_targets)
    options = (max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer)
    extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
    return _run_forward(_backend_for(backend, q, k, v), backend, q, k, v, offsets, extra, options)


@_hstu_attention_fwd.register_fake
def _hstu_attention_fwd_fake(q, k, v, offsets, num_targets, rab, position_bias, time_bias, timestamps, max_seq_len,
                             alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer, backend,
                             validate):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.custom_op("gauss::hstu_attention_bwd", mutates_args=())
def _hstu_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
    num_targets: Optional[torch.Tensor], rab: Optional[torch.Tensor], position_bias: Optional[torch.Tensor],
    time_bias: Optional[torch.Tensor], timestamps: Optional[torch.Tensor],
    max_seq_len: int, alpha: float, causal: bool, contextual_len: int, max_attn_len: int,
    time_bucket_scale: float, normalizer: str, backend: str, compute_drab: bool, compute_dposition_bias: bool,
    compute_dtime_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = (max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer)
    extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
    grads = _run_backward(_backend_for(backend, q, k, v), backend, grad_out, q, k, v, offsets, extra, options,
                          _wanted(extra, (compute_drab, compute_dposition_bias, compute_dtime_bias)))
    # a custom op cannot return None: an empty tensor stands for "no gradient"
    return tuple(g if g is not None else q.new_empty((0,)) for g in grads)  # type: ignore[return-value]


@_hstu_attention_bwd.register_fake
def _hstu_attention_bwd_fake(grad_out, q, k, v, offsets, num_targets, rab, position_bias, time_bias, timestamps,
                             max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer,
                             backend, compute_drab, compute_dposition_bias, compute_dtime_bias):
    extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
    wanted = _wanted(extra, (compute_drab, compute_dposition_bias, compute_dtime_bias))
    optional = tuple(torch.empty_like(t) if want else q.new_empty((0,)) for t, want in zip(extra[1:4], wanted))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) + optional


_TENSOR_INPUTS = 9  # q, k, v, offsets, num_targets, rab, position_bias, time_bias, timestamps


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS])
    (max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer, backend,
     _validate) = inputs[_TENSOR_INPUTS:]
    ctx.options = (max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer, backend)


def _backward(ctx, grad_out):
    q, k, v, offsets, num_targets, rab, position_bias, time_bias, timestamps = ctx.saved_tensors
    extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
    wanted = _wanted(extra, tuple(ctx.needs_input_grad[5:8]))
    dq, dk, dv, drab, dpos, dtime = torch.ops.gauss.hstu_attention_bwd(
        grad_out, q, k, v, offsets, num_targets, rab, position_bias, time_bias, timestamps, *ctx.options, *wanted)
    optional = tuple(g if want else None for g, want in zip((drab, dpos, dtime), wanted))
    return (dq, dk, dv, None, None) + optional + (None,) * 10


_hstu_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------- the eager path
class _EagerHSTUAttention(torch.autograd.Function):
    """The op's autograd for plain eager calls, without the custom-op dispatch (which costs
    ~3x more host time per call; it matters for small, launch-bound shapes)."""

    @staticmethod
    def forward(ctx, q, k, v, rab, position_bias, time_bias, offsets, num_targets, timestamps, impl, name, options):
        ctx.save_for_backward(q, k, v, rab, position_bias, time_bias, offsets, num_targets, timestamps)
        ctx.impl, ctx.name, ctx.options = impl, name, options
        extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
        return _run_forward(impl, name, q, k, v, offsets, extra, options)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rab, position_bias, time_bias, offsets, num_targets, timestamps = ctx.saved_tensors
        extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
        wanted = _wanted(extra, tuple(ctx.needs_input_grad[3:6]))
        dq, dk, dv, drab, dpos, dtime = _run_backward(ctx.impl, ctx.name, grad_out, q, k, v, offsets, extra,
                                                      ctx.options, wanted)
        return (dq, dk, dv, drab, dpos, dtime) + (None,) * 6


def _traced(q: torch.Tensor) -> bool:
    """Whether something records or transforms this call (torch.compile, torch.export,
    make_fx, functorch, a dispatch mode): then it must go through the custom op."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (torch.compiler.is_compiling() or type(q) is not torch.Tensor
            or torch._C._are_functorch_transforms_active() or _get_current_dispatch_mode() is not None)


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_seq_len: int,
    alpha: float = 1.0,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    rab: Optional[torch.Tensor] = None,
    position_bias: Optional[torch.Tensor] = None,
    time_bias: Optional[torch.Tensor] = None,
    timestamps: Optional[torch.Tensor] = None,
    time_bucket_scale: float = 0.301,
    normalizer: str = "max_seq_len",
    backend: str = "auto",
    validate: Optional[bool] = None,
) -> torch.Tensor:
    """HSTU attention over jagged sequences: ``[T, H, d_qk] x2, [T, H, d_v] -> [T, H, d_v]``.

    Same semantics as :func:`hstu_attention_reference` (see the module docstring for the
    relative bias tables ``position_bias`` / ``time_bias`` with ``timestamps``, and
    :func:`attention_mask`), computed by the ``attention_backend`` named ``backend``
    (``"auto"``: the available backend of highest priority that supports these tensors,
    e.g. ``triton`` on CUDA, ``torch`` on CPU). Differentiable in ``q, k, v``, ``rab`` and
    the two tables (not twice). Under ``torch.compile`` / ``torch.export`` (or any tracing)
    it is the one op ``gauss::hstu_attention_fwd`` (backward ``gauss::hstu_attention_bwd``);
    plain eager calls run the same backend code without the op's dispatch overhead. (A
    process that loads an exported program or AOTInductor package holding the op must
    import ``gauss_plugins.hstu.attention`` first, which registers it.) ``validate`` runs
    the data checks (offsets, lengths, num_targets) in eager calls; by default only for
    CPU tensors, since on a GPU they synchronise with the host.
    """
    check_attention_inputs(q, k, v, offsets, max_seq_len=max_seq_len, alpha=alpha, num_targets=num_targets,
                           contextual_len=contextual_len, max_attn_len=max_attn_len, rab=rab,
                           normalizer=normalizer, position_bias=position_bias, time_bias=time_bias,
                           timestamps=timestamps, time_bucket_scale=time_bucket_scale)
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend must be a backend name or 'auto', got {backend!r}")
    if validate is None:
        validate = q.device.type == "cpu"
    if num_targets is not None:
        num_targets = num_targets.to(torch.int64)
    if timestamps is not None:
        timestamps = timestamps.to(torch.int64)
    alpha, causal, time_bucket_scale = float(alpha), bool(causal), float(time_bucket_scale)
    if _traced(q):
        return torch.ops.gauss.hstu_attention_fwd(q, k, v, offsets, num_targets, rab, position_bias, time_bias,
                                                  timestamps, max_seq_len, alpha, causal, contextual_len,
                                                  max_attn_len, time_bucket_scale, normalizer, backend,
                                                  bool(validate))
    if validate:
        validate_attention_data(q, offsets, max_seq_len, num_targets)
    impl = _backend_for(backend, q, k, v)
    options = (max_seq_len, alpha, causal, contextual_len, max_attn_len, time_bucket_scale, normalizer)
    differentiable = (q, k, v, rab, position_bias, time_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        return _EagerHSTUAttention.apply(q, k, v, rab, position_bias, time_bias, offsets, num_targets, timestamps,
                                         impl, backend, options)
    extra = _Tensors(num_targets, rab, position_bias, time_bias, timestamps)
    return _run_forward(impl, backend, q, k, v, offsets, extra, options)
