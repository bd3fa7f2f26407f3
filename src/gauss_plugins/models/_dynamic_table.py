"""Build the item table of the retrieval model on :mod:`gauss_plugins.embedding`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def build(num_items: int, dim: int, lr: float, betas: Tuple[float, float], weight_decay: float,
          init_std: float, device: Optional[torch.device] = None):
    """A :class:`DynamicEmbeddingTable` for item ids and its :class:`SparseOptimizer`.

    * Rows start as N(0, init_std) from the table's deterministic, id-keyed initialiser. The
      paper code truncates that normal at 2 std (its ``truncated_normal``: std 0.88 * 0.02); the
      table has no truncated initialiser, and a callable one would lose the id-keyed
      re-creation of evicted rows, so rows here start ~14% wider. The table seed is fixed (0): an
      item's initial vector depends on its id only, the same in every replica and every run;
      training seeds vary the dense initialisation, dropout, negatives and batch order.
    * Optimizer: the table's fused sparse Adam with the dense AdamW's lr, betas, eps (1e-8,
      torch's default) and weight decay. It is the "lazy" Adam of sparse embedding libraries:
      a row's moments and bias-correction step advance only on batches that touch the row,
      where dense AdamW also decays the moments of untouched rows (and keeps moving them on
      momentum). This is the usual behaviour of sparse/fused embedding optimizers.
    * Capacity starts at the corpus size (no growth during a run whose corpus is known) and
      may grow to 16M rows for streams that bring new ids.
    """
    from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig, SparseOptimizer

    opt = OptimizerConfig(name="adam", lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]), eps=1e-8,
                          weight_decay=float(weight_decay))
    config = DynamicTableConfig(name="items", dim=int(dim), initial_capacity=max(1024, int(num_items) + 1),
                                initializer="normal", init_std=float(init_std), optimizer=opt,
                                device=device if device is not None else "cpu")
    table = DynamicEmbeddingTable(config)
    return table, SparseOptimizer(table)
