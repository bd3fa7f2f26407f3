"""Checking a KeyedJaggedTensor before it reaches a dynamic table, and grouping it by table.

A dynamic table inserts rows on lookup, so a malformed batch must be rejected *before* the
first table is touched: a KJT whose lengths do not cover its values would otherwise shift
ids between bags and features and silently create rows for the wrong ids. Every check of a
batch is done here, up front, with one host synchronisation for all the scalar checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

_ID_DTYPES = (torch.int64, torch.int32)


class InvalidFeaturesError(ValueError):
    """A KeyedJaggedTensor that a dynamic embedding collection cannot look up.

    Raised before any table is read or written, so the tables are unchanged.
    """


def check_features(
    features: object,
    feature_names: Sequence[str],
    device: torch.device,
    *,
    weighted: bool,
    allow_unknown_features: bool,
    owner: str,
) -> KeyedJaggedTensor:
    """Validate ``features`` for a collection reading ``feature_names`` on ``device``.

    Returns the KJT (a TensorDict is converted, as TorchRec's modules do). Raises
    :class:`InvalidFeaturesError` (or ``TypeError`` for wrong dtypes) naming what is wrong
    and how to fix it.
    """
    if not isinstance(features, KeyedJaggedTensor):
        converted = maybe_td_to_kjt(features, None)  # TorchRec modules accept a TensorDict too
        if not isinstance(converted, KeyedJaggedTensor):
            raise TypeError(f"{owner} expects a KeyedJaggedTensor, got {type(features).__name__}")
        features = converted
    kjt: KeyedJaggedTensor = features
    keys = list(kjt.keys())

    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise InvalidFeaturesError(
            f"{owner}: the KeyedJaggedTensor lacks feature(s) {missing} read by its tables; "
            f"it has keys {keys}, the tables read {list(feature_names)}"
        )
    if not allow_unknown_features:
        known = set(feature_names)
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise InvalidFeaturesError(
                f"{owner}: the KeyedJaggedTensor has feature(s) {unknown} that no table reads "
                f"(tables read {list(feature_names)}). Fix the feature names, or pass "
                f"allow_unknown_features=True if this KJT deliberately carries features for other modules"
            )

    values = kjt.values()
    if values.dtype not in _ID_DTYPES:
        raise TypeError(
            f"{owner}: ids must be an int64 (or int32) tensor, got {values.dtype}. Build the "
            f"KeyedJaggedTensor from the raw integer ids; floats cannot hold ids exactly"
        )
    if values.dim() != 1:
        raise InvalidFeaturesError(f"{owner}: KJT values must be 1-D, got shape {tuple(values.shape)}")
    _check_device(values, device, "values", owner)

    lengths = kjt.lengths_or_none()
    offsets = kjt.offsets_or_none()
    for name, t in (("lengths", lengths), ("offsets", offsets)):
        if t is None:
            continue
        if t.dtype not in _ID_DTYPES or t.dim() != 1:
            raise InvalidFeaturesError(
                f"{owner}: KJT {name} must be a 1-D int64/int32 tensor, got {t.dtype} of shape {tuple(t.shape)}"
            )
        _check_device(t, device, name, owner)
    if lengths is None and offsets is None:
        raise InvalidFeaturesError(f"{owner}: the KeyedJaggedTensor has neither lengths nor offsets")

    n_bags = lengths.numel() if lengths is not None else offsets.numel() - 1
    if kjt.variable_stride_per_key():
        expected_bags = sum(kjt.stride_per_key())
        layout = f"sum of stride_per_key {kjt.stride_per_key()}"
    else:
        expected_bags = len(keys) * kjt.stride()
        layout = f"{len(keys)} keys x stride {kjt.stride()}"
    if n_bags != expected_bags:
        raise InvalidFeaturesError(
            f"{owner}: the KJT has {n_bags} bags (lengths) but its layout needs {expected_bags} ({layout})"
        )

    weights = kjt.weights_or_none() if weighted else None
    if weighted:
        if weights is None:
            raise InvalidFeaturesError(
                f"{owner} is weighted (is_weighted=True) but the KeyedJaggedTensor has no weights"
            )
        if not weights.is_floating_point() or weights.shape != values.shape:
            raise InvalidFeaturesError(
                f"{owner}: KJT weights must be floating point with one weight per id "
                f"(shape {tuple(values.shape)}), got {weights.dtype} of shape {tuple(weights.shape)}"
            )
        _check_device(weights, device, "weights", owner)

    # All data-dependent checks in one tensor, read back with one synchronisation. Messages
    # are built only on failure (they may read more values, which is fine on the error path).
    n = values.numel()
    checks: List[Tuple[torch.Tensor, Callable[[], str]]] = []
    if lengths is not None:
        checks.append(((lengths < 0).any(), lambda: "some lengths are negative"))
        checks.append((lengths.sum() != n, lambda: f"lengths sum to {int(lengths.sum())} but there are {n} values"))
    if offsets is not None:
        diffs = offsets[1:] - offsets[:-1]
        # Slices + sum rather than indexing, so an empty offsets tensor reads 0, not an IndexError.
        checks.append((offsets[:1].sum() != 0, lambda: "offsets do not start at 0"))
        checks.append((offsets[-1:].sum() != n, lambda: f"offsets end at {int(offsets[-1:].sum())} but there are {n} values"))
        checks.append(((diffs < 0).any(), lambda: "offsets decrease"))
        if lengths is not None:
            disagree = (diffs != lengths).any() if diffs.numel() == lengths.numel() else torch.tensor(True)
            checks.append((disagree, lambda: "offsets disagree with lengths"))
    if weights is not None:
        checks.append((~torch.isfinite(weights).all(), lambda: "weights contain NaN or infinity"))
    if checks:
        failed = torch.stack([c.to(device=values.device) for c, _ in checks]).tolist()
        problems = [message() for (_, message), bad in zip(checks, failed) if bad]
        if problems:
            raise InvalidFeaturesError(
                f"{owner}: malformed KeyedJaggedTensor: {'; '.join(problems)}. No table was changed"
            )
    return kjt


def _check_device(t: torch.Tensor, device: torch.device, what: str, owner: str) -> None:
    if not _same_device(t.device, device):
        raise InvalidFeaturesError(
            f"{owner}: KJT {what} are on {t.device} but the tables are on {device}; "
            f"move the batch with kjt.to({str(device)!r})"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when the current device is 0.
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


@dataclass
class TableBatch:
    """The ids one table reads in a batch: the features sharing it, concatenated.

    One lookup per table (not per feature) lets the table deduplicate ids across the
    features that share it and apply one fused update per touched row.
    """

    ids: torch.Tensor  # int64, all features of the table back to back
    offsets: torch.Tensor  # int64 bag offsets over ``ids``, len = total bags + 1
    weights: Optional[torch.Tensor]  # per-id weights, or None
    bags_per_feature: List[int]  # number of bags (batch size) of each feature
    ids_per_feature: List[int]  # number of ids of each feature
    lengths_per_feature: List[torch.Tensor]  # each feature's lengths, for EC outputs
    values_per_feature: List[torch.Tensor]  # each feature's raw ids, for EC need_indices


def group_by_table(
    kjt: KeyedJaggedTensor, feature_names_by_table: Sequence[Sequence[str]], *, weighted: bool
) -> List[TableBatch]:
    """Split a checked KJT into one :class:`TableBatch` per table, in table order."""
    lengths = kjt.lengths()
    if lengths.numel() == 0:
        # A batch of size 0: TorchRec's to_dict() cannot split it; every feature is empty.
        w = kjt.weights_or_none()
        empty = JaggedTensor(values=kjt.values()[:0], lengths=lengths, weights=w[:0] if w is not None else None)
        jt: Dict[str, JaggedTensor] = {name: empty for name in kjt.keys()}
    else:
        jt = kjt.to_dict()
    batches = []
    for names in feature_names_by_table:
        parts = [jt[name] for name in names]
        values = [p.values() for p in parts]
        lengths = [p.lengths() for p in parts]
        ids = values[0] if len(values) == 1 else torch.cat(values)
        all_lengths = lengths[0] if len(lengths) == 1 else torch.cat(lengths)
        weights = None
        if weighted:
            w = [p.weights() for p in parts]
            weights = w[0] if len(w) == 1 else torch.cat(w)
        batches.append(
            TableBatch(
                ids=ids.to(torch.int64),
                offsets=torch.ops.fbgemm.asynchronous_complete_cumsum(all_lengths.to(torch.int64)),
                weights=weights,
                bags_per_feature=[int(l.numel()) for l in lengths],
                ids_per_feature=[int(v.numel()) for v in values],
                lengths_per_feature=lengths,
                values_per_feature=values,
            )
        )
    return batches
