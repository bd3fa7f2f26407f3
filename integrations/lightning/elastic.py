"""``GaussStrategy(elastic=True)``: a Lightning ``fit`` trained by elastic replicas on Ray.

::

    trainer = pl.Trainer(strategy=GaussStrategy(elastic=True), accelerator="cpu", devices=1, max_epochs=3)
    trainer = pl.Trainer(strategy=GaussStrategy(elastic=ElasticConfig(num_workers=3, min_workers=2)), ...)
    trainer.fit(module, datamodule)   # replicas train; a SIGKILLed one is replaced, fit goes on

How it plugs in: Lightning hands ``fit`` to the strategy's *launcher* (``_configure_launcher``;
the same extension point Lightning's ``ddp_spawn`` and ray_lightning use to start workers).
:class:`ElasticLauncher` runs ``fit`` as an :class:`~gauss_integrations.ray.elastic.ElasticTrainer`
job instead of Lightning's in-process loop, because that loop is bound to one process group
for the whole fit and cannot re-form it when a peer dies. Each replica is a copy of the
LightningModule; a step calls the module's own hooks:

* ``configure_optimizers`` builds each replica's optimizer (one optimizer, no LR scheduler);
* ``training_step(batch, step)`` gives the loss; the launcher all-reduces the dense gradients
  over the current elastic group (that is where a dead peer is noticed and the step abandoned);
* ``optimizer_step(epoch, step, optimizer)`` applies the averaged gradients (so a module that
  steps more than its optimizer there still does).

**Data.** The training DataLoader's dataset (map-style, with ``len``) becomes a stream
addressed by global sample index: index ``i`` is position ``i % len`` of epoch ``i // len``
(shuffled per epoch with a permutation seeded by the DataLoader's generator, when it shuffles),
collated by the DataLoader's ``collate_fn``; each replica trains ``batch_size`` samples per step
(Lightning's per-device batch). The coordinator assigns the indices, so the exact-once guarantee
of :mod:`gauss_plugins.elastic` holds for the fit: every sample of the ``max_epochs`` epochs is
trained once, none twice, whatever dies. ``fit`` ends at the first step boundary at or past
``max_epochs * len(dataset)`` samples, or after ``max_steps`` steps when that is set.

**After fit** the driver's module and optimizer hold rank 0's trained state (the fetch is
checked against the committed step), ``trainer.global_step`` is the committed step count and
:attr:`ElasticLauncher.result` has the job's status (steps, losses, recoveries, joins) and
sample ledger summary. ``validate`` / ``test`` / ``predict`` run in the driver on those weights.

**Not run inside an elastic fit** (refused with a message, or stated here): validation loops,
callbacks and loggers of the driver's trainer (the replicas log nothing), LR schedulers,
gradient accumulation, manual optimisation, ``ckpt_path`` (resume from a disaster checkpoint
with ``ElasticConfig(checkpoint_dir=...)`` instead).

**Dynamic embedding tables** train as in :mod:`gauss_plugins.elastic.rows`: each table is backed
by one ``ShardedTierPS`` of the job (under the strategy's ``store_dir``, else a temporary folder),
the ids a step looks up come from the strategy's ``ids_fn`` or the module's ``gauss_cache_ids``,
every replica applies the group-averaged row update, and rank 0 writes step s's rows after step
s+1's all-reduce (acknowledged when the store's ``put`` returned). After fit the driver's module
holds the whole trained tables (they travel with its state). The lookahead cache (``budget_rows``)
and ``sync_target`` are not used in an elastic fit: every replica holds every row.
"""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, Optional

import torch
from pytorch_lightning.strategies.launchers.launcher import _Launcher
from pytorch_lightning.trainer.states import TrainerFn, TrainerStatus
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from gauss_plugins._optional import require
from gauss_plugins.elastic.rows import check_table

__all__ = ["ElasticLauncher", "LoaderStream", "LightningStep", "elastic_config"]


def elastic_config(elastic: Any) -> Any:
    """The :class:`ElasticConfig` that ``GaussStrategy(elastic=...)`` means: ``True`` (defaults)
    or an ``ElasticConfig``; anything else is refused now, not at ``fit``."""
    require("ray", "ray", feature="GaussStrategy(elastic=True)")
    from gauss_integrations.ray.elastic import ElasticConfig

    if elastic is True:
        return ElasticConfig()
    if isinstance(elastic, ElasticConfig):
        return elastic
    raise TypeError(f"GaussStrategy(elastic=...) takes True or a gauss_integrations.ray.elastic.ElasticConfig, "
                    f"got {type(elastic).__name__}")


