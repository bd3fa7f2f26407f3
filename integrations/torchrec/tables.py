"""From a TorchRec table config (plus options) to a :class:`DynamicEmbeddingTable`.

What a TorchRec config says is kept:

* ``embedding_dim`` -> ``dim``; ``data_type`` FP32 / FP16 / BF16 -> storage ``dtype``.
* ``num_embeddings`` -> ``max_capacity``: the memory the model was sized for stays the
  bound (the table starts small and grows up to it). Raise it, or set an eviction policy,
  through the options: with eviction off a full table raises ``TableFullError``.
  ``swap_dynamic_embeddings(copy_weights=True)`` fills a table with ``num_embeddings`` rows
  at once, so it bounds copied tables at ``copy_headroom`` (2) times that instead.
* Ids a table has never seen read zeros in eval mode (eval never inserts rows), where
  TorchRec would read the row of that index: set the option ``eval_unknown`` to ``"init"``
  (the id's initial row) or ``"error"`` to choose otherwise.
* The default initialisation, uniform in ``[weight_init_min, weight_init_max]`` (TorchRec's
  ``±sqrt(1 / num_embeddings)`` when unset), becomes the table's deterministic uniform
  initializer over the same range. A custom ``init_fn`` fills a whole weight tensor from
  torch's RNG, which cannot give each id the same row on every replica: it is refused
  unless the options name an ``initializer``.
* ``seed``: derived from the table name (CRC32), so two tables do not start with identical
  rows for the same id, and every replica derives the same seed.

Options (a dict of :class:`DynamicTableConfig` fields, or a whole ``DynamicTableConfig``)
override the derived values; ``name``, ``dim`` and ``device`` always come from the TorchRec
config and the module.
"""
from __future__ import annotations

import copy
import functools
import zlib
from dataclasses import fields
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType

from gauss_plugins.embedding import DynamicEmbeddingTable, DynamicTableConfig

TableOptions = Union[DynamicTableConfig, Mapping[str, Any]]

_DTYPE = {DataType.FP32: "fp32", DataType.FP16: "fp16", DataType.BF16: "bf16"}
# Fields a TorchRec config or the owning module decides; options may not set them.
_FIXED = ("name", "dim", "device")
_INITIAL_CAPACITY = 1024


def table_config(
    config: BaseEmbeddingConfig,
    device: torch.device,
    default_options: Optional[TableOptions] = None,
    options: Optional[TableOptions] = None,
) -> DynamicTableConfig:
    """The :class:`DynamicTableConfig` for TorchRec table ``config`` (see module docs)."""
    derived: Dict[str, Any] = {
        "name": config.name,
        "dim": config.embedding_dim,
        "device": device,
        "max_capacity": config.num_embeddings,
        "initial_capacity": min(config.num_embeddings, _INITIAL_CAPACITY),
        "seed": zlib.crc32(config.name.encode()),
    }
    if config.num_embeddings < 1:
        raise ValueError(f"table {config.name!r}: num_embeddings must be >= 1, got {config.num_embeddings}")
    if config.data_type not in _DTYPE:
        raise ValueError(
            f"table {config.name!r}: data_type {config.data_type} is not a storage type of dynamic tables "
            f"(FP32, FP16 or BF16)"
        )
    derived["dtype"] = _DTYPE[config.data_type]

    # Merge the layers as plain field dicts and build the config once at the end, so that
    # fields checked together (initial_capacity <= max_capacity) are checked on the result.
    values = dict(derived)
    for layer in (default_options, options):
        values.update(_layer_fields(layer, config))
    layers = (default_options, options)
    if not any(sets_option(layer, "initializer") for layer in layers):
        # Honour TorchRec's uniform init (its range unless an option sets one); a custom
        # init_fn raises here, so it is never silently replaced.
        low, high = _uniform_range(config)
        values["initializer"] = "uniform"
        if not any(sets_option(layer, f) for layer in layers for f in ("init_min", "init_max")):
            values.update(init_min=low, init_max=high)
    if not any(sets_option(layer, "initial_capacity") for layer in layers):
        values["initial_capacity"] = min(values["initial_capacity"], values["max_capacity"])
    return DynamicTableConfig(**values)


def build_table(
    config: BaseEmbeddingConfig,
    device: torch.device,
    default_options: Optional[TableOptions] = None,
    options: Optional[TableOptions] = None,
) -> DynamicEmbeddingTable:
    """A new, empty dynamic table for TorchRec table ``config`` on ``device``."""
    return DynamicEmbeddingTable(table_config(config, device, default_options, options))


def sets_option(layer: Optional[TableOptions], name: str) -> bool:
    """Whether an options layer decides field ``name`` (a whole config decides them all)."""
    if layer is None:
        return False
    if isinstance(layer, DynamicTableConfig):
        return True  # a whole config decides every field
    return name in layer


def _layer_fields(layer: Optional[TableOptions], config: BaseEmbeddingConfig) -> Dict[str, Any]:
    """The fields one options layer sets (deep-copied, see below), checked."""
    if layer is None:
        return {}
    if isinstance(layer, DynamicTableConfig):
        if layer.dim != config.embedding_dim:
            raise ValueError(
                f"table {config.name!r}: the DynamicTableConfig given has dim {layer.dim} but the TorchRec "
                f"config says embedding_dim {config.embedding_dim}"
            )
        chosen = {f.name: getattr(layer, f.name) for f in fields(DynamicTableConfig) if f.name not in _FIXED}
    elif isinstance(layer, Mapping):
        known = {f.name for f in fields(DynamicTableConfig)}
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ValueError(
                f"table {config.name!r}: unknown table option(s) {unknown}; known: {sorted(known - set(_FIXED))}"
            )
        fixed = sorted(set(layer) & set(_FIXED))
        if fixed:
            raise ValueError(
                f"table {config.name!r}: option(s) {fixed} come from the TorchRec config and the module's "
                f"device; change those instead"
            )
        chosen = dict(layer)
    else:
        raise TypeError(
            f"table {config.name!r}: options must be a dict of DynamicTableConfig fields or a "
            f"DynamicTableConfig, got {type(layer).__name__}"
        )
    # Deep copies: options shared by several tables (default_options) must not share
    # mutable state, e.g. one admission sketch or one optimizer config object for all tables.
    return copy.deepcopy(chosen)


def _uniform_range(config: BaseEmbeddingConfig) -> tuple:
    """TorchRec's init range for ``config``, or a clear error for an init it cannot mirror."""
    fn = config.init_fn
    if isinstance(fn, functools.partial) and fn.func is torch.nn.init.uniform_ and not fn.args:
        # TorchRec's default (BaseEmbeddingConfig.__post_init__) or the user's own uniform.
        return float(fn.keywords.get("a", 0.0)), float(fn.keywords.get("b", 1.0))
    raise ValueError(
        f"table {config.name!r} has a custom init_fn ({fn!r}); a dynamic table creates rows one id at a time "
        f"and must give an id the same row on every replica, which a tensor-filling init_fn from torch's RNG "
        f"cannot do. Pass the options {{'initializer': 'uniform' | 'normal' | 'zeros' | fn(ids, dim, seed)}} "
        f"(with init_min/init_max or init_std) for this table"
    )
