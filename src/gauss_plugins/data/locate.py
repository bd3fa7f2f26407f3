"""Where datasets live: one convention for the CLI, the demo, the tests, examples and benchmarks.

The *data folder* holds one sub-folder per dataset, named like the dataset (``ml-100k/``,
``ml-1m/``, ...). It is, in this order:

1. ``$GAUSS_DATA`` when set;
2. ``../shared/data`` beside the source checkout, when this package runs from a checkout
   and that folder exists;
3. ``gauss_plugins/data`` in the user cache (``$GAUSS_PLUGINS_CACHE``, else
   ``$XDG_CACHE_HOME/gauss_plugins``, else ``~/.cache/gauss_plugins``), which is where
   ``gauss data download`` writes by default.

:func:`locate_dataset` is the one way to find a dataset; it also says where it looked, so a
caller that falls back (the demo's synthetic stream) can tell the user why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = [
    "DATA_ENV", "RATING_FILES", "DataRoot", "Located", "cache_data_dir", "data_root", "load_configured_dataset",
    "locate_dataset", "resolve_data_path",
]

DATA_ENV = "GAUSS_DATA"

# The file whose presence makes a folder a usable copy of each MovieLens dataset.
RATING_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-20m": "ratings.csv", "ml-25m": "ratings.csv"}
# Other files that make a folder usable instead: ML-1M also comes as a per-user sequence file
# (../shared/data/ml-1m holds only that one; data.loaders.load_movielens_1m reads either).
OTHER_DATA_FILES = {"ml-1m": ("ml-1m_seq.txt",)}


@dataclass(frozen=True)
class DataRoot:
    """The data folder and how it was chosen (shown to the user)."""

    path: str
    source: str  # "$GAUSS_DATA", "../shared/data beside the checkout", "the user cache"


@dataclass(frozen=True)
class Located:
    """The result of looking for one dataset: ``path`` (None when absent) and why."""

    name: str
    path: Optional[str]
    root: DataRoot
    reason: str  # when path is None: what is missing and what to do next

    def __bool__(self) -> bool:
        return self.path is not None


def _checkout_root() -> Optional[str]:
    """The source checkout this package runs from (an editable install), or None when it
    runs from an installed wheel."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, "..", "..", ".."))  # src/gauss_plugins/data -> checkout
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "src", "gauss_plugins")):
        return root
    return None


def cache_data_dir() -> str:
    """``gauss_plugins/data`` in the user cache (the same cache root as the compiled kernels)."""
    from gauss_plugins._cachedir import cache_root

    return cache_root("data")


def data_root() -> DataRoot:
    """The data folder (see the module docstring); it need not exist yet."""
    env = os.environ.get(DATA_ENV)
    if env:
        return DataRoot(os.path.abspath(os.path.expanduser(env)), f"${DATA_ENV}")
    checkout = _checkout_root()
    if checkout is not None:
        shared = os.path.abspath(os.path.join(checkout, "..", "shared", "data"))
        if os.path.isdir(shared):
            return DataRoot(shared, "../shared/data beside the checkout")
    return DataRoot(cache_data_dir(), "the user cache")


def _download_name(name: str) -> Optional[str]:
    return name.replace("ml-", "movielens-") if name in RATING_FILES else None


def locate_dataset(name: str) -> Located:
    """Find dataset ``name`` (``ml-100k``, ``ml-1m``, ...) in the data folder.

    A folder counts only when it holds the dataset's rating file, so a half-extracted or
    empty folder is reported, not loaded.
    """
    root = data_root()
    folder = os.path.join(root.path, name)
    marker = RATING_FILES.get(name)
    accepted = (marker, *OTHER_DATA_FILES.get(name, ()))
    if os.path.isdir(folder) and (marker is None or any(os.path.isfile(os.path.join(folder, f)) for f in accepted)):
        return Located(name, folder, root, "")
    where = f"{folder}/{marker}" if marker else folder
    what = f"no {where} (the data folder is {root.path}, from {root.source})"
    if marker and os.path.isfile(os.path.join(root.path, marker)):
        what += f"; ${DATA_ENV} names a dataset folder itself: set it to the folder that holds {name}/"
    download = _download_name(name)
    fix = f"run `gauss data download {download}`, " if download else ""
    return Located(name, None, root, f"{what}. To use {name}: {fix}set {DATA_ENV} to a folder holding {name}/, "
                                     f"or pass --data-path")


def resolve_data_path(dataset: str, path: Optional[str]) -> Optional[str]:
    """The path to load ``dataset`` from: ``path`` when given, else the located folder of a
    dataset that lives in the data folder (MovieLens). Datasets without files (``synthetic``)
    and those the data folder does not know (a plugin's) get ``None`` back.

    Raises :class:`FileNotFoundError` saying where it looked when a MovieLens dataset is
    missing, and for ``seqfile`` without a path.
    """
    if path is not None:
        return path
    if dataset == "seqfile":
        raise FileNotFoundError("the seqfile dataset needs --data-path pointing at the sequence file")
    if dataset not in RATING_FILES:
        return None
    found = locate_dataset(dataset)
    if not found:
        raise FileNotFoundError(found.reason)
    return found.path


def load_configured_dataset(dataset: str, path: Optional[str], options: Optional[Dict[str, Any]] = None):
    """Load ``dataset`` through the registry from ``path`` or the data folder."""
    from gauss_plugins.data.registry import load_dataset

    return load_dataset(dataset, resolve_data_path(dataset, path), **(options or {}))
