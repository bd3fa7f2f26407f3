"""Loaders: MovieLens 100K / 1M / 20M / 25M and a plain sequence file, to :class:`UserSequences`.

Every rating counts as an interaction (the generative-recommenders protocol uses all ML-1M
ratings, whatever their value). A path may name the rating file itself or the folder that
holds it (``ml-100k/`` -> ``u.data``, ``ml-1m/`` -> ``ratings.dat`` or the sequence file
``ml-1m_seq.txt``, ``ml-20m/`` -> ``ratings.csv``). Malformed input raises ``ValueError`` naming the file and the line.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np

from gauss_plugins.data.sequences import UserSequences, from_events

__all__ = [
    "ML1M_SEQUENCE_FILE",
    "load_movielens_100k",
    "load_movielens_1m",
    "load_movielens_csv",
    "load_sequence_file",
    "resolve_rating_file",
]

_RATING_FILES = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-20m": "ratings.csv", "ml-25m": "ratings.csv"}


def resolve_rating_file(path: str, kind: str) -> str:
    """The rating file of dataset ``kind`` at ``path`` (the file, or a folder holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, _RATING_FILES[kind])
        if not os.path.isfile(candidate):
            raise FileNotFoundError(
                f"{path} is a folder without {_RATING_FILES[kind]}; point --data-path at the extracted "
                f"{kind} folder (get it with `gauss data download {kind.replace('ml-', 'movielens-')}`)")
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {kind} data at {path}; download it with `gauss data download {kind.replace('ml-', 'movielens-')}` "
            f"or pass --data-path to the folder holding {_RATING_FILES[kind]}")
    return path


def _parse_numeric(path: str, text: str, delimiter: Optional[str], ncols: int, first_line: int) -> np.ndarray:
    """Parse a table of ``ncols`` numbers a line into a float64 array of shape (rows, ncols).

    numpy's C parser does the work (20M lines in seconds); any token it cannot read, or a
    line with the wrong number of fields, is reported with its line number.
    """
    if delimiter is not None:
        text = text.replace(delimiter, " ")
    try:
        with warnings.catch_warnings():
            # numpy < 2.3 stops at a bad token with a DeprecationWarning instead of raising;
            # the count check below catches that case.
            warnings.simplefilter("ignore", DeprecationWarning)
            flat = np.fromstring(text, dtype=np.float64, sep=" ")
    except ValueError:
        flat = None
    # Cheap row count first (no per-line Python objects for 20M lines); the line-by-line
    # pass runs only when the counts disagree, to find the offending line or blank lines.
    rows = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    if flat is not None and flat.size == rows * ncols:
        return flat.reshape(rows, ncols)
    rows = 0
    for i, ln in enumerate(text.splitlines()):
        fields = ln.split()
        if not fields:
            continue
        rows += 1
        bad = len(fields) != ncols
        if not bad:
            try:
                [float(f) for f in fields]
            except ValueError:
                bad = True
        if bad:
            raise ValueError(f"{path}: line {i + first_line}: expected {ncols} numeric fields, got {ln.strip()[:120]!r}")
    if flat is None or flat.size != rows * ncols:
        raise ValueError(f"{path}: could not parse the file as {ncols} numeric columns")
    return flat.reshape(rows, ncols)


def _ids(path: str, column: np.ndarray, what: str) -> np.ndarray:
    ids = column.astype(np.int64)
    if np.any(ids != column) or (len(ids) and ids.min() < 1):
        row = int(np.nonzero((ids != column) | (ids < 1))[0][0])
        raise ValueError(f"{path}: {what} ids must be positive integers; data row {row + 1} has {column[row]!r}")
    return ids


def _from_table(path: str, table: np.ndarray, name: str) -> UserSequences:
    users = _ids(path, table[:, 0], "user")
    items = _ids(path, table[:, 1], "item")
    timestamps = table[:, 3].astype(np.int64)
    return from_events(users, items, timestamps, name=name, info={"source": os.path.abspath(path)})


def _read_text(path: str) -> str:
    # latin-1 maps every byte, so a stray byte in a numeric file surfaces as a parse error with
    # its line number rather than as a UnicodeDecodeError without one.
    with open(path, "r", encoding="latin-1") as f:
        return f.read()


