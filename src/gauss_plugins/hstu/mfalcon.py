"""M-FALCON inference: score many candidates per user in one pass, with a cached history.

Each user ``b`` has a history (``n_b`` rows) and ``m_b`` candidates. Candidates are scored in
micro-batches (*rounds*) of at most ``micro_batch_size`` per user: round ``r`` appends
candidates ``r*mb .. (r+1)*mb - 1`` of every user to that user's history and runs the
encoder with ``num_targets`` = the number appended. As the paper defines M-FALCON, a
candidate attends to the history and to itself, never to another candidate
(:func:`~gauss_plugins.hstu.attention.attention_mask`), and its relative bias does not see
its slot either: all targets share the position id of the first target (``n_b``), and a
target's time bias uses its own time (see
:class:`~gauss_plugins.hstu.modules.RelativeAttentionBias`). So a candidate's output depends
on the history and on the candidate alone: permuting the candidates permutes the outputs,
and the micro-batch size changes only the cost, not the result.

Under a causal mask the history never attends to candidates and its bias does not involve
them (the last history row's ``t_next`` is its own time whether or not targets follow), so
the history's keys and values in every block are the same in every round.
:meth:`MFalcon.encode_history` computes them once (:class:`HistoryCache`);
:meth:`MFalcon.score_cached` then runs only the candidate rows through the blocks'
projections, norms and output layers. Since rounds no longer depend on each other, it runs
many at once: every (user, round) pair with candidates is one sequence ``[cached history
K/V ; that round's candidates' K/V]`` of a jagged batch, and each block's attention is one
:func:`~gauss_plugins.hstu.attention.hstu_attention` call on it with ``num_targets`` = the
candidates of each pair, so on CUDA it is one launch of the fused kernel with the
``num_targets`` mask (not a dense einsum) for all the rounds of a pass. A pass holds as
many rounds as ``pass_budget`` allows (sequences x ``max_seq_len^2``, what the dense
reference backend materialises). The history rows'
queries are zeros and their outputs are dropped; they still cost attention FLOPs (the op
computes every row), so a round's attention costs what it costs uncached, and the history
keys/values are repeated once per round (memory ``O(rounds * history)`` rows per block).
:meth:`MFalcon.score` is the definition without the cache (one full encoder pass per round
over history + candidates); the two agree, which the tests check.

Requirements for the cache to be exact: a causal mask and ``normalizer="max_seq_len"``
(with ``"seq_len"`` the history rows would be divided by a length that includes the
round's candidates), and the encoder in eval mode (no dropout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from gauss_plugins.hstu.modules import HSTUEncoder
from gauss_plugins.jagged import lengths_to_offsets, row_coordinates, validate_offsets

__all__ = ["HistoryCache", "MFalcon", "append_targets"]


@dataclass
class HistoryCache:
    """What :meth:`MFalcon.score_cached` needs of the history: its layout, its timestamps,
    and the keys ``[T_h, H, d_qk]`` and values ``[T_h, H, d_v]`` of every block."""

    offsets: torch.Tensor
    timestamps: Optional[torch.Tensor]
    keys: List[torch.Tensor]
    values: List[torch.Tensor]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class _AppendLayout:
    """Where each row of the jagged ``[history_b ; targets_b]`` comes from, computed once and
    applied to values, keys, timestamps... alike (any trailing shape)."""

    def __init__(self, history_offsets: torch.Tensor, target_offsets: torch.Tensor, history_rows: int,
                 target_rows: int) -> None:
        n_hist = history_offsets[1:] - history_offsets[:-1]
        self.num_targets = target_offsets[1:] - target_offsets[:-1]
        self.offsets = lengths_to_offsets(n_hist + self.num_targets)
        seq_h, pos_h = row_coordinates(history_offsets, history_rows)
        seq_t, pos_t = row_coordinates(target_offsets, target_rows)
        self.history_rows = self.offsets[seq_h] + pos_h
        self.target_rows = self.offsets[seq_t] + n_hist[seq_t] + pos_t
        self.total = history_rows + target_rows

    def merge(self, history: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``[history_b ; targets_b]``; with ``history=None`` the history rows are zeros."""
        values = targets.new_zeros((self.total, *targets.shape[1:]))
        if history is not None:
            values[self.history_rows] = history
        values[self.target_rows] = targets
        return values


