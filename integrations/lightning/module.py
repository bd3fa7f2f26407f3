"""LightningModule and DataModule of the sequential retrieval model.

:class:`RetrievalModule` trains a :class:`~gauss_plugins.models.SequentialRetrievalModel` with
the paper's sampled softmax: dense parameters with AdamW (Lightning's optimizer), item
embeddings with the dynamic table's fused sparse optimizer, stepped right after the dense
one in :meth:`RetrievalModule.optimizer_step` (so both see the gradients of the same batch).
Validation and test rank the full corpus minus each user's history
(:mod:`gauss_plugins.models.metrics`) and log ``val/hr@10`` ... / ``test/ndcg@200``.

:class:`SequenceDataModule` serves leave-one-out (epoch mode) or one streaming window.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from gauss_plugins.models.metrics import DEFAULT_KS, RetrievalMetrics
from gauss_plugins.train.batching import collate_eval, collate_train

__all__ = ["RetrievalModule", "SequenceDataModule"]


class RetrievalModule(pl.LightningModule):
    """Training / evaluation steps around a retrieval model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, betas=(0.9, 0.98), weight_decay: float = 0.0,
                 ks=DEFAULT_KS, shared_negatives: bool = False) -> None:
        super().__init__()
        self.model = model
        self.shared_negatives = bool(shared_negatives)
        self._negatives_generator: Optional[torch.Generator] = None
        self.lr = float(lr)
        self.betas = tuple(betas)
        self.weight_decay = float(weight_decay)
        self.ks = tuple(ks)
        self._metrics = {"val": RetrievalMetrics(self.ks), "test": RetrievalMetrics(self.ks)}
        self._corpus: Optional[torch.Tensor] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._epoch_losses: List[float] = []
        # Per-epoch records (epoch, train/loss, val/...) for the plot and the JSON history.
        self.history: List[Dict[str, float]] = []
        self.last_eval: Dict[str, Dict[str, float]] = {}

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        # Created once and reused: streaming mode calls fit() once per window, and the AdamW
        # moments must carry over from window to window like the table's sparse Adam state.
        if self._optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return self._optimizer

    def _draw_negatives(self, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """``[R]`` ids shared by the batch (``shared_negatives``), else None: the model draws
        one row per position itself."""
        if not self.shared_negatives:
            return None
        return torch.randint(1, self.model.num_items + 1, (self.model.num_negatives,), device=targets.device)

    # Under GaussStrategy (integrations/lightning/strategy.py): the embedding cache must know
    # every item a step reads before the step, so negatives are drawn as the batch leaves the
    # loader, and the batch's ids are its inputs, targets and negatives.
    def gauss_prepare_batch(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        # A generator of their own: how far ahead the cache pulls batches (which depends on its
        # budget) must not move the random stream dropout draws from during the steps.
        if self._negatives_generator is None:
            seed = (torch.initial_seed() + 1_000_003 * (1 + self.global_rank)) % (2 ** 63)
            self._negatives_generator = torch.Generator().manual_seed(seed)
        targets = batch["targets"]
        size = (self.model.num_negatives,) if self.shared_negatives else \
            (int((targets > 0).sum()), self.model.num_negatives)
        batch["negatives"] = torch.randint(1, self.model.num_items + 1, size, generator=self._negatives_generator)
        return batch

    def gauss_cache_ids(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        table = getattr(self.model.item_embeddings, "table", None)
        if table is None:
            raise ValueError("the cache serves the dynamic item table; this model has static item embeddings")
        ids = torch.cat([batch["ids"].reshape(-1), batch["targets"].reshape(-1), batch["negatives"].reshape(-1)])
        return {table.name: ids[ids > 0]}  # 0 is padding: it never gets a row

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        negatives = batch["negatives"] if "negatives" in batch else self._draw_negatives(batch["targets"])
        out = self.model.sampled_softmax_loss(batch["ids"], batch["lengths"], batch["targets"], batch["timestamps"],
                                              negatives=negatives)
        loss = out["loss"]
        self._epoch_losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["ids"].shape[0])
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # The closure runs forward + backward; the item rows' gradients then sit in the table
        # and its fused optimizer applies them (a no-op for static embeddings).
        optimizer.step(closure=optimizer_closure)
        self.model.item_embeddings.sparse_step()
        self.model.item_embeddings.sparse_zero_grad()

    def on_train_epoch_start(self) -> None:
        self._epoch_losses = []

    def _record(self, epoch: int) -> Dict[str, float]:
        """The history record of ``epoch`` (1-based), created on first use. Lightning runs the
        epoch's validation before ``on_train_epoch_end``, so either may come first."""
        for record in reversed(self.history):
            if record["epoch"] == epoch:
                return record
        record = {"epoch": epoch}
        self.history.append(record)
        return record

    def on_train_epoch_end(self) -> None:
        # A step skipped for a NaN/inf gradient is reported by the next sparse step; the
        # epoch's last one would otherwise go unreported (one host sync an epoch).
        self.model.item_embeddings.sparse_check_finite()
        if self._epoch_losses:
            self._record(int(self.current_epoch) + 1)["train/loss"] = float(np.mean(self._epoch_losses))

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self, stage: str) -> None:
        self._metrics[stage].reset()
        with torch.no_grad():
            self._corpus = self.model.corpus_vectors()

    def _eval_step(self, stage: str, batch: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            queries = self.model.query(batch["ids"], batch["lengths"], batch["timestamps"])
            scores = self.model.score_corpus(queries, self._corpus)
            self._metrics[stage].update(scores, batch["target"], batch["exclude"])

    def _eval_end(self, stage: str) -> Dict[str, float]:
        self._corpus = None
        if self._metrics[stage].count == 0:
            return {}
        values = {f"{stage}/{k}": v for k, v in self._metrics[stage].compute().items()}
        self.last_eval[stage] = values
        if not self.trainer.sanity_checking:
            shown = (f"{stage}/hr@10", f"{stage}/ndcg@10")  # on the progress bar; the rest only logged
            self.log_dict({k: v for k, v in values.items() if k not in shown}, prog_bar=False)
            self.log_dict({k: values[k] for k in shown}, prog_bar=True)
            if stage == "val" and self.trainer.state.fn == "fit":
                record = self._record(int(self.current_epoch) + 1)
                record.update(values)
                if self._epoch_losses:  # the loss of the epoch just trained, known already
                    record["train/loss"] = float(np.mean(self._epoch_losses))
        return values

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")


class SequenceDataModule(pl.LightningDataModule):
    """Serves given datasets: ``train`` (TrainExamples) and ``val`` / ``test`` (HeldOutExamples)."""

    def __init__(self, train: Optional[Dataset], val: Optional[Dataset], test: Optional[Dataset],
                 batch_size: int, eval_batch_size: int, seed: int) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("no training data in this DataModule")
        # A seeded generator: the shuffling order is part of the run's reproducibility.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=collate_train,
                          generator=generator, num_workers=0)

    def val_dataloader(self) -> Any:
        if self.val_set is None:
            return []
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise RuntimeError("no test data in this DataModule")
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        # Every rank of a multi-process run evaluates every user: a one-replica
        # DistributedSampler keeps Lightning from splitting (and padding) the set, so the
        # metrics are exact and the same on every rank (model selection and early stopping agree).
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=collate_eval)
