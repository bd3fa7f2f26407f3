"""Serve a ranker package from Python: fetch rows, batch requests, score candidates.

Request format (shared with the C++ runner), text, one request per line::

    <history item ids, space-separated> | <candidate item ids, space-separated>

Output: one line per request, the candidates' scores in request order, space-separated,
each printed with ``"%.9g"``. Blank lines and lines starting with ``#`` are skipped (they
produce no output line). A history longer than the package's ``max_seq_len`` keeps its most
recent items, as training keeps the last ``max_len`` events of a sequence.

Rows come from a :class:`~gauss_plugins.export.snapshot.Snapshot` or any embedding store
with ``lookup(ids) -> Lookup(values, found)`` (WePS, a WePS snapshot, RedisWePS). An id
without a row is an :class:`~gauss_plugins.export.snapshot.UnknownItemError` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from gauss_plugins.export.aoti import LoadedPackage, load_package
from gauss_plugins.export.snapshot import Snapshot, UnknownItemError

__all__ = ["Predictor", "Request", "RequestFormatError", "format_scores", "parse_requests", "StoreRows"]


class RequestFormatError(ValueError):
    """A request line does not follow ``<history ids> | <candidate ids>``."""


@dataclass(frozen=True)
class Request:
    history: Tuple[int, ...]
    candidates: Tuple[int, ...]
    line: int = 0


def _ids(text: str, what: str, line: int) -> Tuple[int, ...]:
    out = []
    for token in text.split():
        try:
            value = int(token, 10)
        except ValueError:
            raise RequestFormatError(f"line {line}: {what} id {token!r} is not an integer") from None
        if not -2 ** 63 <= value < 2 ** 63:
            raise RequestFormatError(f"line {line}: {what} id {token} does not fit in int64")
        out.append(value)
    return tuple(out)


def parse_requests(lines: Iterable[str]) -> Iterator[Request]:
    """Requests of the text format (see the module docstring), with their line numbers."""
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.count("|") != 1:
            raise RequestFormatError(f"line {number}: expected '<history ids> | <candidate ids>' (one '|'), "
                                     f"got {text[:80]!r}")
        history, candidates = text.split("|")
        req = Request(_ids(history, "history", number), _ids(candidates, "candidate", number), number)
        if not req.candidates:
            raise RequestFormatError(f"line {number}: no candidate ids after '|'")
        yield req


def format_scores(scores: Sequence[float]) -> str:
    return " ".join("%.9g" % float(s) for s in scores)


class StoreRows:
    """Rows from an embedding store (WePS, its snapshots, RedisWePS): ``lookup`` must return
    an object with ``values [n, dim]`` and ``found [n]``."""

    def __init__(self, store, name: Optional[str] = None) -> None:
        self.store = store
        self.source = name or type(store).__name__
        self.dim = int(store.dim)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.store.lookup(ids)
        found = result.found
        if not bool(found.all()):
            raise UnknownItemError(int(ids[~found][0]), self.source)
        return result.values.to(torch.float32)


RowSource = Union[Snapshot, StoreRows]


class Predictor:
    """Rank candidates with a ``.pt2`` ranker package and a row source.

    ``batch_size`` users are scored per call of the package; padding (history to the batch's
    longest, candidates to the batch's most) is zeros and never changes a score.
    """

    def __init__(self, package: Union[str, LoadedPackage], rows, batch_size: int = 256) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.package = package if isinstance(package, LoadedPackage) else load_package(package)
        if not isinstance(rows, (Snapshot, StoreRows)):
            rows = StoreRows(rows)
        if rows.dim != self.package.dim:
            raise ValueError(f"the rows have dim {rows.dim} but the package {self.package.path} expects "
                             f"dim {self.package.dim}: serve it with the embeddings of the model it was exported from")
        self.rows = rows
        self.batch_size = batch_size
        self.max_history = self.package.max_history

    @property
    def timed(self) -> bool:
        return self.package.timed

    def rank(self, requests: Sequence[Request], history_times: Optional[Sequence[Sequence[int]]] = None,
             candidate_times: Optional[Sequence[Sequence[int]]] = None) -> List[torch.Tensor]:
        """Scores ``[len(candidates)]`` for each request, in order. A package of a model with a
        time bias needs ``history_times`` and ``candidate_times`` (per request, seconds)."""
        if self.timed and (history_times is None or candidate_times is None):
            raise ValueError(f"{self.package.path} was exported from a model with a time bias: give history_times and "
                             "candidate_times (the text request format carries no times; use Predictor.rank)")
        if not self.timed and (history_times is not None or candidate_times is not None):
            raise ValueError(f"{self.package.path} takes no times (its model has no time bias)")
        for i, req in enumerate(requests):
            if not req.candidates:
                raise ValueError(f"request {req.line or i + 1} has no candidates")
            if self.timed and (len(history_times[i]) != len(req.history)
                               or len(candidate_times[i]) != len(req.candidates)):
                raise ValueError(f"request {req.line or i + 1}: times must match the ids one to one")
        out: List[torch.Tensor] = []
        for start in range(0, len(requests), self.batch_size):
            stop = start + self.batch_size
            times = (history_times[start:stop], candidate_times[start:stop]) if self.timed else None
            out.extend(self._rank_batch(requests[start:stop], times))
        return out

    def _rank_batch(self, batch: Sequence[Request], times) -> List[torch.Tensor]:
        keep = self.max_history
        histories = [r.history[-keep:] for r in batch]  # keep >= 2: a package never has max_seq_len 0
        b = len(batch)
        n = max(1, max(len(h) for h in histories))
        m = max(len(r.candidates) for r in batch)
        # Every id of the batch is fetched once: a store round trip per batch, not per user.
        all_ids = torch.tensor([i for h in histories for i in h] + [i for r in batch for i in r.candidates],
                               dtype=torch.int64)
        uniq, inverse = torch.unique(all_ids, return_inverse=True)
        table = self.rows.lookup(uniq)
        rows = table[inverse]
        history = torch.zeros(b, n, self.package.dim)
        candidates = torch.zeros(b, m, self.package.dim)
        at = 0
        for i, h in enumerate(histories):
            history[i, :len(h)] = rows[at:at + len(h)]
            at += len(h)
        for i, r in enumerate(batch):
            candidates[i, :len(r.candidates)] = rows[at:at + len(r.candidates)]
            at += len(r.candidates)
        lens = torch.tensor([len(h) for h in histories], dtype=torch.int64)
        args: Tuple[torch.Tensor, ...] = (history, lens, candidates)
        if times is not None:
            ht = torch.zeros(b, n, dtype=torch.int64)
            ct = torch.zeros(b, m, dtype=torch.int64)
            for i, (h_t, c_t) in enumerate(zip(*times)):
                h_t = list(h_t)[-keep:]
                ht[i, :len(h_t)] = torch.tensor(h_t, dtype=torch.int64)
                ct[i, :len(c_t)] = torch.tensor(list(c_t), dtype=torch.int64)
            args = args + (ht, ct)
        with torch.no_grad():
            scores = self.package(*args)
        return [scores[i, :len(r.candidates)].clone() for i, r in enumerate(batch)]

    def serve(self, lines: Iterable[str], out: IO[str]) -> int:
        """Read requests (text format), write one line of scores per request; returns the count.
        Requests are scored ``batch_size`` at a time; a bad line stops before any of its batch
        is written."""
        if self.timed:
            raise ValueError(f"{self.package.path} was exported from a model with a time bias; the text request "
                             "format carries no times. Export a model without a time bias (model.num_time_buckets: "
                             "0) to serve it from text, or call Predictor.rank with times")
        count = 0
        pending: List[Request] = []
        for req in parse_requests(lines):
            pending.append(req)
            if len(pending) == self.batch_size:
                count += self._flush(pending, out)
                pending = []
        if pending:
            count += self._flush(pending, out)
        return count

    def _flush(self, pending: List[Request], out: IO[str]) -> int:
        for scores in self.rank(pending):
            out.write(format_scores(scores.tolist()) + "\n")
        out.flush()
        return len(pending)
