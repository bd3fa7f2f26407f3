"""Swap a TorchRec DLRM's embedding tables for dynamic ones in one call, then train it.

    python examples/torchrec_dlrm_swap.py [--steps 50] [--batch 512]

Needs the torchrec extra. The model is TorchRec's own ``torchrec.models.dlrm.DLRM`` built
with an ordinary ``EmbeddingBagCollection``; ``swap_dynamic_embeddings`` replaces that
collection by a ``DynamicEmbeddingBagCollection`` with the same configs. The batches carry
*raw* 64-bit ids (hashes of user/item/category strings, say), which a static table could
only take modulo its size; the dynamic tables give every id its own row. Dense layers are
trained by Adam, the tables by the fused row-wise Adagrad whose state lives in the rows.

The synthetic task: a click is likely when a user's hidden taste matches the item's hidden
category, so the loss can only fall if the tables learn the ids.

One process only for now: the dynamic tables are not synchronised across ranks, so training
them under DDP or ``DistributedModelParallel`` at world size > 1 raises
``ReplicatedTableError`` instead of letting each rank train its own diverging table.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from gauss_integrations.torchrec import dynamic_tables, swap_dynamic_embeddings
from gauss_plugins.embedding import SparseOptimizer
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

FEATURES = ["user", "item", "category"]
DIM = 16


def build_dlrm() -> DLRM:
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=100_000, feature_names=[f])
        for f in FEATURES
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables),
        dense_in_features=8,
        dense_arch_layer_sizes=[32, DIM],
        over_arch_layer_sizes=[32, 1],
    )


class SyntheticClicks:
    """Users and items with hidden binary tastes; raw ids are scattered 64-bit values."""

    def __init__(self, n_users: int = 2000, n_items: int = 500, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        # Raw ids: random int64 values over the whole range, negatives included.
        self.user_ids = torch.randint(-(2**62), 2**62, (n_users,), generator=self.g)
        self.item_ids = torch.randint(-(2**62), 2**62, (n_items,), generator=self.g)
        self.user_taste = torch.randint(0, 2, (n_users,), generator=self.g)
        self.item_cat = torch.randint(0, 8, (n_items,), generator=self.g)

    def batch(self, size: int):
        u = torch.randint(0, self.user_ids.numel(), (size,), generator=self.g)
        i = torch.randint(0, self.item_ids.numel(), (size,), generator=self.g)
        cat = self.item_cat[i]
        match = (cat % 2) == self.user_taste[u]
        labels = torch.bernoulli(torch.where(match, 0.9, 0.1), generator=self.g)
        # One id per bag for user and item, and the category id (raw, offset far away).
        values = torch.stack([self.user_ids[u], self.item_ids[i], cat * 7_919 + 2**50]).reshape(-1)
        kjt = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=torch.ones(3 * size, dtype=torch.int64))
        dense = torch.randn(size, 8, generator=self.g)
        return dense, kjt, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = swap_dynamic_embeddings(
        build_dlrm(),
        # Every table: row-wise Adagrad state in the row; LRU eviction when a table is full.
        default_options={"optimizer": {"name": "rowwise_adagrad", "lr": 0.2}, "eviction": "lru"},
    )
    print(model.sparse_arch.embedding_bag_collection)
    dense_opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # dense layers only: tables hold no Parameters
    # Every dynamic table, with its configured rule; keywords override single options and keep
    # the rest (and the per-row state), e.g. SparseOptimizer(model, lr=0.1).
    sparse_opt = SparseOptimizer(model)
    data = SyntheticClicks()
    loss_fn = nn.BCEWithLogitsLoss()

    for step in range(1, args.steps + 1):
        dense, kjt, labels = data.batch(args.batch)
        loss = loss_fn(model(dense, kjt).squeeze(1), labels)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        sparse_opt.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    sizes = {name.rsplit(".", 1)[-1]: len(t) for name, t in dynamic_tables(model).items()}
    print(f"rows per table: {sizes}")

    # Eval never inserts rows: ids never seen in training read zeros (the tables' default;
    # the option eval_unknown="init" or "error" chooses otherwise).
    model.eval()
    with torch.no_grad():
        dense, kjt, labels = data.batch(args.batch)
        accuracy = ((model(dense, kjt).squeeze(1) > 0).float() == labels).float().mean().item()
    print(f"eval accuracy on a fresh batch: {accuracy:.3f}")


if __name__ == "__main__":
    main()
