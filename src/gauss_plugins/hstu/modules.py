"""HSTU blocks on jagged sequences: :class:`HSTUBlock`, :class:`HSTUEncoder`, their config.

One block (pre-norm, residual), ``x`` jagged ``[T, dim]``::

    u, v, q, k = split(phi(Linear(LayerNorm(x))))    phi = SiLU on the projections chosen
    a          = hstu_attention(q, k, v, relative bias tables)          [T, H, d_v]
    y          = x + Linear(Dropout(u * LayerNorm(a)))

Dropout sits before the output projection, as in the paper's research block
(generative-recommenders ``SequentialTransductionUnitJagged``: ``_o(dropout(u * norm(a))) + x``).

The relative attention bias (:class:`RelativeAttentionBias`) is a learned bias by relative
position plus, when ``num_time_buckets > 0``, a learned bias by bucket of the log time from
the key's event to the event being predicted; both are 1-D tables that
:func:`hstu_attention` expands per tile inside the attention (see the class for the exact
definition). Defaults follow the paper's research code: SiLU on all of U, V, Q, K, no
scaling of ``QK^T`` (``alpha = 1``), the normaliser ``N = max_seq_len``, 128 time buckets
of ``floor(ln(max(|dt|, 1)) / 0.301)``. Production variants (``alpha = 1/sqrt(d_qk)``,
``normalizer="seq_len"``, SiLU on U only...) are config options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gauss_plugins.hstu.attention import NORMALIZERS, hstu_attention
from gauss_plugins.jagged import check_offsets_layout, pad, unpad

__all__ = ["HSTUBlock", "HSTUConfig", "HSTUEncoder", "PaddedHSTUEncoder", "RelativeAttentionBias"]

_PROJECTIONS = ("u", "v", "q", "k")


@dataclass(frozen=True)
class HSTUConfig:
    """Hyper-parameters of an HSTU encoder (every block shares them).

    ``d_qk`` / ``d_v`` default to ``dim // num_heads``. ``silu_on`` names the projections
    that get SiLU (``"uvqk"`` = all, the research setting). ``alpha`` scales ``QK^T`` (1.0 in
    the research code; ``1/sqrt(d_qk)`` is the other common choice). ``normalizer`` is
    ``"max_seq_len"`` or ``"seq_len"`` (see :mod:`gauss_plugins.hstu.attention`).
    ``causal``, ``contextual_len`` and ``max_attn_len`` select the mask
    (:func:`~gauss_plugins.hstu.attention.attention_mask`). ``relative_position_bias=False``
    turns the position bias off; ``num_time_buckets = 0`` the time bias (then no timestamps
    are needed); ``time_bucket_scale`` is the width of a bucket in ``ln`` seconds.
    ``layer_norm_affine=False`` makes every LayerNorm of the encoder a plain normalisation
    without a learned scale and shift, as the paper's research block (``F.layer_norm`` with no
    weight); the default keeps the learned affine of earlier versions.
    ``backend`` names the attention backend (``"auto"`` picks by device).
    """

    dim: int
    num_blocks: int = 2
    num_heads: int = 1
    d_qk: Optional[int] = None
    d_v: Optional[int] = None
    max_seq_len: int = 200
    dropout: float = 0.2
    alpha: float = 1.0
    normalizer: str = "max_seq_len"
    silu_on: str = "uvqk"
    causal: bool = True
    contextual_len: int = 0
    max_attn_len: int = 0
    relative_position_bias: bool = True
    num_time_buckets: int = 128
    time_bucket_scale: float = 0.301
    layer_norm_eps: float = 1e-6
    layer_norm_affine: bool = True
    output_norm: bool = True
    backend: str = "auto"
    # filled in by __post_init__ when d_qk / d_v are None
    head_dims: Tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def positive_int(name: str, value) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"HSTUConfig.{name} must be a positive int, got {value!r}")

        for name in ("dim", "num_blocks", "num_heads", "max_seq_len"):
            positive_int(name, getattr(self, name))
        d_qk = self.d_qk if self.d_qk is not None else self.dim // self.num_heads
        d_v = self.d_v if self.d_v is not None else self.dim // self.num_heads
        positive_int("d_qk (or dim // num_heads)", d_qk)
        positive_int("d_v (or dim // num_heads)", d_v)
        object.__setattr__(self, "head_dims", (d_qk, d_v))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HSTUConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"HSTUConfig.alpha must be finite, got {self.alpha!r}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"HSTUConfig.normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        if not isinstance(self.silu_on, str) or any(c not in _PROJECTIONS for c in self.silu_on) \
                or len(set(self.silu_on)) != len(self.silu_on):
            raise ValueError(f"HSTUConfig.silu_on must be a subset of 'uvqk' (e.g. 'uvqk', 'u', ''), got {self.silu_on!r}")
        for name in ("contextual_len", "max_attn_len", "num_time_buckets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"HSTUConfig.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.layer_norm_affine, bool):
            raise ValueError(f"HSTUConfig.layer_norm_affine must be True or False, got {self.layer_norm_affine!r}")
        if not isinstance(self.relative_position_bias, bool):
            raise ValueError("HSTUConfig.relative_position_bias must be True or False, got "
                             f"{self.relative_position_bias!r}")
        scale = self.time_bucket_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"HSTUConfig.time_bucket_scale must be a positive finite number, got {scale!r}")

    @property
    def attention_options(self) -> dict:
        """The keyword arguments of :func:`hstu_attention` this config fixes."""
        return dict(max_seq_len=self.max_seq_len, alpha=self.alpha, causal=self.causal,
                    contextual_len=self.contextual_len, max_attn_len=self.max_attn_len,
                    normalizer=self.normalizer)


def _no_timestamps_error(num_time_buckets: int) -> ValueError:
    return ValueError(
        f"this HSTU encoder has a time bias (num_time_buckets={num_time_buckets}) but no timestamps were given: "
        "pass the events' timestamps, or build it with num_time_buckets=0 (model.num_time_buckets: 0 in a "
        "config) for data without times")


class RelativeAttentionBias(nn.Module):
    """The learned relative attention bias of one block, as two small tables.

    ``position_weight`` ``[2L - 1]`` (``L = max_seq_len``) holds a bias per relative position,
    ``time_weight`` ``[num_time_buckets + 1]`` one per bucket of log time gap; either may be
    off (None). The tables are handed to :func:`hstu_attention`, which adds, for query ``i``
    and key ``j`` of one sequence (shared by all heads)::

        position_weight[clamp(id_j - id_i + L - 1, 0, 2L - 2)]
      + time_weight[clamp(floor(ln(max(|t_next(i) - t_j|, 1)) / time_bucket_scale), 0, num_time_buckets)]

    ``id`` is the position id of :func:`~gauss_plugins.hstu.attention.attention_mask`
    (candidates / targets share the first target's id), and ``t_next(i)`` is the time of the
    event position ``i`` predicts: ``t_{i+1}`` when ``i + 1`` is a non-target position of the
    same sequence, else ``t_i``. That is the paper code's bucketing of "next timestamp minus
    key timestamp" (generative-recommenders, ``RelativeBucketedTimeAndPositionBasedBias``);
    the earlier ``|t_i - t_j|`` is not kept: it describes the gap to the event already seen,
    not to the one being predicted. Targets use their own time, so a candidate's bias does
    not depend on its slot or on the other candidates (the M-FALCON property).

    Nothing ``[B, N, N]`` is ever built here: the attention backend computes the bias per
    tile and reduces its gradient into the tables.
    """

    def __init__(self, max_seq_len: int, *, position: bool = True, num_time_buckets: int = 128,
                 time_bucket_scale: float = 0.301) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_time_buckets = num_time_buckets
        self.time_bucket_scale = float(time_bucket_scale)
        # N(0, 0.02) as the paper code initialises both tables
        self.position_weight = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(0.0, 0.02)) if position else None
        self.time_weight = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(0.0, 0.02)) \
            if num_time_buckets > 0 else None

    def attention_kwargs(self, timestamps: Optional[torch.Tensor]) -> Dict[str, Any]:
        """The bias keyword arguments of :func:`hstu_attention` for jagged ``timestamps``
        ``[T]`` (int64; required when the time bias is on, ignored otherwise)."""
        if self.time_weight is not None and timestamps is None:
            raise _no_timestamps_error(self.num_time_buckets)
        return dict(position_bias=self.position_weight, time_bias=self.time_weight,
                    timestamps=timestamps if self.time_weight is not None else None,
                    time_bucket_scale=self.time_bucket_scale)


class HSTUBlock(nn.Module):
    """One HSTU layer on jagged input (see the module docstring for the computation).

    ``forward(x [T, dim], offsets [B + 1], timestamps [T] or None, num_targets [B] or None)
    -> [T, dim]``. :meth:`project` and :meth:`combine` expose the two halves around the
    attention (:meth:`attend`), for callers that attend differently (M-FALCON's cached history).
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        d_qk, d_v = config.head_dims
        h = config.num_heads
        affine = config.layer_norm_affine
        self.input_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps, elementwise_affine=affine)
        self.uvqk = nn.Linear(config.dim, h * (2 * d_v + 2 * d_qk), bias=False)
        nn.init.normal_(self.uvqk.weight, 0.0, 0.02)
        self.relative_bias = RelativeAttentionBias(
            config.max_seq_len, position=config.relative_position_bias,
            num_time_buckets=config.num_time_buckets, time_bucket_scale=config.time_bucket_scale)
        self.attention_norm = nn.LayerNorm(h * d_v, eps=config.layer_norm_eps, elementwise_affine=affine)
        self.output = nn.Linear(h * d_v, config.dim)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.dropout = nn.Dropout(config.dropout)
        self._silu = tuple(name in config.silu_on for name in _PROJECTIONS)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, dim]`` -> ``u [T, H*d_v], q [T, H, d_qk], k [T, H, d_qk], v [T, H, d_v]``."""
        d_qk, d_v = self.config.head_dims
        h = self.config.num_heads
        parts = torch.split(self.uvqk(self.input_norm(x)), [h * d_v, h * d_v, h * d_qk, h * d_qk], dim=-1)
        u, v, q, k = (F.silu(p) if act else p for p, act in zip(parts, self._silu))
        t = x.shape[0]
        return u, q.reshape(t, h, d_qk), k.reshape(t, h, d_qk), v.reshape(t, h, d_v)

    def combine(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual output from the block input, the gate ``u`` and attention ``[T, H, d_v]``:
        ``x + output(dropout(u * norm(attn)))`` (the paper's placement of the dropout)."""
        gated = u * self.attention_norm(attn.reshape(attn.shape[0], attn.shape[1] * attn.shape[2]))
        return x + self.output(self.dropout(gated))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
               timestamps: Optional[torch.Tensor] = None, num_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:func:`hstu_attention` with this block's bias tables and mask options."""
        return hstu_attention(q, k, v, offsets, num_targets=num_targets, backend=self.config.backend,
                              **self.relative_bias.attention_kwargs(timestamps), **self.config.attention_options)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, timestamps: Optional[torch.Tensor] = None,
                num_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        u, q, k, v = self.project(x)
        return self.combine(x, u, self.attend(q, k, v, offsets, timestamps, num_targets))