class LoaderStream:
    """A map-style dataset as an index-addressable stream (module docstring, **Data**)."""

    def __init__(self, dataset: Any, collate_fn: Callable, shuffle: bool, seed: int) -> None:
        try:
            self.size = len(dataset)
        except TypeError:
            raise TypeError("GaussStrategy(elastic=True) needs a map-style training dataset with len(): the "
                            "coordinator assigns samples by index (an IterableDataset has none)") from None
        if self.size == 0:
            raise ValueError("the training dataset is empty")
        self.dataset, self.collate_fn, self.shuffle, self.seed = dataset, collate_fn, bool(shuffle), int(seed)
        self._perm: Dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        perm = self._perm.get(epoch)
        if perm is None:
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)) \
                if self.shuffle else torch.arange(self.size)
            self._perm = {epoch: perm}  # a step reads at most two epochs; keep the newest only
        return perm

    def positions(self, indices: torch.Tensor) -> torch.Tensor:
        """Dataset positions of global sample indices."""
        out = torch.empty_like(indices)
        for k, i in enumerate(indices.tolist()):
            out[k] = self._order(i // self.size)[i % self.size]
        return out

    def batch(self, indices: torch.Tensor) -> Any:
        return self.collate_fn([self.dataset[int(p)] for p in self.positions(indices)])


def _rebuild_table(config_json: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, str], training: bool) -> Any:
    from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig

    table = DynamicEmbeddingTable(DynamicTableConfig.from_json(config_json))
    table.import_state(tensors, meta)
    return table.train(training)


def _table_pickler():
    import ray.cloudpickle as cloudpickle

    from gauss_plugins.embedding import DynamicEmbeddingTable

    class TablePickler(cloudpickle.Pickler):
        """A dynamic table holds its compiled hash index, which does not pickle: it travels as
        its config and its exported rows (the checkpoint format) and is rebuilt in the replica."""

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, DynamicEmbeddingTable):
                tensors, meta = obj.export_state()
                return _rebuild_table, (obj.config.to_json(), tensors, meta, obj.training)
            return super().reducer_override(obj)

    return TablePickler


def _TablePickler(buf: Any) -> Any:
    return _table_pickler()(buf)


class _ModuleFactory:
    """Builds a replica's module from the driver's module, serialised once (without its trainer):
    replacements started later get the same initial module, not a later state of the driver's."""

    def __init__(self, module: Any) -> None:
        import ray.cloudpickle as cloudpickle

        attached = module._trainer
        module._trainer = None  # the Trainer (loops, loggers) stays in the driver
        try:
            buf = io.BytesIO()
            _TablePickler(buf).dump(module)
            self.blob = buf.getvalue()
        finally:
            module._trainer = attached

    def __call__(self) -> Any:
        import ray.cloudpickle as cloudpickle

        return cloudpickle.loads(self.blob)  # our own driver's bytes, through Ray's own channel


class _ModuleIds:
    """``batch -> {table: ids}`` through the module's ``gauss_cache_ids``, called on a copy of the
    module built in the replica (a bound method would carry the driver's module, tables and all)."""

    def __init__(self, factory: _ModuleFactory) -> None:
        self.factory = factory
        self._module: Any = None

    def __getstate__(self) -> Dict[str, Any]:
        return {"factory": self.factory, "_module": None}

    def __call__(self, batch: Any) -> Dict[str, torch.Tensor]:
        if self._module is None:
            self._module = self.factory()
        return self._module.gauss_cache_ids(batch)


def _single_optimizer(configured: Any) -> torch.optim.Optimizer:
    opt = configured
    if isinstance(opt, (list, tuple)) and len(opt) == 1:
        opt = opt[0]
    if isinstance(opt, dict):
        if opt.get("lr_scheduler") is not None:
            raise ValueError("GaussStrategy(elastic=True) does not step LR schedulers: return only the optimizer "
                             "from configure_optimizers")
        opt = opt.get("optimizer")
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"GaussStrategy(elastic=True) trains with exactly one optimizer; configure_optimizers "
                         f"returned {type(configured).__name__}")
    return opt


