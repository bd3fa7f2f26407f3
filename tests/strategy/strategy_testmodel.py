"""A small model for the strategy's tests: one dynamic table, one dense layer, a
deterministic loss (no sampling, no dropout), so W replicas on a global batch and one
process on it must agree to float rounding."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig, OptimizerConfig

DIM = 8


class IdDataset(Dataset):
    """``n`` examples of ``seq`` ids from ``1..num_ids`` (skewed, fixed seed) and a target."""

    def __init__(self, n: int = 64, seq: int = 6, num_ids: int = 120, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.rand(n, seq, generator=g) ** 2 * num_ids).long() + 1
        self.y = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"ids": self.ids[i], "y": self.y[i]}


class TinyModule(pl.LightningModule):
    def __init__(self, optimizer: str = "adam", lr: float = 0.05, dump_dir: Optional[str] = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = DynamicEmbeddingTable(DynamicTableConfig(name="items", dim=DIM, initializer="normal",
                                                              init_std=0.1, optimizer=OptimizerConfig(name=optimizer, lr=lr)))
        self.dense = nn.Linear(DIM, 1)
        self.lr = lr
        self.dump_dir = dump_dir
        self.losses: List[float] = []
        self.val_sums: List[torch.Tensor] = []

    def gauss_cache_ids(self, batch):
        return {"items": batch["ids"].reshape(-1)}

    def training_step(self, batch, batch_idx):
        emb = self.table(batch["ids"])                  # [B, S, D]
        pred = self.dense(torch.tanh(emb).mean(1)).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        # Eval reads every id the data has: rows the cache holds and rows waiting in the store.
        self.val_sums.append(self.table.lookup(torch.arange(0, 122)).sum(1).clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.dense.parameters(), lr=self.lr)

    def dump(self) -> None:
        """Write this rank's table (every row it holds) and dense weights to ``dump_dir``.
        Called after fit, once the strategy has installed every trained row (gather_on_end):
        the rows a rank caches while training are its own choice (a partitioned cache holds
        only the rows it owns), the trained table is not."""
        if self.dump_dir is not None:  # every rank's final state, to compare replicas
            from gauss_plugins.serialization import save_tensors

            keys, rows = self.table.index.keys_and_rows()
            order = torch.argsort(keys)
            tensors = {"ids": keys[order].contiguous(), "rows": self.table.weight[rows[order]].contiguous(),
                       "w": self.dense.weight.detach().clone(), "b": self.dense.bias.detach().clone()}
            save_tensors(os.path.join(self.dump_dir, f"rank{self.global_rank}.safetensors"), tensors, {})


def table_rows(table: DynamicEmbeddingTable):
    keys, rows = table.index.keys_and_rows()
    order = torch.argsort(keys)
    return keys[order], table.weight[rows[order]].clone()


def loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
