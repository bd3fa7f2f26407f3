"""Event sources for sequential recommendation: loaders, the leave-one-out split, a
synthetic stream, and the MovieLens downloader.

Everything returns :class:`UserSequences` (per-user chronological items and timestamps,
jagged, raw item ids). Datasets are registered as plugins (kind ``dataset``) so that
``gauss train --dataset NAME`` also finds third-party sources.
"""
from gauss_plugins.data.download import DATASETS, DownloadError, download_dataset
from gauss_plugins.data.loaders import (
    load_movielens_100k,
    load_movielens_1m,
    load_movielens_csv,
    load_sequence_file,
)
from gauss_plugins.data.locate import data_root, load_configured_dataset, locate_dataset
from gauss_plugins.data.registry import dataset_names, load_dataset, load_movielens_25m
from gauss_plugins.data.sequences import UserSequences, from_events
from gauss_plugins.data.split import EvalExamples, LeaveOneOutSplit, leave_one_out
from gauss_plugins.data.synthetic import synthetic_event_stream

__all__ = [
    "DATASETS",
    "DownloadError",
    "EvalExamples",
    "LeaveOneOutSplit",
    "UserSequences",
    "data_root",
    "dataset_names",
    "download_dataset",
    "from_events",
    "leave_one_out",
    "load_configured_dataset",
    "load_dataset",
    "load_movielens_100k",
    "load_movielens_1m",
    "load_movielens_25m",
    "load_movielens_csv",
    "load_sequence_file",
    "locate_dataset",
    "synthetic_event_stream",
]
