"""TorchRec's embedding collections, backed by dynamic (hash-keyed, growing) tables.

:class:`DynamicEmbeddingBagCollection` and :class:`DynamicEmbeddingCollection` take the same
``EmbeddingBagConfig`` / ``EmbeddingConfig`` lists as TorchRec's ``EmbeddingBagCollection``
and ``EmbeddingCollection``, read the same ``KeyedJaggedTensor`` and return the same
``KeyedTensor`` / ``Dict[str, JaggedTensor]`` (keys, order, ``length_per_key``, shared
features named ``feature@table``). What differs is the storage: each table is a
:class:`gauss_plugins.embedding.DynamicEmbeddingTable`, so ids are raw int64 values of any
size (no modulo, no collisions), rows are created when ids are seen, and
``num_embeddings`` in the config bounds the table's growth (``max_capacity``; see
:mod:`gauss_integrations.torchrec.tables` for how configs and options map).

Tables hold no ``nn.Parameter``: a dense optimizer built from ``model.parameters()`` sees
only the dense layers, and the tables are trained by the fused
:class:`gauss_plugins.embedding.SparseOptimizer` (``SparseOptimizer(model, ...)`` finds them).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    EmbeddingCollectionInterface,
    get_embedding_names_by_table,
    process_pooled_embeddings,
    reorder_inverse_indices,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from gauss_plugins.embedding import AlwaysAdmit, DynamicEmbeddingTable, TableFullError

from gauss_integrations.torchrec.inputs import TableBatch, check_features, group_by_table
from gauss_integrations.torchrec.tables import TableOptions, build_table

_POOLING_MODE = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def _prepare_configs(tables: Sequence[BaseEmbeddingConfig], kind: type, owner: str) -> List[List[str]]:
    """Check configs as TorchRec does and return the feature names of each table.

    Like TorchRec, a config without feature names reads the feature named after the table
    (and the config is updated in place to say so, as TorchRec's modules do).
    """
    names = set()
    for config in tables:
        if not isinstance(config, kind):
            raise TypeError(f"{owner} takes {kind.__name__} objects, got {type(config).__name__}")
        if not config.name:
            raise ValueError(f"{owner}: every table config needs a name")
        if config.name in names:
            raise ValueError(f"Duplicate table name {config.name}")
        names.add(config.name)
        if config.embedding_dim <= 0:
            raise ValueError(f"{owner}: table {config.name!r} has embedding_dim {config.embedding_dim}; it must be > 0")
        if not config.feature_names:
            config.feature_names = [config.name]
    return [list(config.feature_names) for config in tables]


def _check_room(tables: Sequence[DynamicEmbeddingTable], batches: Sequence[TableBatch]) -> None:
    """Raise TableFullError before any lookup if a table could not take this batch's new ids.

    Each table's own insert is all-or-nothing, but a collection looks its tables up one
    after the other: without this check a full second table would fail after the first had
    already inserted rows. Exact for tables that admit every id and never evict (the only
    ones that fail on a full table at a predictable count); only tables the batch could
    fill are probed, so the common case costs no extra hash lookups.
    """
    for table, batch in zip(tables, batches):
        if not table.training or table.eviction is not None or not isinstance(table.admission, AlwaysAdmit):
            continue
        free = table.config.max_capacity - len(table)
        if batch.ids.numel() <= free:
            continue
        absent = batch.ids[table.find(batch.ids) < 0]
        new = int(torch.unique(absent).numel())
        if new > free:
            raise TableFullError(
                f"dynamic table {table.name!r} is full: {len(table)} rows of max_capacity "
                f"{table.config.max_capacity}, and this batch brings {new} new ids. No table was changed. "
                f"Raise max_capacity, set an eviction policy ('lru', 'lfu', 'ttl') or admit fewer ids "
                f"('counting'), through table_options / default_options"
            )


def _check_options_keys(table_options: Optional[Mapping[str, Any]], tables: Sequence[BaseEmbeddingConfig], owner: str) -> None:
    if not table_options:
        return
    unknown = sorted(set(table_options) - {c.name for c in tables})
    if unknown:
        raise ValueError(
            f"{owner}: table_options name table(s) {unknown} that are not in this collection "
            f"(tables: {[c.name for c in tables]})"
        )


class DynamicEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A pooled embedding collection over dynamic tables; a drop-in for TorchRec's
    ``EmbeddingBagCollection``.

    Args:
        tables: TorchRec ``EmbeddingBagConfig`` list. ``embedding_dim``, ``pooling`` (SUM or
            MEAN), ``feature_names`` (a feature read by several tables is output as
            ``feature@table``, as in TorchRec), ``data_type`` (FP32/FP16/BF16 storage) and the
            ``weight_init_min``/``weight_init_max`` range are honoured; ``num_embeddings`` is
            the most rows the table grows to (``max_capacity``, overridable).
        is_weighted: read per-id weights from the KJT (``weights()``) and pool
            ``sum(w_i * e_i)``.
        device: where the tables live; the KJT must be on the same device.
        table_options: per-table options keyed by table name: a
            :class:`gauss_plugins.embedding.DynamicTableConfig` or a dict of its fields
            (capacity, admission, eviction, optimizer, dtype, seed...). They override what
            is derived from the TorchRec config.
        default_options: the same, applied to every table before ``table_options``.
        allow_unknown_features: accept KJT keys that no table reads (ignored, as TorchRec
            does). Off by default so a misspelt feature name is an error, not a silent miss.

    Forward takes a ``KeyedJaggedTensor`` and returns a ``KeyedTensor`` of shape
    ``(batch, sum of dims)``, keys in table order then feature order. In training mode
    new ids get rows (subject to the admission policy); a malformed batch raises before any
    table is touched. With ``is_weighted`` the KJT weights get a gradient (as with TorchRec's
    collection), so a ``FeatureProcessedEmbeddingBagCollection``'s position weights train.
    In eval mode ids without a row read what the table option ``eval_unknown`` says (zeros
    by default).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        table_options: Optional[Mapping[str, TableOptions]] = None,
        default_options: Optional[TableOptions] = None,
        allow_unknown_features: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not tables:
            raise ValueError(f"{owner} needs at least one EmbeddingBagConfig")
        self._feature_names: List[List[str]] = _prepare_configs(tables, EmbeddingBagConfig, owner)
        for config in tables:
            if config.pooling not in _POOLING_MODE:
                raise ValueError(
                    f"{owner}: table {config.name!r} has pooling {config.pooling}; a bag collection pools "
                    f"with SUM or MEAN (use DynamicEmbeddingCollection for unpooled embeddings)"
                )
            if is_weighted and config.pooling != PoolingType.SUM:
                # A weighted mean is ambiguous (divide by count or by total weight?);
                # TorchRec's unsharded EBC (nn.EmbeddingBag) rejects it too.
                raise ValueError(f"{owner}: is_weighted=True needs SUM pooling; table {config.name!r} uses {config.pooling}")
        _check_options_keys(table_options, tables, owner)

        self._is_weighted = is_weighted
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._allow_unknown_features = allow_unknown_features
        self._embedding_bag_configs = tables
        self._lengths_per_embedding: List[int] = [
            config.embedding_dim for config in tables for _ in config.feature_names
        ]
        self._embedding_names: List[str] = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._flat_feature_names: List[str] = [f for names in self._feature_names for f in names]
        self._modes: List[str] = [_POOLING_MODE[config.pooling] for config in tables]
        self.embedding_bags = nn.ModuleDict(
            {
                config.name: build_table(
                    config,
                    default_options=default_options,
                    options=(table_options or {}).get(config.name),
                    device=self._device,
                )
                for config in tables
            }
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pool each feature's ids through its table; see the class docstring."""
        kjt = check_features(
            features,
            self._flat_feature_names,
            self._device,
            weighted=self._is_weighted,
            allow_unknown_features=self._allow_unknown_features,
            owner=type(self).__name__,
        )
        batches = group_by_table(kjt, self._feature_names, weighted=self._is_weighted)
        _check_room(list(self.embedding_bags.values()), batches)
        pooled: List[torch.Tensor] = []
        for table, mode, batch in zip(self.embedding_bags.values(), self._modes, batches):
            out = table.lookup_pooled(batch.ids, batch.offsets, mode=mode, per_sample_weights=batch.weights)
            # TorchRec outputs fp32 whatever the storage dtype; one table lookup serves all
            # features sharing the table, so split its bags back per feature.
            pooled.extend(out.float().split(batch.bags_per_feature))
        inverse_indices = reorder_inverse_indices(kjt.inverse_indices_or_none(), self._flat_feature_names)
        return KeyedTensor(
            keys=self._embedding_names,
            values=process_pooled_embeddings(pooled, inverse_indices),
            length_per_key=self._lengths_per_embedding,
        )

    def is_weighted(self) -> bool:
        """Whether the KJT's weights are used as per-id pooling weights."""
        return self._is_weighted

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The TorchRec configs this collection was built from."""
        return self._embedding_bag_configs

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return self._device


class DynamicEmbeddingCollection(EmbeddingCollectionInterface):
    """An unpooled embedding collection over dynamic tables; a drop-in for TorchRec's
    ``EmbeddingCollection``.

    Args:
        tables: TorchRec ``EmbeddingConfig`` list (all tables of one embedding_dim, as in
            TorchRec). See :class:`DynamicEmbeddingBagCollection` for what is honoured.
        device: where the tables live; the KJT must be on the same device.
        need_indices: put each feature's raw ids in the output JaggedTensor's ``weights``,
            as TorchRec does.
        table_options, default_options, allow_unknown_features: as in
            :class:`DynamicEmbeddingBagCollection`.

    Forward takes a ``KeyedJaggedTensor`` and returns ``Dict[str, JaggedTensor]``: for each
    embedding name (``feature`` or ``feature@table``), the rows of that feature's ids with
    the feature's lengths.
    """

    def __init__(
        self,
        tables: List[EmbeddingConfig],
        device: Optional[Union[str, torch.device]] = None,
        need_indices: bool = False,
        table_options: Optional[Mapping[str, TableOptions]] = None,
        default_options: Optional[TableOptions] = None,
        allow_unknown_features: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not tables:
            raise ValueError(f"{owner} needs at least one EmbeddingConfig")
        self._feature_names: List[List[str]] = _prepare_configs(tables, EmbeddingConfig, owner)
        dims = {config.embedding_dim for config in tables}
        if len(dims) != 1:
            raise ValueError(
                "All tables in a EmbeddingCollection are required to have same embedding dimension; "
                f"got {[(c.name, c.embedding_dim) for c in tables]}"
            )
        _check_options_keys(table_options, tables, owner)

        self._embedding_configs = tables
        self._embedding_dim: int = tables[0].embedding_dim
        self._need_indices = need_indices
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._allow_unknown_features = allow_unknown_features
        self._embedding_names_by_table: List[List[str]] = get_embedding_names_by_table(tables)
        self._flat_feature_names: List[str] = [f for names in self._feature_names for f in names]
        self.embeddings = nn.ModuleDict(
            {
                config.name: build_table(
                    config,
                    default_options=default_options,
                    options=(table_options or {}).get(config.name),
                    device=self._device,
                )
                for config in tables
            }
        )

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        """Look up every id of every feature; see the class docstring."""
        kjt = check_features(
            features,
            self._flat_feature_names,
            self._device,
            weighted=False,
            allow_unknown_features=self._allow_unknown_features,
            owner=type(self).__name__,
        )
        batches = group_by_table(kjt, self._feature_names, weighted=False)
        _check_room(list(self.embeddings.values()), batches)
        out: Dict[str, JaggedTensor] = {}
        for table, names, batch in zip(self.embeddings.values(), self._embedding_names_by_table, batches):
            rows = table.lookup(batch.ids).float().split(batch.ids_per_feature)
            for name, r, lengths, ids in zip(names, rows, batch.lengths_per_feature, batch.values_per_feature):
                out[name] = JaggedTensor(values=r, lengths=lengths, weights=ids if self._need_indices else None)
        return out

    def need_indices(self) -> bool:
        """Whether outputs carry the raw ids in ``weights``."""
        return self._need_indices

    def embedding_dim(self) -> int:
        """The (common) embedding dimension."""
        return self._embedding_dim

    def embedding_configs(self) -> List[EmbeddingConfig]:
        """The TorchRec configs this collection was built from."""
        return self._embedding_configs

    def embedding_names_by_table(self) -> List[List[str]]:
        """Output names per table (``feature`` or ``feature@table`` when shared)."""
        return self._embedding_names_by_table

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return self._device