class HSTUEncoder(nn.Module):
    """A stack of :class:`HSTUBlock` (then a LayerNorm when ``config.output_norm``).

    ``forward(x, offsets, timestamps=None, num_targets=None) -> [T, dim]``:

    * ``x``: jagged values ``[T, dim]`` (float), rows of sequence ``b`` at
      ``offsets[b]:offsets[b + 1]``; every sequence at most ``config.max_seq_len`` long.
    * ``offsets``: ``[B + 1]`` int64.
    * ``timestamps``: jagged ``[T]`` integer (e.g. seconds); required when the config has a
      time bias (``num_time_buckets > 0``), ignored otherwise.
    * ``num_targets``: ``[B]`` integer; the last ``num_targets[b]`` rows of sequence ``b``
      are targets (M-FALCON mask: they see the history and themselves only).

    Returns one output row per input row (same jagged layout). Input positions carry no
    absolute position embedding here: add one before if the model wants it.
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(HSTUBlock(config) for _ in range(config.num_blocks))
        self.output_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps,
                                        elementwise_affine=config.layer_norm_affine) if config.output_norm else None

    def check_inputs(self, x: torch.Tensor, offsets: torch.Tensor, timestamps: Optional[torch.Tensor]) -> None:
        """Shape checks that read no data (lengths are checked by the attention)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.config.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be jagged values of shape [T, {self.config.dim}], got {shape}")
        check_offsets_layout(offsets)
        if timestamps is not None:
            if not isinstance(timestamps, torch.Tensor) or tuple(timestamps.shape) != (x.shape[0],):
                raise ValueError(f"timestamps must be jagged like x, shape [{x.shape[0]}]")
            if timestamps.dtype.is_floating_point or timestamps.dtype.is_complex or timestamps.dtype == torch.bool:
                raise TypeError(f"timestamps must be integers (e.g. seconds), got {timestamps.dtype}")
        elif self.config.num_time_buckets > 0:
            raise _no_timestamps_error(self.config.num_time_buckets)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_norm(x) if self.output_norm is not None else x

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, timestamps: Optional[torch.Tensor] = None,
                num_targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_inputs(x, offsets, timestamps)
        if timestamps is not None:
            timestamps = timestamps.to(torch.int64)  # the attention op reads int64 times
        for block in self.blocks:
            x = block(x, offsets, timestamps, num_targets)
        return self.finish(x)


