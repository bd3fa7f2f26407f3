"""Where the retrieval model's item vectors come from.

* :class:`DynamicItemEmbeddings` (the default): rows of a
  :class:`gauss_plugins.embedding.DynamicEmbeddingTable`, keyed by the raw item id (no id
  remapping, new ids get rows on first sight), trained by the table's fused sparse
  optimizer. The dense parameters of the model are trained by AdamW; the table's optimizer
  is its fused Adam, configured with the same learning rate and betas (see
  :func:`build_item_embeddings`).
* :class:`StaticItemEmbeddings` (``item_embedding: static``): a plain ``nn.Embedding`` over
  ids ``0..num_items``, trained by the dense AdamW. Offered as an explicit choice for
  comparisons; never chosen silently.

Both return zeros for the padding id 0, draw new rows with standard deviation 0.02 (the
paper's ML-1M initialisation is that normal truncated at 2 std: the static table draws exactly
that; the dynamic table's id-keyed initialiser draws the untruncated normal), and checkpoint through ``state_dict()`` (the dynamic
table exports its keys, rows and optimizer state there).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["truncated_normal_", "ItemEmbeddings", "StaticItemEmbeddings", "DynamicItemEmbeddings", "build_item_embeddings"]

INIT_STD = 0.02


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std) redrawn outside two standard deviations: the paper code's ``truncated_normal``.
    (``nn.init.trunc_normal_`` cuts at +-2 in absolute value, which at std 0.02 or 0.14 cuts
    nothing.)"""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class ItemEmbeddings(nn.Module):
    """``forward(ids) -> vectors``: ids of any shape (0 = padding -> zeros) to ``[..., dim]``."""

    kind = "abstract"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)

    def sparse_step(self) -> None:
        """Apply the sparse optimizer to the rows touched since the last step (no-op when the
        embeddings are dense parameters trained by the dense optimizer)."""

    def sparse_zero_grad(self) -> None:
        """Drop the accumulated sparse gradients."""

    def sparse_check_finite(self) -> None:
        """Raise FloatingPointError if an earlier sparse step was skipped for a NaN/inf
        gradient that no later step has reported yet (sync-free steps on CUDA check on the
        device and report late). A host sync: call it where one is free, e.g. at epoch end."""



class StaticItemEmbeddings(ItemEmbeddings):
    """A dense ``nn.Embedding`` over ids ``0..num_items`` (0 is padding)."""

    kind = "static"

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__(dim)
        self.num_items = int(num_items)
        self.weight = nn.Parameter(torch.empty(self.num_items + 1, self.dim))
        truncated_normal_(self.weight, std=INIT_STD)
        with torch.no_grad():
            self.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel():
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())  # one host sync, not two
            if lo < 0 or hi > self.num_items:
                raise ValueError(f"item ids must be in 0..{self.num_items} for static embeddings, got "
                                 f"{lo}..{hi}; the dynamic table takes any id")
        out = nn.functional.embedding(ids, self.weight)
        return out * (ids > 0).unsqueeze(-1).to(out.dtype)



class DynamicItemEmbeddings(ItemEmbeddings):
    """Item vectors from a dynamic embedding table, keyed by raw item id."""

    kind = "dynamic"

    def __init__(self, table: nn.Module, optimizer: object, dim: int) -> None:
        super().__init__(dim)
        if getattr(table.config, "default", "zeros") != "zeros":
            raise ValueError(f"DynamicItemEmbeddings needs a table with default='zeros' (padding reads the default "
                             f"row, which must stay zero and untrained), got default={table.config.default!r}")
        self.table = table
        # The sparse optimizer is not an nn.Module; keep it out of the module tree.
        self._sparse_optimizer = optimizer

    @property
    def sparse_optimizer(self) -> object:
        return self._sparse_optimizer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Padding (id <= 0) is masked, not compacted away: it reads the zero default row,
        # never gets a row, and its gradient is dropped by the table's step. One probe of
        # every position costs less on a GPU than unique + compaction (three host syncs and a
        # sort) and keeps the backward a plain per-position record (no index backward).
        return self.table.lookup(ids, valid=ids > 0)

    def sparse_step(self) -> None:
        self._sparse_optimizer.step()

    def sparse_zero_grad(self) -> None:
        self._sparse_optimizer.zero_grad()

    def sparse_check_finite(self) -> None:
        self._sparse_optimizer.check_finite()


def build_item_embeddings(kind: str, num_items: int, dim: int, lr: float, betas: Tuple[float, float],
                          weight_decay: float = 0.0, device: Optional[torch.device] = None) -> ItemEmbeddings:
    """``kind`` is ``"dynamic"`` (the default of every config) or ``"static"``."""
    if kind == "static":
        return StaticItemEmbeddings(num_items, dim)
    if kind != "dynamic":
        raise ValueError(f"item_embedding must be 'dynamic' or 'static', got {kind!r}")
    from gauss_plugins.models import _dynamic_table

    table, optimizer = _dynamic_table.build(num_items=num_items, dim=dim, lr=lr, betas=betas,
                                            weight_decay=weight_decay, init_std=INIT_STD, device=device)
    return DynamicItemEmbeddings(table, optimizer, dim)
