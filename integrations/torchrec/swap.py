"""One call that turns a TorchRec model's embedding collections into dynamic ones.

:func:`swap_dynamic_embeddings` walks a model and replaces every TorchRec
``EmbeddingBagCollection`` / ``EmbeddingCollection`` by its dynamic twin built from the same
configs, in place (module attributes are re-pointed, so code holding the parent modules —
DLRM's ``SparseArch``, for instance — keeps working). :func:`dynamic_tables` then lists the
tables to give to the fused sparse optimizer.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from gauss_integrations.torchrec.modules import DynamicEmbeddingBagCollection, DynamicEmbeddingCollection
from gauss_integrations.torchrec.tables import TableOptions, sets_option


def swap_dynamic_embeddings(
    model: nn.Module,
    table_options: Optional[Mapping[str, TableOptions]] = None,
    default_options: Optional[TableOptions] = None,
    allow_unknown_features: bool = False,
    copy_weights: bool = False,
    copy_headroom: float = 2.0,
) -> nn.Module:
    """Replace every TorchRec ``EmbeddingBagCollection`` and ``EmbeddingCollection`` in
    ``model`` (the model itself included) by a dynamic twin with the same configs.

    Args:
        model: any ``nn.Module`` tree holding TorchRec collections.
        table_options: per-table options keyed by table name (table names must be unique
            across the model for this to be unambiguous; a name matching no table is an
            error). See :class:`DynamicEmbeddingBagCollection`.
        default_options: options for every table, applied before ``table_options``.
        allow_unknown_features: passed to every twin (accept KJT keys no table reads).
        copy_weights: write row ``i`` of each static table as the row of id ``i`` (for
            models whose ids already are row numbers, e.g. from a vocabulary): the swapped
            model then computes what the original did on those ids, and new ids get new
            rows. Off by default: the dynamic tables start empty.
        copy_headroom: with ``copy_weights``, a copied table is already ``num_embeddings``
            rows full, so unless the options set ``max_capacity`` it may grow to
            ``copy_headroom * num_embeddings`` rows (and starts at ``num_embeddings``, so the
            copy does not rehash repeatedly): the first unseen ids get rows instead of
            failing the batch with ``TableFullError``. Set an eviction policy for a bound
            that never fails.

    Ids a table has never seen read zeros in eval mode (eval never inserts), as in any
    dynamic table; choose otherwise with the option ``eval_unknown`` (``"init"``: the id's
    initial row, ``"error"``: raise), e.g. ``default_options={"eval_unknown": "error"}``.

    Returns:
        ``model`` itself, changed in place, or the twin when ``model`` is a collection.
        The twins keep the original collections' ``is_weighted``, ``need_indices``,
        device and train/eval mode; a module used at several places in the tree is
        replaced by one shared twin. On any error the model is left unchanged.
    """
    for name, flag in (("allow_unknown_features", allow_unknown_features), ("copy_weights", copy_weights)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(copy_headroom, bool) or not isinstance(copy_headroom, (int, float)) or not copy_headroom >= 1.0:
        raise ValueError(f"copy_headroom must be a number >= 1 (the most rows a copied table grows to, as a multiple "
                         f"of num_embeddings), got {copy_headroom!r}")
    table_options = dict(table_options or {})
    seen_tables: Dict[str, str] = {}
    twins: Dict[int, nn.Module] = {}

    def twin_of(module: nn.Module, path: str) -> nn.Module:
        if id(module) in twins:
            return twins[id(module)]
        configs = module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection) else module.embedding_configs()
        for config in configs:
            if config.name in seen_tables:
                raise ValueError(
                    f"table name {config.name!r} is used by two collections ({seen_tables[config.name]!r} and "
                    f"{path!r}); table_options are keyed by table name, so rename one of the tables"
                )
            seen_tables[config.name] = path
        options = {c.name: table_options[c.name] for c in configs if c.name in table_options}
        if copy_weights:
            options = {c.name: _with_headroom(c, default_options, options.get(c.name), copy_headroom) for c in configs}
        if isinstance(module, EmbeddingBagCollection):
            twin: nn.Module = DynamicEmbeddingBagCollection(
                configs,
                is_weighted=module.is_weighted(),
                device=module.device,
                table_options=options,
                default_options=default_options,
                allow_unknown_features=allow_unknown_features,
            )
        else:
            twin = DynamicEmbeddingCollection(
                configs,
                device=module.device,
                need_indices=module.need_indices(),
                table_options=options,
                default_options=default_options,
                allow_unknown_features=allow_unknown_features,
            )
        if copy_weights:
            _copy_rows(module, twin)
        twin.train(module.training)
        twins[id(module)] = twin
        return twin

    def is_target(module: nn.Module) -> bool:
        return isinstance(module, (EmbeddingBagCollection, EmbeddingCollection))

    # Build every twin first, then re-point attributes: a bad option (unknown table name,
    # clashing table names) then leaves the model untouched.
    if is_target(model):
        root_twin = twin_of(model, "")
        _check_all_options_used(table_options, seen_tables)
        return root_twin
    replacements = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if isinstance(parent, (DynamicEmbeddingBagCollection, DynamicEmbeddingCollection)) or is_target(parent):
            continue  # never descend into a collection: its tables are not separate targets
        # _modules, not named_children(): the latter hides a module's second name, and a
        # module registered twice must be re-pointed at both places.
        for child_name, child in parent._modules.items():
            if is_target(child):
                path = f"{parent_name}.{child_name}" if parent_name else child_name
                replacements.append((parent, child_name, twin_of(child, path)))
    _check_all_options_used(table_options, seen_tables)
    for parent, child_name, twin in replacements:
        setattr(parent, child_name, twin)
    return model


def _with_headroom(config, default_options: Optional[TableOptions], options: Optional[TableOptions],
                   headroom: float) -> Optional[TableOptions]:
    """``options`` for a table that copy_weights fills to ``num_embeddings`` rows at once:
    room to grow beyond it, unless the options bound the table themselves."""
    if sets_option(default_options, "max_capacity") or sets_option(options, "max_capacity"):
        return options
    rows = config.num_embeddings
    extra = {"max_capacity": max(rows, math.ceil(headroom * rows))}
    if not (sets_option(default_options, "initial_capacity") or sets_option(options, "initial_capacity")):
        extra["initial_capacity"] = rows  # the copy fills it: no rehash per doubling on the way
    return {**options, **extra} if options else extra


def _copy_rows(static: nn.Module, twin: nn.Module) -> None:
    statics = static.embedding_bags if isinstance(static, EmbeddingBagCollection) else static.embeddings
    dynamics = twin.embedding_bags if isinstance(twin, DynamicEmbeddingBagCollection) else twin.embeddings
    for name, module in statics.items():
        weight = module.weight.detach()
        table = dynamics[name]
        if weight.shape[0] > table.config.max_capacity:
            raise ValueError(
                f"copy_weights: table {name!r} has {weight.shape[0]} rows but its max_capacity option is "
                f"{table.config.max_capacity}; raise max_capacity or swap without copy_weights"
            )
        table.set(torch.arange(weight.shape[0], device=weight.device), weight)


def _check_all_options_used(table_options: Mapping[str, TableOptions], seen_tables: Mapping[str, str]) -> None:
    unknown = sorted(set(table_options) - set(seen_tables))
    if unknown:
        raise ValueError(
            f"table_options name table(s) {unknown} that the model does not have "
            f"(its tables: {sorted(seen_tables)}); nothing was swapped"
        )


def dynamic_tables(model: nn.Module) -> Dict[str, nn.Module]:
    """Every dynamic table in ``model``, keyed by its qualified module name
    (e.g. ``"sparse_arch.embedding_bag_collection.embedding_bags.t1"``), each listed once."""
    from gauss_plugins.embedding import DynamicEmbeddingTable

    tables: Dict[str, nn.Module] = {}
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, DynamicEmbeddingTable) and id(module) not in seen:
            seen.add(id(module))
            tables[name] = module
    return tables