class PaddedHSTUEncoder(nn.Module):
    """:class:`HSTUEncoder` behind a padded interface, for models that batch as ``[B, N]``.

    ``forward(x [B, N, D], valid [B, N] bool, timestamps [B, N] or None) -> [B, N, D]``;
    ``valid`` must be a prefix mask (right padding). Padded output rows are zero. Timestamps
    are passed on only when the config has a time bias (so data without times may send
    anything, e.g. the zeros a batch collator fills in).
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.encoder = HSTUEncoder(config)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or valid.shape != x.shape[:2] or valid.dtype != torch.bool:
            raise ValueError(f"expected x [B, N, D] and a bool valid [B, N], got {tuple(x.shape)} and "
                             f"{tuple(valid.shape)} {valid.dtype}")
        if timestamps is not None and timestamps.shape != valid.shape:
            raise ValueError(f"timestamps must be padded like x, shape {tuple(valid.shape)}, got "
                             f"{tuple(timestamps.shape)}")
        lengths = valid.sum(dim=1)
        if valid.device.type == "cpu":  # a data check: on a GPU it would synchronise with the host
            prefix = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0) < lengths.unsqueeze(1)
            if not torch.equal(prefix, valid):
                raise ValueError("valid must mark a prefix of each row (right-padded sequences)")
        offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=valid.device)
        torch.cumsum(lengths, dim=0, out=offsets[1:])
        total = int(offsets[-1])  # the jagged size: the one read from the device per call
        jagged_time = None
        if timestamps is not None and self.encoder.config.num_time_buckets > 0:
            # offsets come from a prefix mask: valid by construction
            jagged_time = unpad(timestamps, offsets, total, validate=False)
        out = self.encoder(unpad(x, offsets, total, validate=False), offsets, jagged_time)
        padded, _ = pad(out, offsets, x.shape[1], validate=False)
        return padded
