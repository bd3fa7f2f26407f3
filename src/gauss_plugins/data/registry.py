"""Load any registered dataset by name (built-in or from a third-party plugin)."""
from __future__ import annotations

import inspect
from typing import Any, Optional

from gauss_plugins.data.loaders import load_movielens_csv
from gauss_plugins.data.sequences import UserSequences

__all__ = ["load_dataset", "load_movielens_25m", "dataset_names"]


def load_movielens_25m(path: str) -> UserSequences:
    """MovieLens 25M ``ratings.csv`` (the 20M format)."""
    return load_movielens_csv(path, name="ml-25m")


def dataset_names() -> list:
    from gauss_plugins.plugins import get_registry

    return get_registry().names("dataset")


def load_dataset(name: str, path: Optional[str] = None, **options: Any) -> UserSequences:
    """Build dataset ``name`` through the plugin registry (kind ``dataset``).

    ``path`` is the file or folder to read (unused by generators such as ``synthetic``);
    ``options`` go to the factory. Raises ``KeyError`` listing the registered names for an
    unknown ``name``, and ``TypeError`` when a factory returns something else than
    :class:`UserSequences`.
    """
    from gauss_plugins.plugins import get_registry

    component = get_registry().get("dataset", name)
    factory = component.load()
    try:
        inspect.signature(factory).bind(path=path, **options)
    except TypeError as exc:
        raise ValueError(f"dataset {name!r} does not take these options ({exc}); check data.options") from None
    seqs = component.create(path=path, **options)
    if not isinstance(seqs, UserSequences):
        raise TypeError(f"dataset {name!r} ({component.provider}) returned {type(seqs).__name__}, "
                        "expected gauss_plugins.data.UserSequences")
    return seqs