def append_targets(history: torch.Tensor, history_offsets: torch.Tensor, targets: torch.Tensor,
                   target_offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jagged ``[history_b ; targets_b]`` per sequence.

    Returns ``(values, offsets, num_targets, target_rows)``: ``target_rows[i]`` is the row of
    ``values`` that holds ``targets[i]``. Works on any trailing shape (values or timestamps).
    """
    validate_offsets(history_offsets, history.shape[0], name="history_offsets")
    validate_offsets(target_offsets, targets.shape[0], name="target_offsets")
    if history_offsets.shape != target_offsets.shape:
        raise ValueError(f"history has {history_offsets.shape[0] - 1} sequences but targets "
                         f"{target_offsets.shape[0] - 1}")
    if history.shape[1:] != targets.shape[1:]:
        raise ValueError(f"history rows {tuple(history.shape[1:])} and target rows {tuple(targets.shape[1:])} differ")
    layout = _AppendLayout(history_offsets, target_offsets, history.shape[0], targets.shape[0])
    return layout.merge(history, targets), layout.offsets, layout.num_targets, layout.target_rows


class MFalcon:
    """M-FALCON candidate scoring with an :class:`~gauss_plugins.hstu.modules.HSTUEncoder`.

    ``score*`` methods return the encoder output at each candidate row, ``[C, dim]`` in the
    candidates' jagged layout; the caller turns them into scores (e.g. a dot product with the
    candidate item embedding, or a ranking head).
    """

    def __init__(self, encoder: HSTUEncoder, micro_batch_size: int = 64, pass_budget: int = 1 << 22) -> None:
        if not isinstance(encoder, HSTUEncoder):
            raise TypeError(f"M-FALCON needs an HSTUEncoder, got {type(encoder).__name__}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        if not isinstance(pass_budget, int) or isinstance(pass_budget, bool) or pass_budget < 1:
            raise ValueError(f"pass_budget must be a positive int, got {pass_budget!r}")
        self.encoder = encoder
        self.micro_batch_size = micro_batch_size
        # score_cached groups rounds into passes of at most this many (sequences x
        # max_seq_len^2) attention entries: what the dense reference backend materialises
        # (the fused kernel needs far less), so memory stays bounded however many rounds.
        # 4M: on the 2-core CPU machine a 16M pass ran ~2x slower per entry than 4M ones
        # (B=32, N=264, reference backend, 2026-11-29); smaller passes pay per-call overhead.
        self.pass_budget = pass_budget

    # ------------------------------------------------------------------ rounds
    def _round_counts(self, candidates: torch.Tensor, candidate_offsets: torch.Tensor,
                      history_lengths: torch.Tensor) -> torch.Tensor:
        """``[rounds, B]``: how many candidates of each user go into each round."""
        validate_offsets(candidate_offsets, candidates.shape[0], name="candidate_offsets")
        if candidate_offsets.shape[0] != history_lengths.shape[0] + 1:
            raise ValueError(f"candidates describe {candidate_offsets.shape[0] - 1} users but the history "
                             f"{history_lengths.shape[0]}")
        counts = candidate_offsets[1:] - candidate_offsets[:-1]
        mb = self.micro_batch_size
        longest = int((history_lengths + counts.clamp(max=mb)).max()) if counts.numel() else 0
        if longest > self.encoder.config.max_seq_len:
            raise ValueError(
                f"history + one micro-batch of candidates reaches {longest} rows, more than max_seq_len="
                f"{self.encoder.config.max_seq_len}; use a smaller micro_batch_size or a shorter history")
        rounds = -(-int(counts.max()) // mb) if counts.numel() else 0
        first = torch.arange(rounds, device=counts.device).view(-1, 1) * mb
        return (counts.view(1, -1) - first).clamp(min=0, max=mb)

    def _rounds(self, candidates: torch.Tensor, candidate_offsets: torch.Tensor,
                history_lengths: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(rows of candidates, offsets of the round)`` for each micro-batch round."""
        in_rounds = self._round_counts(candidates, candidate_offsets, history_lengths)
        for r, in_round in enumerate(in_rounds):
            round_offsets = lengths_to_offsets(in_round)
            seq, pos = row_coordinates(round_offsets, int(round_offsets[-1]))
            yield candidate_offsets[seq] + r * self.micro_batch_size + pos, round_offsets

    def _check(self, x: torch.Tensor, offsets: torch.Tensor, timestamps: Optional[torch.Tensor]) -> None:
        config = self.encoder.config
        if not config.causal or config.normalizer != "max_seq_len":
            raise ValueError("M-FALCON needs a causal encoder with normalizer='max_seq_len' "
                             f"(got causal={config.causal}, normalizer={config.normalizer!r})")
        if self.encoder.training and config.dropout > 0:
            raise RuntimeError("M-FALCON is inference: call encoder.eval() first (dropout would differ per round)")
        self.encoder.check_inputs(x, offsets, timestamps)
        validate_offsets(offsets, x.shape[0])

    # ------------------------------------------------------------------ without cache
    @torch.no_grad()
    def score(self, history: torch.Tensor, history_offsets: torch.Tensor, candidates: torch.Tensor,
              candidate_offsets: torch.Tensor, history_timestamps: Optional[torch.Tensor] = None,
              candidate_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One encoder pass per round over ``[history ; round's candidates]`` with the
        ``num_targets`` mask (runs on the fused attention backend where there is one)."""
        _check_times(history_timestamps, candidate_timestamps)
        self._check(history, history_offsets, history_timestamps)
        self._check(candidates, candidate_offsets, candidate_timestamps)
        out = candidates.new_empty(candidates.shape)
        for rows, round_offsets in self._rounds(candidates, candidate_offsets, history_offsets.diff()):
            layout = _AppendLayout(history_offsets, round_offsets, history.shape[0], rows.shape[0])
            times = None
            if history_timestamps is not None:
                times = layout.merge(history_timestamps, candidate_timestamps[rows])
            x = layout.merge(history, candidates[rows])
            out[rows] = self.encoder(x, layout.offsets, times, layout.num_targets)[layout.target_rows]
        return out

    # ------------------------------------------------------------------ with cache
    @torch.no_grad()
    def encode_history(self, history: torch.Tensor, history_offsets: torch.Tensor,
                       history_timestamps: Optional[torch.Tensor] = None) -> HistoryCache:
        """Run the history through the blocks once and keep every block's keys and values."""
        self._check(history, history_offsets, history_timestamps)
        times = history_timestamps.to(torch.int64) if history_timestamps is not None else None
        keys, values = [], []
        x = history
        for block in self.encoder.blocks:
            u, q, k, v = block.project(x)
            keys.append(k)
            values.append(v)
            x = block.combine(x, u, block.attend(q, k, v, history_offsets, times))
        return HistoryCache(history_offsets, times, keys, values)

    @torch.no_grad()
    def score_cached(self, cache: HistoryCache, candidates: torch.Tensor, candidate_offsets: torch.Tensor,
                     candidate_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same result as :meth:`score`, attending to the cached history keys/values; all
        rounds in one pass (see the module docstring: one ``hstu_attention`` call with
        ``num_targets`` per block)."""
        _check_times(cache.timestamps, candidate_timestamps)
        self._check(candidates, candidate_offsets, candidate_timestamps)
        if len(cache.keys) != len(self.encoder.blocks):
            raise ValueError(f"the cache holds {len(cache.keys)} blocks, the encoder has {len(self.encoder.blocks)}")
        in_rounds = self._round_counts(candidates, candidate_offsets, cache.lengths)
        out = candidates.new_empty(candidates.shape)
        for first, last in self._passes(in_rounds):
            pairs = _AllRounds(cache.offsets, candidate_offsets, in_rounds[first:last], first,
                               self.micro_batch_size)
            out[pairs.candidate_rows] = self._score_pass(cache, candidates, candidate_timestamps, pairs)
        return out

    def _passes(self, in_rounds: torch.Tensor) -> List[Tuple[int, int]]:
        """Consecutive groups ``[first, last)`` of rounds whose sequences fit the budget
        (at least one round each)."""
        per_pair = self.encoder.config.max_seq_len ** 2
        pairs_per_round = (in_rounds > 0).sum(dim=1).tolist()
        passes, first, used = [], 0, 0
        for r, pairs in enumerate(pairs_per_round):
            if r > first and used + pairs * per_pair > self.pass_budget:
                passes.append((first, r))
                first, used = r, 0
            used += pairs * per_pair
        if pairs_per_round:
            passes.append((first, len(pairs_per_round)))
        return passes

    def _score_pass(self, cache: HistoryCache, candidates: torch.Tensor, candidate_timestamps: Optional[torch.Tensor],
                    pairs: "_AllRounds") -> torch.Tensor:
        """Encoder outputs of the candidate rows ``pairs.candidate_rows``."""
        layout = pairs.layout
        times = None
        if cache.timestamps is not None:
            times = layout.merge(cache.timestamps[pairs.history_rows],
                                 candidate_timestamps[pairs.candidate_rows].to(torch.int64))
        x = candidates[pairs.candidate_rows]
        for block, keys, values in zip(self.encoder.blocks, cache.keys, cache.values):
            u, q, k, v = block.project(x)
            # history queries are zeros: their outputs are not used, only the candidates'
            attn = block.attend(layout.merge(None, q), layout.merge(keys[pairs.history_rows], k),
                                layout.merge(values[pairs.history_rows], v), layout.offsets, times,
                                layout.num_targets)
            x = block.combine(x, u, attn[layout.target_rows])
        return self.encoder.finish(x)


class _AllRounds:
    """Every (user, round) pair of some rounds that has candidates as one sequence
    ``[history ; round]`` (``in_rounds`` ``[rounds, B]`` counts rounds from ``first_round``):
    which cached history rows and which candidate rows feed each pair, and the jagged layout
    of the whole batch (pairs ordered by round, then user)."""

    def __init__(self, history_offsets: torch.Tensor, candidate_offsets: torch.Tensor, in_rounds: torch.Tensor,
                 first_round: int, micro_batch_size: int) -> None:
        pair_round, pair_user = torch.nonzero(in_rounds > 0, as_tuple=True)
        n_hist = (history_offsets[1:] - history_offsets[:-1])[pair_user]
        n_cand = in_rounds[pair_round, pair_user]
        hist_offsets = lengths_to_offsets(n_hist)
        cand_offsets = lengths_to_offsets(n_cand)
        hist_total, cand_total = int(hist_offsets[-1]), int(cand_offsets[-1])
        seq, pos = row_coordinates(hist_offsets, hist_total)
        self.history_rows = history_offsets[pair_user][seq] + pos
        seq, pos = row_coordinates(cand_offsets, cand_total)
        self.candidate_rows = candidate_offsets[pair_user][seq] + (first_round + pair_round[seq]) * micro_batch_size + pos
        self.layout = _AppendLayout(hist_offsets, cand_offsets, hist_total, cand_total)


def _check_times(history_timestamps: Optional[torch.Tensor], candidate_timestamps: Optional[torch.Tensor]) -> None:
    if (history_timestamps is None) != (candidate_timestamps is None):
        raise ValueError("give timestamps for both the history and the candidates, or for neither")
