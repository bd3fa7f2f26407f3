"""Per-user chronological event sequences, stored jagged (one flat array plus offsets).

Every loader returns a :class:`UserSequences`: user ``u``'s items are
``items[offsets[u]:offsets[u + 1]]`` in time order, with ``timestamps`` alongside when the
source has them. Item ids are kept exactly as the source spells them (raw ids, no remapping):
the dynamic embedding tables key rows by raw id, and ``0`` stays free as padding because
every supported source numbers items from 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

__all__ = ["UserSequences", "from_events"]


@dataclass(frozen=True)
class UserSequences:
    """Chronological item sequences of many users, jagged.

    ``user_ids[u]`` is the source's id of the ``u``-th user; ``offsets`` has one entry more
    than there are users; ``items`` (int64, all ``>= 1``) and ``timestamps`` (int64 seconds,
    or ``None`` when the source has no times) are flat and aligned.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: Optional[np.ndarray] = None
    name: str = ""
    info: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) != len(self.user_ids) + 1:
            raise ValueError(f"offsets must have len(user_ids) + 1 = {len(self.user_ids) + 1} entries, got {self.offsets.shape}")
        if len(self.offsets) and (self.offsets[0] != 0 or self.offsets[-1] != len(self.items)):
            raise ValueError("offsets must start at 0 and end at len(items)")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        if self.timestamps is not None and len(self.timestamps) != len(self.items):
            raise ValueError(f"timestamps ({len(self.timestamps)}) and items ({len(self.items)}) differ in length")
        if len(self.items) and int(self.items.min()) < 1:
            raise ValueError("item ids must be >= 1 (0 is the padding id)")

    # ------------------------------------------------------------------ sizes
    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def max_item_id(self) -> int:
        """The largest item id: the corpus ranked at evaluation is ``1..max_item_id``."""
        return int(self.items.max()) if len(self.items) else 0

    def item_ids(self) -> np.ndarray:
        """The distinct item ids that occur, sorted."""
        return np.unique(self.items)

    def __len__(self) -> int:
        return self.num_users

    # ------------------------------------------------------------------ access
    def sequence(self, u: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Items and timestamps (or ``None``) of the ``u``-th user, oldest first."""
        lo, hi = int(self.offsets[u]), int(self.offsets[u + 1])
        ts = self.timestamps[lo:hi] if self.timestamps is not None else None
        return self.items[lo:hi], ts

    def __iter__(self) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        for u in range(self.num_users):
            yield self.sequence(u)

    def describe(self) -> str:
        lens = self.lengths
        span = ", no timestamps (order only)" if self.timestamps is None else ""
        if self.timestamps is not None and len(self.timestamps):
            span = f", time {int(self.timestamps.min())}..{int(self.timestamps.max())}"
        return (f"{self.name or 'sequences'}: {self.num_users} users, {len(self.item_ids())} items "
                f"(max id {self.max_item_id}), {self.num_events} events, length "
                f"min {int(lens.min()) if len(lens) else 0} / median {int(np.median(lens)) if len(lens) else 0} / "
                f"max {int(lens.max()) if len(lens) else 0}{span}")


def from_events(users: np.ndarray, items: np.ndarray, timestamps: Optional[np.ndarray], name: str = "",
                info: Optional[Dict[str, str]] = None) -> UserSequences:
    """Group flat ``(user, item, timestamp)`` events into per-user chronological sequences.

    Users are ordered by id; within a user events are ordered by timestamp, and events with
    equal timestamps keep their order in the source (a stable sort), so loading is
    deterministic. Without timestamps the source order is the chronological order.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if users.shape != items.shape:
        raise ValueError(f"users {users.shape} and items {items.shape} differ in shape")
    if timestamps is not None:
        timestamps = np.asarray(timestamps, dtype=np.int64)
        if timestamps.shape != items.shape:
            raise ValueError(f"timestamps {timestamps.shape} and items {items.shape} differ in shape")
        # lexsort sorts by the last key first; it is stable, so ties keep the source order.
        order = np.lexsort((timestamps, users))
    else:
        order = np.argsort(users, kind="stable")
    users_sorted = users[order]
    uniq, counts = np.unique(users_sorted, return_counts=True)
    offsets = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return UserSequences(
        user_ids=uniq,
        offsets=offsets,
        items=items[order],
        timestamps=timestamps[order] if timestamps is not None else None,
        name=name,
        info=dict(info or {}),
    )
