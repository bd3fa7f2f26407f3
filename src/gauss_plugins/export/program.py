"""The ranker program that is exported: history + candidates -> one score per candidate.

``forward(history [B, N, D] f32, history_len [B] i64, candidates [B, M, D] f32) -> [B, M] f32``

``history`` and ``candidates`` are raw item-embedding rows (what the model's item table, a
WePS store or a snapshot holds for those ids), gathered *outside* the graph so the served
embeddings can change without re-exporting. History rows at or past ``history_len[b]`` are
padding and never influence a score.

What it computes is the trained :class:`~gauss_plugins.models.retrieval.SequentialRetrievalModel`
(HSTU encoder) under M-FALCON (:mod:`gauss_plugins.hstu.mfalcon`):

* inputs as in training: ``row * sqrt(D) + pos_emb[position]``; history row ``i`` sits at
  position ``i``, every candidate at position ``history_len`` (the slot of the next event;
  all candidates share it, as they share the first target's position id in the bias);
* every HSTU block with the M-FALCON mask: history rows attend causally to the history,
  each candidate to the whole history and to itself, never to another candidate, so a
  candidate's score does not depend on which other candidates share the request;
* the score of a candidate is the cosine of its L2-normalised encoder output with its
  L2-normalised item embedding (the dot-product head the M-FALCON module describes).

The attention is written here with plain tensor ops on the padded layout, not through the
``gauss::hstu_attention`` custom op: a custom op would need a Python (or separately built
C++) kernel at serving time, and the package must run without Python. The computation is
split the way M-FALCON makes cheap: history x history (``N^2``), candidates x history
(``M N``) and each candidate with itself (``M``), so 1024 candidates cost about five
histories, not 1024. Parity with the model's own jagged path (``MFalcon.score``) is tested.

Models with a time bias (``num_time_buckets > 0``) take two more inputs, ``history_time
[B, N]`` and ``candidate_time [B, M]`` (int64 seconds; a candidate's time is the time of
the request): :class:`TimedRankerProgram`. The text request format and the C++ runner serve
the three-input form only.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExportError", "RankerProgram", "TimedRankerProgram", "build_ranker", "input_names"]

L2_EPS = 1e-6  # the retrieval model's l2_norm_eps


class ExportError(ValueError):
    """The model cannot be turned into the ranker program (the message says why and what to change)."""


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=L2_EPS)


def input_names(timed: bool) -> Tuple[str, ...]:
    base = ("history", "history_len", "candidates")
    return base + ("history_time", "candidate_time") if timed else base


class RankerProgram(nn.Module):
    """The three-input ranker (see the module docstring). Build it with :func:`build_ranker`."""

    timed = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from gauss_plugins.hstu.modules import PaddedHSTUEncoder
        from gauss_plugins.models.retrieval import SequentialRetrievalModel

        if not isinstance(model, SequentialRetrievalModel):
            raise ExportError(f"expected a SequentialRetrievalModel, got {type(model).__name__}")
        if not isinstance(model.encoder, PaddedHSTUEncoder):
            raise ExportError(f"the ranker program needs the HSTU encoder (model.arch: hstu); this model's encoder is "
                              f"{type(model.encoder).__name__}, which has no M-FALCON candidate mask")
        encoder = model.encoder.encoder
        config = encoder.config
        problems = []
        if not config.causal:
            problems.append("causal: false")
        if config.normalizer != "max_seq_len":
            problems.append(f"normalizer {config.normalizer!r} (history rows would be divided by a length that "
                            "includes the candidates)")
        if config.contextual_len or config.max_attn_len:
            problems.append(f"contextual_len={config.contextual_len}, max_attn_len={config.max_attn_len}")
        if config.max_seq_len != model.max_len:
            problems.append(f"encoder max_seq_len {config.max_seq_len} != model max_len {model.max_len}")
        if model.max_len < 2:
            problems.append("max_len < 2 leaves no position for the candidates")
        if problems:
            raise ExportError("this HSTU model cannot be served with M-FALCON: " + "; ".join(problems)
                              + ". Export a causal model with normalizer max_seq_len and no contextual prefix or "
                              "attention window")
        if self.timed != (config.num_time_buckets > 0):
            raise ExportError("use build_ranker(model): it picks the timed program for models with a time bias")
        self.blocks = encoder.blocks
        self.output_norm = encoder.output_norm
        self.pos_emb = model.pos_emb
        self.dim = int(model.dim)
        self.max_len = int(model.max_len)
        # Candidates take the position after the history, so the longest history is max_len - 1.
        self.max_history = self.max_len - 1
        self.alpha = float(config.alpha)
        self.num_heads = int(config.num_heads)
        self.num_time_buckets = int(config.num_time_buckets)
        self.time_bucket_scale = float(config.time_bucket_scale)

    # ------------------------------------------------------------------ the graph
    def forward(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self._score(history, history_len, candidates, None, None)

    def _score(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
               history_time: Optional[torch.Tensor], candidate_time: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = history.shape
        m = candidates.shape[1]
        L = self.max_len
        # Clamped so that no value of history_len can index outside the position table in the
        # compiled code; the predictors refuse such values with a clear error before this.
        lens = history_len.clamp(min=0, max=n)
        pos = torch.arange(n, device=history.device)
        valid = pos.unsqueeze(0) < lens.unsqueeze(1)                                   # [B, N]
        scale = math.sqrt(self.dim)
        pos_table = self.pos_emb.weight
        xh = (history * scale + pos_table[:n].unsqueeze(0)) * valid.unsqueeze(-1).to(history.dtype)
        xc = candidates * scale + pos_table[lens].unsqueeze(1)                        # [B, M, D]
        x = torch.cat([xh, xc], dim=1)                                                 # [B, N + M, D]

        # Masks and bias indices (shared by every block). Position ids: history row i -> i,
        # every candidate -> history_len (M-FALCON: targets share the first target's id).
        hh_mask = (pos.view(1, n, 1) >= pos.view(1, 1, n)) & valid.unsqueeze(1)       # [B, Nq, Nk]
        ch_mask = valid.unsqueeze(1)                                                   # [B, 1, Nk]
        hh_pos = (pos.view(1, n) - pos.view(n, 1) + L - 1).clamp(0, 2 * L - 2)         # [Nq, Nk]
        ch_pos = (pos.view(1, n) - lens.view(b, 1) + L - 1).clamp(0, 2 * L - 2)        # [B, Nk]
        hh_time = ch_time = None
        if history_time is not None and candidate_time is not None:
            # t_{i+1} by a gather, not a slice: a slice of size N - 1 makes export specialise N = 2
            following = history_time.gather(1, (pos + 1).clamp(max=n - 1).unsqueeze(0).expand(b, n))
            t_next = torch.where(pos.unsqueeze(0) + 1 < lens.unsqueeze(1), following, history_time)
            hh_time = self._buckets(t_next.unsqueeze(2) - history_time.unsqueeze(1))              # [B, Nq, Nk]
            ch_time = self._buckets(candidate_time.unsqueeze(2) - history_time.unsqueeze(1))      # [B, M, Nk]

        heads = self.num_heads
        for block in self.blocks:
            flat = x.reshape(b * (n + m), d)
            u, q, k, v = block.project(flat)
            q = q.reshape(b, n + m, heads, -1)
            k = k.reshape(b, n + m, heads, -1)
            v = v.reshape(b, n + m, heads, -1)
            qh, qc = q[:, :n], q[:, n:]
            kh, kc = k[:, :n], k[:, n:]
            vh, vc = v[:, :n], v[:, n:]
            pos_w = block.relative_bias.position_weight
            time_w = block.relative_bias.time_weight
            s_hh = torch.einsum("bihd,bjhd->bhij", qh, kh) * self.alpha                   # [B, H, N, N]
            s_ch = torch.einsum("bchd,bjhd->bhcj", qc, kh) * self.alpha                   # [B, H, M, N]
            s_cc = (qc * kc).sum(-1).transpose(1, 2) * self.alpha                        # [B, H, M]
            if pos_w is not None:
                s_hh = s_hh + pos_w[hh_pos].view(1, 1, n, n)
                s_ch = s_ch + pos_w[ch_pos].view(b, 1, 1, n)
                s_cc = s_cc + pos_w[L - 1]
            if time_w is not None and hh_time is not None and ch_time is not None:
                s_hh = s_hh + time_w[hh_time].unsqueeze(1)
                s_ch = s_ch + time_w[ch_time].unsqueeze(1)
                s_cc = s_cc + time_w[0]  # a candidate with itself: gap 0 -> bucket 0
            zero = s_hh.new_zeros(())
            p_hh = torch.where(hh_mask.unsqueeze(1), F.silu(s_hh) / L, zero)
            p_ch = torch.where(ch_mask.unsqueeze(1), F.silu(s_ch) / L, zero)
            p_cc = F.silu(s_cc) / L
            a_h = torch.einsum("bhij,bjhd->bihd", p_hh, vh)
            a_c = torch.einsum("bhcj,bjhd->bchd", p_ch, vh) + p_cc.transpose(1, 2).unsqueeze(-1) * vc
            attn = torch.cat([a_h, a_c], dim=1).reshape(b * (n + m), heads, -1)
            x = block.combine(flat, u, attn).reshape(b, n + m, d)
        if self.output_norm is not None:
            x = self.output_norm(x)
        return (_l2(x[:, n:]) * _l2(candidates)).sum(-1)

    def _buckets(self, gap: torch.Tensor) -> torch.Tensor:
        # The attention op's definition (fp32 log of the clamped |gap|, times the fp32
        # reciprocal of the scale, floored), so served buckets equal the trained ones.
        inverse = torch.tensor(1.0 / self.time_bucket_scale, dtype=torch.float32, device=gap.device)
        buckets = torch.floor(torch.log(gap.abs().clamp(min=1).to(torch.float32)) * inverse)
        return buckets.clamp(0, self.num_time_buckets).to(torch.int64)


class TimedRankerProgram(RankerProgram):
    """The ranker of a model with a time bias: two more int64 inputs, the history's event
    times ``[B, N]`` and each candidate's time ``[B, M]`` (the request time)."""

    timed = True

    def forward(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
                history_time: torch.Tensor, candidate_time: torch.Tensor) -> torch.Tensor:
        return self._score(history, history_len, candidates, history_time, candidate_time)


def build_ranker(model: nn.Module) -> RankerProgram:
    """The ranker program of a trained HSTU retrieval model, in eval mode (no dropout)."""
    encoder = getattr(getattr(model, "encoder", None), "encoder", None)
    timed = getattr(getattr(encoder, "config", None), "num_time_buckets", 0) > 0
    program = (TimedRankerProgram if timed else RankerProgram)(model)
    return program.eval()