def _make_optimizer(module: Any) -> torch.optim.Optimizer:
    return _single_optimizer(module.configure_optimizers())


_make_optimizer.takes_model = True  # type: ignore[attr-defined]


class LightningStep:
    """The elastic worker's loss and update through the module's own hooks."""

    def __init__(self) -> None:
        self._quiet = False

    def __call__(self, module: Any, batch: Any) -> torch.Tensor:
        if not self._quiet:
            # The replica has no Trainer: its self.log calls are dropped (Lightning warns once per
            # call site and says so); the job's losses are in the launcher's result instead.
            warnings.filterwarnings("ignore", message=".*self.log.*")
            self._quiet = True
        module.train()
        out = module.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"training_step must return the loss tensor (or a dict with 'loss'), got "
                            f"{type(out).__name__}")
        return loss

    def apply_step(self, module: Any, optimizer: torch.optim.Optimizer, step: int) -> None:
        # The closure already ran (forward, backward, the elastic all-reduce): the hook applies
        # the averaged gradients, and whatever else the module steps there.
        module.optimizer_step(0, step, optimizer)


class ElasticLauncher(_Launcher):
    """Runs ``Trainer.fit`` as an elastic Ray job (module docstring); other stages run in place."""

    def __init__(self, strategy: Any, config: Any) -> None:
        self.strategy = strategy
        self.config = config
        #: the running ElasticTrainer (set while fit runs: tests and monitors kill / scale through it)
        self.elastic: Any = None
        #: after fit: {"status": ..., "samples": ..., "lost": ..., "duplicated": ..., "fit_s": ...}
        self.result: Optional[dict] = None

    @property
    def is_interactive_compatible(self) -> bool:
        return True  # workers are Ray actors, not forks of the driver

    def kill(self, signum: Any) -> None:
        if self.elastic is not None:
            self.elastic.shutdown()

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return function(*args, **kwargs)
        return self._fit(trainer, *args, **kwargs)

    # ---------------------------------------------------------------------------------- fit
    def _fit(self, trainer: Any, model: Any, train_dataloaders: Any = None, val_dataloaders: Any = None,
             datamodule: Any = None, ckpt_path: Any = None, weights_only: Any = None) -> None:
        from gauss_integrations.ray.elastic import ElasticTrainer

        import pytorch_lightning as pl

        if isinstance(train_dataloaders, pl.LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        self._refuse_unsupported(trainer, model, ckpt_path, self.strategy)
        loader = self._train_loader(model, train_dataloaders, datamodule)
        stream = _stream_of(loader)
        config = dataclasses.replace(self.config, batch_size=int(loader.batch_size))
        optimizer = _single_optimizer(model.configure_optimizers())  # the driver's copy receives the state
        factory = _ModuleFactory(model)
        stores = _TableStores(model, self.strategy) if _tables_of(model) else None
        table_ids = None
        if stores is not None:
            table_ids = getattr(self.strategy, "ids_fn", None) or _ModuleIds(factory)
        job = ElasticTrainer(factory, _make_optimizer, LightningStep(), stream, config,
                             stores=stores, table_ids=table_ids)
        started = time.perf_counter()
        self.elastic = job
        try:
            job.start()
            if trainer.max_steps is not None and trainer.max_steps >= 0:
                st = job.run(steps=trainer.max_steps)
            else:
                epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else 1
                total = epochs * stream.size
                st = job.run_until(lambda s: s["cursor"] >= total)
            step = job.fetch_state(model, optimizer)
            ledger = job.sample_ledger()
            counts = list(ledger.values())
            self.result = {"status": st, "fit_s": time.perf_counter() - started, "samples": len(ledger),
                           "lost": sum(1 for i in range(st["cursor"]) if i not in ledger),
                           "duplicated": sum(1 for c in counts if c > 1)}
        finally:
            if stores is not None:
                stores.close()  # the trained rows are in the driver's module (fetch_state) by now
            job.shutdown()
            self.elastic = None
        # What Lightning's loop would leave: the step count and a finished state.
        trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
        trainer.fit_loop.epoch_progress.current.completed = st["cursor"] // stream.size
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None
        trainer.training = False

    @staticmethod
    def _refuse_unsupported(trainer: Any, model: Any, ckpt_path: Any, strategy: Any = None) -> None:
        from gauss_plugins.embedding import DynamicEmbeddingTable

        if ckpt_path is not None:
            raise ValueError("GaussStrategy(elastic=True) does not resume from a Lightning checkpoint (ckpt_path): "
                             "resume an elastic job from its disaster checkpoint (ElasticConfig.checkpoint_dir)")
        if not model.automatic_optimization:
            raise ValueError("GaussStrategy(elastic=True) needs automatic optimisation (the launcher all-reduces "
                             "the gradients between backward and optimizer_step)")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("GaussStrategy(elastic=True) steps every batch: set accumulate_grad_batches=1 (raise "
                             "the per-worker batch_size or the number of workers instead)")
        tables = [m for m in model.modules() if isinstance(m, DynamicEmbeddingTable)]
        for table in tables:
            check_table(table)
        if tables and getattr(strategy, "ids_fn", None) is None and not hasattr(model, "gauss_cache_ids"):
            raise ValueError(f"the module has dynamic embedding tables {[t.name for t in tables]}: give it "
                             "gauss_cache_ids(batch) -> {table name: ids} (or GaussStrategy(ids_fn=...)) so the "
                             "replicas can average each step's row gradients over the group")

    @staticmethod
    def _train_loader(model: Any, loaders: Any, datamodule: Any) -> DataLoader:
        if loaders is None:
            if datamodule is not None:
                datamodule.prepare_data()
                datamodule.setup("fit")
                loaders = datamodule.train_dataloader()
            else:
                loaders = model.train_dataloader()
        if not isinstance(loaders, DataLoader):
            raise TypeError(f"GaussStrategy(elastic=True) needs one torch DataLoader for training, got "
                            f"{type(loaders).__name__}")
        if loaders.batch_size is None:
            raise ValueError("GaussStrategy(elastic=True) needs a DataLoader with batch_size (not a batch_sampler): "
                             "the coordinator assigns batch_size samples per worker per step")
        return loaders


def _tables_of(model: Any) -> Dict[str, Any]:
    from gauss_plugins.elastic.rows import tables_of

    return tables_of(model)


class _TableStores:
    """Makes one ShardedTierPS per dynamic table once Ray runs (the ElasticTrainer calls it in
    ``start``); :meth:`close` ends them (and removes a temporary folder)."""

    def __init__(self, model: Any, strategy: Any) -> None:
        from gauss_plugins.embedding.backing import state_layout

        self.layout = {name: (t.dim, sum(w for _, _, w in state_layout(t))) for name, t in _tables_of(model).items()}
        self.store_dir = getattr(strategy, "store_dir", None)
        self.temp = self.store_dir is None
        self.base: Optional[str] = None
        self.stores: Dict[str, Any] = {}

    def __call__(self) -> Dict[str, Any]:
        from gauss_integrations.ray.sharded_store import ShardedTierPS

        # Made here, not in __init__: nothing is left behind when fit fails before the job starts.
        self.base = tempfile.mkdtemp(prefix="gauss-elastic-rows-") if self.temp else \
            os.path.join(self.store_dir, "elastic")

        for name, (dim, width) in self.layout.items():
            self.stores[name] = ShardedTierPS(dim, os.path.join(self.base, name), num_shards=1, state_dim=width,
                                              actor_options={"num_cpus": 0})
        return dict(self.stores)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        if self.temp and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


def _stream_of(loader: DataLoader) -> LoaderStream:
    if isinstance(loader.sampler, RandomSampler):
        gen = loader.generator if loader.generator is not None else loader.sampler.generator
        seed = gen.initial_seed() if gen is not None else torch.initial_seed()
        shuffle = True
    elif isinstance(loader.sampler, SequentialSampler):
        seed, shuffle = 0, False
    else:
        raise ValueError(f"GaussStrategy(elastic=True) replaces the DataLoader's sampler by the coordinator's "
                         f"assignment; a {type(loader.sampler).__name__} cannot be honoured: use shuffle=True/False")
    return LoaderStream(loader.dataset, loader.collate_fn, shuffle, seed % (2 ** 62))
