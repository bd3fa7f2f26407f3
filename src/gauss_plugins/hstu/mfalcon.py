"""M-FALCON inference: score many candidates per user in one pass, with a cached history.

Each user ``b`` has a history (``n_b`` rows) and ``m_b`` candidates. Candidates are scored in
micro-batches (*rounds*) of at most ``micro_batch_size`` per user: round ``r`` appends
candidates ``r*mb .. (r+1)*mb - 1`` of every user to that user's history and runs the
encoder with ``num_targets`` = the number appended, so each candidate attends to the
history and to itself, never to another candidate
(:func:`~gauss_plugins.hstu.attention.attention_mask`). A candidate's output depends on
its place in its round (the relative position bias sees position ``n_b + t``), so the
micro-batch size is part of the result, as in the paper.

Under a causal mask the history never attends to candidates, so its keys and values in
every block are the same in every round. :meth:`MFalcon.encode_history` computes them once
(:class:`HistoryCache`); :meth:`MFalcon.score_cached` then runs only the candidate rows
through the blocks, attending to the cached keys/values plus their own: per round
``O(C * (n + C))`` attention instead of ``O((n + C)^2)``, and no block MLP work on the
history. :meth:`MFalcon.score` is the same computation without the cache (one encoder
pass per round over history + candidates); the two agree, which the tests check.

Requirements for the cache to be exact: a causal mask and ``normalizer="max_seq_len"``
(with ``"seq_len"`` the history rows would be divided by a length that includes the
round's candidates), and the encoder in eval mode (no dropout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from gauss_plugins.hstu.attention import attention_mask
from gauss_plugins.hstu.modules import HSTUBlock, HSTUEncoder
from gauss_plugins.jagged import lengths_to_offsets, pad, row_coordinates, unpad, validate_offsets

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
    n_hist = history_offsets[1:] - history_offsets[:-1]
    n_tgt = target_offsets[1:] - target_offsets[:-1]
    offsets = lengths_to_offsets(n_hist + n_tgt)
    seq_h, pos_h = row_coordinates(history_offsets, history.shape[0])
    seq_t, pos_t = row_coordinates(target_offsets, targets.shape[0])
    hist_rows = offsets[seq_h] + pos_h
    target_rows = offsets[seq_t] + n_hist[seq_t] + pos_t
    values = history.new_empty((history.shape[0] + targets.shape[0], *history.shape[1:]))
    values[hist_rows] = history
    values[target_rows] = targets
    return values, offsets, n_tgt, target_rows


class MFalcon:
    """M-FALCON candidate scoring with an :class:`~gauss_plugins.hstu.modules.HSTUEncoder`.

    ``score*`` methods return the encoder output at each candidate row, ``[C, dim]`` in the
    candidates' jagged layout; the caller turns them into scores (e.g. a dot product with the
    candidate item embedding, or a ranking head).
    """

    def __init__(self, encoder: HSTUEncoder, micro_batch_size: int = 64) -> None:
        if not isinstance(encoder, HSTUEncoder):
            raise TypeError(f"M-FALCON needs an HSTUEncoder, got {type(encoder).__name__}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        self.encoder = encoder
        self.micro_batch_size = micro_batch_size

    # ------------------------------------------------------------------ rounds
    def _rounds(self, candidates: torch.Tensor, candidate_offsets: torch.Tensor,
                history_lengths: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(rows of candidates, offsets of the round)`` for each micro-batch round."""
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
        for r in range(rounds):
            in_round = (counts - r * mb).clamp(min=0, max=mb)
            round_offsets = lengths_to_offsets(in_round)
            seq, pos = row_coordinates(round_offsets, int(round_offsets[-1]))
            yield candidate_offsets[seq] + r * mb + pos, round_offsets

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
        self._check(history, history_offsets, history_timestamps)
        self._check(candidates, candidate_offsets, candidate_timestamps)
        _check_times(history_timestamps, candidate_timestamps)
        out = candidates.new_empty(candidates.shape)
        for rows, round_offsets in self._rounds(candidates, candidate_offsets, history_offsets.diff()):
            x, offsets, num_targets, target_rows = append_targets(history, history_offsets, candidates[rows],
                                                                  round_offsets)
            times = None
            if history_timestamps is not None:
                times = append_targets(history_timestamps, history_offsets, candidate_timestamps[rows],
                                       round_offsets)[0]
            out[rows] = self.encoder(x, offsets, times, num_targets)[target_rows]
        return out

    # ------------------------------------------------------------------ with cache
    @torch.no_grad()
    def encode_history(self, history: torch.Tensor, history_offsets: torch.Tensor,
                       history_timestamps: Optional[torch.Tensor] = None) -> HistoryCache:
        """Run the history through the blocks once and keep every block's keys and values."""
        self._check(history, history_offsets, history_timestamps)
        keys, values = [], []
        x = history
        for block in self.encoder.blocks:
            u, q, k, v = block.project(x)
            keys.append(k)
            values.append(v)
            x = block.combine(x, u, block.attend(q, k, v, history_offsets, history_timestamps))
        return HistoryCache(history_offsets, history_timestamps, keys, values)

    @torch.no_grad()
    def score_cached(self, cache: HistoryCache, candidates: torch.Tensor, candidate_offsets: torch.Tensor,
                     candidate_timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same result as :meth:`score`, attending to the cached history keys/values."""
        self._check(candidates, candidate_offsets, candidate_timestamps)
        _check_times(cache.timestamps, candidate_timestamps)
        if len(cache.keys) != len(self.encoder.blocks):
            raise ValueError(f"the cache holds {len(cache.keys)} blocks, the encoder has {len(self.encoder.blocks)}")
        out = candidates.new_empty(candidates.shape)
        for rows, round_offsets in self._rounds(candidates, candidate_offsets, cache.lengths):
            x = candidates[rows]
            times = candidate_timestamps[rows] if candidate_timestamps is not None else None
            for i, block in enumerate(self.encoder.blocks):
                u, q, k, v = block.project(x)
                attn = _attend_with_history(block, q, k, v, round_offsets, times, cache, i)
                x = block.combine(x, u, attn)
            out[rows] = self.encoder.finish(x)
        return out


def _check_times(history_timestamps: Optional[torch.Tensor], candidate_timestamps: Optional[torch.Tensor]) -> None:
    if (history_timestamps is None) != (candidate_timestamps is None):
        raise ValueError("give timestamps for both the history and the candidates, or for neither")


def _attend_with_history(block: HSTUBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         round_offsets: torch.Tensor, times: Optional[torch.Tensor], cache: HistoryCache,
                         index: int) -> torch.Tensor:
    """HSTU attention of the round's candidate rows (queries) over the cached history of
    their user plus the round's own rows, exactly as the full ``[history ; candidates]``
    sequence with ``num_targets`` computes those rows. Dense over ``max_seq_len`` keys."""
    config = block.config
    n = config.max_seq_len
    n_hist = cache.lengths
    n_cand = round_offsets[1:] - round_offsets[:-1]
    batch = n_hist.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    seq, pos = row_coordinates(round_offsets, q.shape[0])
    full_pos = n_hist[seq] + pos  # position of each candidate in its [history ; round] sequence

    # keys/values of the full sequences, padded to max_seq_len: cached history, then the round
    k_full, _ = pad(cache.keys[index].to(acc), cache.offsets, n)
    v_full, _ = pad(cache.values[index].to(acc), cache.offsets, n)
    k_full[seq, full_pos] = k.to(acc)
    v_full[seq, full_pos] = v.to(acc)

    widest = int(n_cand.max()) if batch else 0
    q_pad, q_valid = pad(q.to(acc), round_offsets, widest)  # [B, C, H, d_qk]
    query_pos = (n_hist.view(-1, 1) + torch.arange(widest, device=q.device)).clamp(max=n - 1)  # [B, C]
    scores = torch.einsum("bchd,bjhd->bhcj", q_pad, k_full) * config.alpha

    key_pos = torch.arange(n, device=q.device)
    query_time = key_time = None
    if times is not None and block.relative_bias.time_weight is not None:
        key_time, _ = pad(cache.timestamps, cache.offsets, n)
        key_time[seq, full_pos] = times
        query_time = key_time.gather(1, query_pos)
    rab = block.relative_bias.bias(query_pos, key_pos, query_time, key_time)
    if rab is not None:
        scores = scores + rab.to(acc)

    full_mask = attention_mask(n_hist + n_cand, n, causal=True, num_targets=n_cand,
                               contextual_len=config.contextual_len, max_attn_len=config.max_attn_len)
    rows_mask = full_mask.gather(1, query_pos.unsqueeze(-1).expand(batch, widest, n)) & q_valid.unsqueeze(-1)
    probs = torch.where(rows_mask.unsqueeze(1), F.silu(scores) / n, scores.new_zeros(()))
    out = torch.einsum("bhcj,bjhd->bchd", probs, v_full)
    return unpad(out, round_offsets).to(v.dtype)
