"""Fit the strategy tests' TinyModule under GaussStrategy with ``--world`` CPU processes
(Lightning's popen launcher starts this script once per extra process) and write each
rank's final rows and weights to ``--out``. Run by test_gauss_strategy.py."""
from __future__ import annotations

import argparse
import logging
import os
import warnings

import pytorch_lightning as pl
import torch

from strategy_testmodel import IdDataset, TinyModule, loader

from gauss_integrations.lightning.strategy import GaussStrategy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--replicated", action="store_true", help="every replica caches the global batch's rows")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    model = TinyModule(dump_dir=args.out)
    strategy = GaussStrategy(budget_rows=args.budget, window=3, partitioned=not args.replicated,
                             store_dir=os.path.join(args.out, f"store{args.world}"))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.world, strategy=strategy,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, loader(IdDataset(), args.global_batch // args.world))
    model.dump()


if __name__ == "__main__":
    main()
