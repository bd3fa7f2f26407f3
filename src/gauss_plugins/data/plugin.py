"""Registers the built-in event sources (kind ``dataset``).

Every factory takes ``path`` (ignored by ``synthetic``) plus its own keyword options and
returns a :class:`gauss_plugins.data.UserSequences`. Factories are import paths: listing
datasets imports nothing.
"""
from __future__ import annotations

from gauss_plugins.components import Component
from gauss_plugins.plugins import hookimpl


@hookimpl
def gauss_register_datasets():
    return [
        Component("dataset", "ml-100k", "gauss_plugins.data.loaders:load_movielens_100k",
                  description="MovieLens 100K u.data (user, item, rating, timestamp); all ratings are interactions"),
        Component("dataset", "ml-1m", "gauss_plugins.data.loaders:load_movielens_1m",
                  description="MovieLens 1M: GroupLens ratings.dat (UserID::MovieID::Rating::Timestamp) "
                              "or the sequence file ml-1m_seq.txt (user item item ..., no timestamps)"),
        Component("dataset", "ml-20m", "gauss_plugins.data.loaders:load_movielens_csv",
                  description="MovieLens 20M ratings.csv (userId,movieId,rating,timestamp)"),
        Component("dataset", "ml-25m", "gauss_plugins.data.registry:load_movielens_25m",
                  description="MovieLens 25M ratings.csv (same format as 20M)"),
        Component("dataset", "seqfile", "gauss_plugins.data.loaders:load_sequence_file",
                  description="plain sequence file: one line per user, 'user_id item_id item_id ...', oldest first"),
        Component("dataset", "synthetic", "gauss_plugins.data.synthetic:synthetic_event_stream",
                  description="synthetic stream: Zipf item popularity, users whose interests drift, timestamps"),
    ]