def load_movielens_100k(path: str) -> UserSequences:
    """MovieLens 100K ``u.data``: ``user \\t item \\t rating \\t timestamp``."""
    path = resolve_rating_file(path, "ml-100k")
    table = _parse_numeric(path, _read_text(path), "\t", 4, first_line=1)
    return _from_table(path, table, "ml-100k")


ML1M_SEQUENCE_FILE = "ml-1m_seq.txt"


def load_movielens_1m(path: str) -> UserSequences:
    """MovieLens 1M in either of the forms it is distributed in:

    * GroupLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), with timestamps;
    * the per-user sequence file ``ml-1m_seq.txt`` (``user item item ...``, oldest first) of
      the BERT4Rec / SASRec line of work, as in ``../shared/data/ml-1m/``: the same events in
      the same order, but **no timestamps** (HSTU's time bias cannot be used on it).

    ``path`` is either file, or a folder holding one (``ratings.dat`` wins when both are
    there, since it has the times). A file is recognised by its first data line (``::``
    separators mean ``ratings.dat``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        ratings = os.path.join(path, _RATING_FILES["ml-1m"])
        sequences = os.path.join(path, ML1M_SEQUENCE_FILE)
        if os.path.isfile(ratings):
            path = ratings
        elif os.path.isfile(sequences):
            return load_sequence_file(sequences, name="ml-1m")
        else:
            raise FileNotFoundError(
                f"{path} holds neither {_RATING_FILES['ml-1m']} (GroupLens) nor {ML1M_SEQUENCE_FILE} (sequences); "
                "point --data-path at the extracted ml-1m folder or at either file (get the GroupLens one with "
                "`gauss data download movielens-1m`)")
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"no ml-1m data at {path}; download it with `gauss data download movielens-1m` or pass --data-path to "
            f"the folder holding {_RATING_FILES['ml-1m']} or {ML1M_SEQUENCE_FILE}")
    elif "::" not in _first_data_line(path):
        return load_sequence_file(path, name="ml-1m")
    table = _parse_numeric(path, _read_text(path), "::", 4, first_line=1)
    return _from_table(path, table, "ml-1m")


def _first_data_line(path: str) -> str:
    """The first line that is neither blank nor a ``#`` comment ('' for none)."""
    with open(path, "r", encoding="latin-1") as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                return line
    return ""


def load_movielens_csv(path: str, name: str = "ml-20m") -> UserSequences:
    """MovieLens 20M / 25M ``ratings.csv``: header ``userId,movieId,rating,timestamp``."""
    path = resolve_rating_file(path, name if name in _RATING_FILES else "ml-20m")
    text = _read_text(path)
    header, sep, body = text.partition("\n")
    if header.strip().lower().replace(" ", "") != "userid,movieid,rating,timestamp":
        raise ValueError(f"{path}: expected the header 'userId,movieId,rating,timestamp', got {header.strip()[:120]!r}")
    table = _parse_numeric(path, body, ",", 4, first_line=2)
    return _from_table(path, table, name)


def load_sequence_file(path: str, name: str = "seqfile") -> UserSequences:
    """A plain sequence file: one line per user, ``user_id item_id item_id ...``, oldest first.

    Whitespace separated; blank lines and lines starting with ``#`` are skipped; a user id
    may appear only once. There are no timestamps: the line order is the time order.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sequence file at {path} (expected lines 'user_id item_id item_id ...')")
    user_ids, lengths, chunks = [], [], []
    seen = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                values = [int(x) for x in fields]
            except ValueError:
                raise ValueError(f"{path}: line {lineno}: ids must be integers, got {line.strip()[:120]!r}") from None
            if len(values) < 2:
                raise ValueError(f"{path}: line {lineno}: a user line needs at least one item after the user id")
            user, seq = values[0], values[1:]
            if min(seq) < 1:
                raise ValueError(f"{path}: line {lineno}: item ids must be >= 1 (0 is reserved for padding)")
            if user in seen:
                raise ValueError(f"{path}: line {lineno}: user {user} already appeared on line {seen[user]}")
            seen[user] = lineno
            user_ids.append(user)
            lengths.append(len(seq))
            chunks.append(np.asarray(seq, dtype=np.int64))
    if not user_ids:
        raise ValueError(f"{path}: no user lines found")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Keep users in file order: the file is the user's statement of what belongs together.
    return UserSequences(
        user_ids=np.asarray(user_ids, dtype=np.int64),
        offsets=offsets,
        items=np.concatenate(chunks),
        timestamps=None,
        name=name,
        info={"source": os.path.abspath(path)},
    )
