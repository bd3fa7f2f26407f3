"""Jagged tensors: a batch of variable-length sequences as ``values`` + ``offsets``.

``values`` has shape ``(sum_i n_i, ...)``: the rows of sequence ``i`` are
``values[offsets[i]:offsets[i + 1]]``. ``offsets`` is a 1-D int64 tensor of shape ``(B + 1,)``
with ``offsets[0] == 0``, non-decreasing, and ``offsets[-1] == values.shape[0]``. This is the
layout of TorchRec's ``JaggedTensor`` and of the HSTU kernels: no padding is stored, and the
padded form exists only where a dense computation needs it (:func:`pad` / :func:`unpad`).

Validation that reads tensor data (:func:`validate_offsets`) synchronises with a GPU; the
padding helpers run it unless told ``validate=False`` by a caller that already checked.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = [
    "check_offsets_layout",
    "from_torchrec",
    "lengths_to_offsets",
    "offsets_to_lengths",
    "pad",
    "row_coordinates",
    "to_torchrec",
    "unpad",
    "validate_offsets",
]


def check_offsets_layout(offsets: torch.Tensor, name: str = "offsets") -> None:
    """Check what can be checked without reading data: a 1-D int64 tensor of at least one
    element. Safe under ``torch.compile`` / ``torch.export`` (no data-dependent branches)."""
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {offsets.dtype} (use offsets.long())")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape (B + 1,), got shape {tuple(offsets.shape)}")


def validate_offsets(offsets: torch.Tensor, total: Optional[int] = None, name: str = "offsets") -> None:
    """Raise a ``ValueError`` unless ``offsets`` is a valid offsets tensor for ``total`` rows.

    Reads the data (a device synchronisation on GPU): ``offsets[0] == 0``, non-decreasing,
    and ``offsets[-1] == total`` when ``total`` is given.
    """
    check_offsets_layout(offsets, name)
    first = int(offsets[0])
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if offsets.shape[0] > 1:
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < 0).any()):
            bad = int(torch.nonzero(steps < 0)[0, 0])
            raise ValueError(
                f"{name} must be non-decreasing; {name}[{bad}]={int(offsets[bad])} > "
                f"{name}[{bad + 1}]={int(offsets[bad + 1])}")
    if total is not None:
        last = int(offsets[-1])
        if last != total:
            raise ValueError(f"{name}[-1]={last} must equal the number of rows of the values ({total})")


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` non-negative integer lengths -> ``(B + 1,)`` int64 offsets (exclusive cumsum)."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D of shape (B,), got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError("lengths must be non-negative")
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    return offsets


def offsets_to_lengths(offsets: torch.Tensor) -> torch.Tensor:
    """``(B + 1,)`` offsets -> ``(B,)`` int64 lengths."""
    check_offsets_layout(offsets)
    return offsets[1:] - offsets[:-1]


def row_coordinates(offsets: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each of the ``total = offsets[-1]`` jagged rows: ``(sequence index, position in
    the sequence)``, two int64 tensors of shape ``(total,)``. Offsets are not validated."""
    rows = torch.arange(total, device=offsets.device)
    # row r belongs to the sequence b with offsets[b] <= r < offsets[b + 1]; empty sequences
    # are skipped by right=True. (repeat_interleave does the same but is ~300x slower on
    # small CPU tensors.)
    seq = torch.searchsorted(offsets[1:], rows, right=True)
    return seq, rows - offsets[seq]


def pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int,
        padding_value: float = 0.0, *, validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``values (T, ...)`` -> ``(padded (B, max_len, ...), mask (B, max_len) bool)``.

    ``mask[b, i]`` is True where position ``i`` holds a real row of sequence ``b``. A
    sequence longer than ``max_len`` is an error (never silently truncated). Differentiable
    with respect to ``values``. ``validate=False`` skips the checks that read ``offsets``
    (no host synchronisation on GPU) for callers whose offsets are already known good.
    """
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise ValueError("values must be a tensor of at least one dimension (T, ...)")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
    if offsets.device != values.device:
        raise ValueError(f"offsets are on {offsets.device} but values on {values.device}")
    total = values.shape[0]
    check_offsets_layout(offsets)
    lengths = offsets[1:] - offsets[:-1]
    batch_size = lengths.shape[0]
    if validate:
        validate_offsets(offsets, total)
        if batch_size and int(lengths.max()) > max_len:
            raise ValueError(f"a sequence has {int(lengths.max())} rows, more than max_len={max_len}")
    seq, pos = row_coordinates(offsets, total)
    padded = values.new_full((batch_size, max_len, *values.shape[1:]), padding_value)
    padded = padded.index_put((seq, pos), values)
    mask = torch.arange(max_len, device=values.device)[None, :] < lengths[:, None]
    return padded, mask


def unpad(padded: torch.Tensor, offsets: torch.Tensor, total: Optional[int] = None, *,
          validate: bool = True) -> torch.Tensor:
    """``padded (B, N, ...)`` -> jagged values ``(offsets[-1], ...)``; inverse of :func:`pad`.

    Rows past each sequence's length are dropped. Differentiable with respect to ``padded``.
    Passing ``total = offsets[-1]`` when it is known saves reading it from the device;
    ``validate=False`` skips the checks that read ``offsets``.
    """
    if not isinstance(padded, torch.Tensor) or padded.dim() < 2:
        raise ValueError("padded must be a tensor of shape (B, N, ...)")
    check_offsets_layout(offsets)
    if offsets.device != padded.device:
        raise ValueError(f"offsets are on {offsets.device} but padded on {padded.device}")
    batch_size = offsets.shape[0] - 1
    if padded.shape[0] != batch_size:
        raise ValueError(f"padded has batch size {padded.shape[0]} but offsets describe {batch_size} sequences")
    if validate:
        validate_offsets(offsets, total)
        lengths = offsets[1:] - offsets[:-1]
        if batch_size and int(lengths.max()) > padded.shape[1]:
            raise ValueError(f"a sequence has {int(lengths.max())} rows but padded holds only {padded.shape[1]}")
    if total is None:
        total = int(offsets[-1])
    seq, pos = row_coordinates(offsets, total)
    return padded[seq, pos]


# ------------------------------------------------------------------ TorchRec interop
def from_torchrec(jt: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ``torchrec.sparse.jagged_tensor.JaggedTensor`` -> ``(values, int64 offsets)``.

    Weights, if any, are not carried: take ``jt.weights()`` yourself (same offsets).
    """
    torchrec_jt = _require_torchrec().sparse.jagged_tensor
    if not isinstance(jt, torchrec_jt.JaggedTensor):
        raise TypeError(f"expected a torchrec JaggedTensor, got {type(jt).__name__}")
    values = jt.values()
    offsets = jt.offsets().to(torch.int64)  # TorchRec allows int32 offsets
    validate_offsets(offsets, values.shape[0])
    return values, offsets


def to_torchrec(values: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor] = None) -> Any:
    """``(values, offsets)`` -> ``torchrec.sparse.jagged_tensor.JaggedTensor``."""
    torchrec_jt = _require_torchrec().sparse.jagged_tensor
    validate_offsets(offsets, values.shape[0])
    if weights is not None and weights.shape[0] != values.shape[0]:
        raise ValueError(f"weights have {weights.shape[0]} rows but values have {values.shape[0]}")
    return torchrec_jt.JaggedTensor(values=values, offsets=offsets, weights=weights)


def _require_torchrec() -> Any:
    from gauss_plugins._optional import require

    require("torchrec", "torchrec", "TorchRec JaggedTensor conversion")
    import torchrec.sparse.jagged_tensor  # noqa: F401  (the submodule, now that torchrec imports)
    import torchrec

    return torchrec
