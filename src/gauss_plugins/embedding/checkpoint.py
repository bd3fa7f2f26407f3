"""Full and incremental checkpoints of dynamic tables, pickle-free and atomic.

One file per table and checkpoint, in the safetensors layout (:mod:`gauss_plugins.serialization`):

* **full** (``save_table(table, path)``): the index (keys, rows, allocator order), the
  values, optimizer state and eviction state of every live row, the default row, the
  admission state, the tombstone log, and the table's version and step counters.
* **incremental** (``save_table(table, path, since_version=v)``): only the rows inserted,
  written or read in training after version ``v`` (with their optimizer and eviction
  state), the ids evicted since ``v``, and the small table-wide state. It applies on top of
  the table state at exactly version ``v``.

Loading a full checkpoint and then its incrementals in order reproduces the table's values,
optimizer state, policy state and counters; continuing training from there on CPU gives
bit-identical results to never having stopped. A typical loop::

    v = table.version
    save_table(table, "ckpt/items.full.safetensors")
    ...train...
    save_table(table, "ckpt/items.inc1.safetensors", since_version=v); v = table.version

    table = DynamicEmbeddingTable(config)           # same dim and optimizer
    load_table(table, ["ckpt/items.full.safetensors", "ckpt/items.inc1.safetensors"])

Metadata (``__metadata__``): format, kind, version, base_version, step, the table config as
JSON. :func:`table_from_checkpoint` rebuilds a table from a full checkpoint's config.

Every file carries a CRC-32 of its header and data (:mod:`gauss_plugins.serialization`).
:func:`load_table` reads and verifies *all* the files, and checks that they form a chain
(full first, each incremental based on the previous file's version), before touching the
table: a damaged or misordered file raises and leaves the table as it was. Checkpoints written
before checksums existed load with a warning by default (``require_checksum=True`` refuses
them): they are this project's own files, refusing them would strand trained tables with no way
to upgrade, and saving the loaded table again writes a verified file.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Union

from gauss_plugins.embedding.table import DynamicEmbeddingTable, DynamicTableConfig
from gauss_plugins.serialization import load_tensors, read_metadata, save_tensors

__all__ = ["save_table", "load_table", "table_from_checkpoint", "checkpoint_info"]

PathLike = Union[str, os.PathLike]


def save_table(table: DynamicEmbeddingTable, path: PathLike, since_version: Optional[int] = None) -> int:
    """Write a full (or, with ``since_version``, incremental) checkpoint atomically.

    Returns the table's version at the checkpoint: pass it as the next ``since_version``."""
    if since_version is not None and since_version > table.version:
        raise ValueError(f"since_version {since_version} is ahead of table {table.name!r} (version {table.version})")
    tensors, meta = table.export_state(since_version)
    save_tensors(path, tensors, meta)
    return table.version


def load_table(table: DynamicEmbeddingTable, paths: Union[PathLike, Iterable[PathLike]], *,
               require_checksum: bool = False) -> DynamicEmbeddingTable:
    """Load a full checkpoint, then incrementals, in the given order, into ``table``.

    Every file is read and verified first (checksum, chain of versions); a
    :class:`~gauss_plugins.serialization.ChecksumError` or ``ValueError`` then leaves ``table``
    unchanged. Files without a checksum warn, or raise with ``require_checksum=True``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("load_table needs at least one checkpoint path")
    loaded = [load_tensors(path, missing_checksum="error" if require_checksum else "warn") for path in paths]
    for i, (path, (_, meta)) in enumerate(zip(paths, loaded)):
        if i == 0 and meta.get("kind") != "full":
            raise ValueError(f"{path}: the first checkpoint must be a full one (got {meta.get('kind')!r})")
        if i > 0 and meta.get("kind") != "full" and meta.get("base_version") != loaded[i - 1][1].get("version"):
            raise ValueError(f"{path}: incremental checkpoint based on version {meta.get('base_version')}, but the "
                             f"file before it ({paths[i - 1]}) is at version {loaded[i - 1][1].get('version')}: "
                             f"pass the full checkpoint and the incrementals in the order they were saved")
    for path, (tensors, meta) in zip(paths, loaded):
        try:
            table.import_state(tensors, meta)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return table


def checkpoint_info(path: PathLike) -> dict:
    """The metadata of a checkpoint (kind, version, base_version, config...), without its data."""
    meta = read_metadata(path)
    if "config" in meta:
        meta = {**meta, "config": json.loads(meta["config"])}
    return meta


def table_from_checkpoint(paths: Union[PathLike, Iterable[PathLike]], **overrides) -> DynamicEmbeddingTable:
    """A new table built from the first (full) checkpoint's config, with the checkpoints loaded.
    ``overrides`` replace config fields (e.g. ``device``, ``backend``)."""
    first = paths if isinstance(paths, (str, os.PathLike)) else next(iter(paths))
    meta = read_metadata(first)
    config = DynamicTableConfig.from_json(meta["config"])
    for key, value in overrides.items():
        setattr(config, key, value)
    config.__post_init__()
    return load_table(DynamicEmbeddingTable(config), paths)
