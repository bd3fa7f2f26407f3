"""The ranker program that is exported: history + candidates -> one score per candidate.

``forward(history [B, N, D] f32, history_len [B] i64, candidates [B, M, D] f32) -> [B, M] f32``

``history`` and ``candidates`` are raw item-embedding rows (what the model's item table, a
WePS store or a snapshot holds for those ids), gathered *outside* the graph so the served
embeddings can change without re-exporting. History rows at or past ``history_len[b]`` are
padding and never influence a score.

What it computes is the trained :class:`~gauss_plugins.models.retrieval.SequentialRetrievalModel`
(HSTU encoder) with one of two scoring heads (``head``, recorded in the package metadata):

``"retrieval"`` (the default: the score the retrieval model is trained and evaluated with)
  the history is encoded causally, as in training (``row * sqrt(D) + pos_emb[i]``); the query
  is the L2-normalised output at the last valid position (``model.query``) and a candidate's
  score is its dot product with the candidate's L2-normalised embedding (``score_corpus``).
  One history encode serves every candidate: M candidates cost one ``[N, D]`` encode plus M
  dot products. A history takes up to ``max_len`` items, as evaluation feeds it. An empty
  history scores every candidate 0 (its query is the zero vector, as in ``model.query``).

``"mfalcon"`` (target-aware: what a ranking model trained on appended targets uses)
  the candidates are appended to the history as targets under M-FALCON
  (:mod:`gauss_plugins.hstu.mfalcon`): history row ``i`` sits at position ``i``, every
  candidate at position ``history_len`` (the slot of the next event; all candidates share
  it, as they share the first target's position id in the bias); history rows attend
  causally to the history, each candidate to the whole history and to itself, never to
  another candidate, so a candidate's score does not depend on which other candidates share
  the request; the score is the cosine of the candidate's own L2-normalised encoder output
  with its L2-normalised item embedding. The candidates' slot leaves ``max_len - 1`` history
  items. A model trained only with the retrieval loss was never trained for this score: its
  rankings under this head are not the ones its evaluation measured.

The attention is written here with plain tensor ops on the padded layout, not through the
``gauss::hstu_attention`` custom op: a custom op would need a Python (or separately built
C++) kernel at serving time, and the package must run without Python. The M-FALCON head is
split the way M-FALCON makes cheap: history x history (``N^2``), candidates x history
(``M N``) and each candidate with itself (``M``), so 1024 candidates cost about five
histories, not 1024. Parity with the model's own paths (``model.query`` / ``score_corpus``
and ``MFalcon.score``) is tested.

Models with a time bias (``num_time_buckets > 0``) take two more inputs, ``history_time
[B, N]`` and ``candidate_time [B, M]`` (int64 seconds; a candidate's time is the time of
the request): :class:`TimedRankerProgram`. The retrieval head reads only ``history_time``
(training's query sees the history's times, never the target's); ``candidate_time`` stays
in the signature so both heads serve through the same predictor. The text request format
and the C++ runner serve the three-input form only.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_HEAD", "HEADS", "ExportError", "RankerProgram", "TimedRankerProgram", "build_ranker",
           "input_names"]

L2_EPS = 1e-6  # the retrieval model's l2_norm_eps
HEADS = ("retrieval", "mfalcon")
# Every model here is a SequentialRetrievalModel trained with the sampled softmax on
# <query, item>: the retrieval head is the score its training and evaluation used.
DEFAULT_HEAD = "retrieval"


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

    def __init__(self, model: nn.Module, head: str = DEFAULT_HEAD) -> None:
        super().__init__()
        from gauss_plugins.hstu.modules import PaddedHSTUEncoder
        from gauss_plugins.models.retrieval import SequentialRetrievalModel

        if head not in HEADS:
            raise ExportError(f"unknown scoring head {head!r}: choose one of {', '.join(HEADS)}")
        if not isinstance(model, SequentialRetrievalModel):
            raise ExportError(f"expected a SequentialRetrievalModel, got {type(model).__name__}")
        if not isinstance(model.encoder, PaddedHSTUEncoder):
            raise ExportError(f"the ranker program needs the HSTU encoder (model.arch: hstu); this model's encoder is "
                              f"{type(model.encoder).__name__}, which the program does not implement")
        encoder = model.encoder.encoder
        config = encoder.config
        problems = []
        if not config.causal:
            problems.append("causal: false")
        if head == "mfalcon" and config.normalizer != "max_seq_len":
            problems.append(f"normalizer {config.normalizer!r} (history rows would be divided by a length that "
                            "includes the candidates)")
        if config.contextual_len or config.max_attn_len:
            problems.append(f"contextual_len={config.contextual_len}, max_attn_len={config.max_attn_len}")
        if config.max_seq_len != model.max_len:
            problems.append(f"encoder max_seq_len {config.max_seq_len} != model max_len {model.max_len}")
        if head == "mfalcon" and model.max_len < 2:
            problems.append("max_len < 2 leaves no position for the candidates")
        if problems:
            raise ExportError(f"this HSTU model cannot be served with the {head} head: " + "; ".join(problems)
                              + ". Export a causal model with no contextual prefix or attention window"
                              + (" and normalizer max_seq_len" if head == "mfalcon" else ""))
        if self.timed != (config.num_time_buckets > 0):
            raise ExportError("use build_ranker(model): it picks the timed program for models with a time bias")
        self.head = head
        self.blocks = encoder.blocks
        self.output_norm = encoder.output_norm
        self.pos_emb = model.pos_emb
        self.dim = int(model.dim)
        self.max_len = int(model.max_len)
        # The retrieval query reads up to max_len items, as evaluation feeds it; under
        # M-FALCON the candidates take the position after the history, leaving max_len - 1.
        self.max_history = self.max_len if head == "retrieval" else self.max_len - 1
        self.per_sequence_normalizer = config.normalizer == "seq_len"
        self.alpha = float(config.alpha)
        self.num_heads = int(config.num_heads)
        self.num_time_buckets = int(config.num_time_buckets)
        self.time_bucket_scale = float(config.time_bucket_scale)

    # ------------------------------------------------------------------ the graph
    def forward(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self._score(history, history_len, candidates, None, None)

    def _score(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
               history_time: Optional[torch.Tensor], candidate_time: Optional[torch.Tensor]) -> torch.Tensor:
        # Clamped so that no value of history_len can index outside the position table in the
        # compiled code; the predictors refuse such values with a clear error before this.
        lens = history_len.clamp(min=0, max=history.shape[1])
        if self.head == "retrieval":
            return self._retrieval_scores(history, lens, candidates, history_time)
        return self._mfalcon_scores(history, lens, candidates, history_time, candidate_time)

    def _history_terms(self, history: torch.Tensor, lens: torch.Tensor, history_time: Optional[torch.Tensor]):
        """What both heads share: the history's inputs, its causal mask and bias indices."""
        b, n, _ = history.shape
        L = self.max_len
        pos = torch.arange(n, device=history.device)
        valid = pos.unsqueeze(0) < lens.unsqueeze(1)                                   # [B, N]
        xh = history * math.sqrt(self.dim) + self.pos_emb.weight[:n].unsqueeze(0)
        xh = xh * valid.unsqueeze(-1).to(history.dtype)
        hh_mask = (pos.view(1, n, 1) >= pos.view(1, 1, n)) & valid.unsqueeze(1)       # [B, Nq, Nk]
        hh_pos = (pos.view(1, n) - pos.view(n, 1) + L - 1).clamp(0, 2 * L - 2)         # [Nq, Nk]
        hh_time = None
        if history_time is not None:
            # t_{i+1} by a gather, not a slice: a slice of size N - 1 makes export specialise N = 2
            following = history_time.gather(1, (pos + 1).clamp(max=n - 1).unsqueeze(0).expand(b, n))
            t_next = torch.where(pos.unsqueeze(0) + 1 < lens.unsqueeze(1), following, history_time)
            hh_time = self._buckets(t_next.unsqueeze(2) - history_time.unsqueeze(1))              # [B, Nq, Nk]
        return pos, valid, xh, hh_mask, hh_pos, hh_time

    def _history_weights(self, block: nn.Module, qh: torch.Tensor, kh: torch.Tensor, hh_mask: torch.Tensor,
                         hh_pos: torch.Tensor, hh_time: Optional[torch.Tensor], divisor) -> torch.Tensor:
        """SiLU attention weights of history queries on history keys, ``[B, H, N, N]``."""
        n = qh.shape[1]
        s_hh = torch.einsum("bihd,bjhd->bhij", qh, kh) * self.alpha
        pos_w = block.relative_bias.position_weight
        time_w = block.relative_bias.time_weight
        if pos_w is not None:
            s_hh = s_hh + pos_w[hh_pos].view(1, 1, n, n)
        if time_w is not None and hh_time is not None:
            s_hh = s_hh + time_w[hh_time].unsqueeze(1)
        return torch.where(hh_mask.unsqueeze(1), F.silu(s_hh) / divisor, s_hh.new_zeros(()))

    def _retrieval_scores(self, history: torch.Tensor, lens: torch.Tensor, candidates: torch.Tensor,
                          history_time: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = history.shape
        _, _, x, hh_mask, hh_pos, hh_time = self._history_terms(history, lens, history_time)
        # The attention op's normalizers: max_seq_len, or each sequence's own length.
        divisor = lens.clamp(min=1).to(history.dtype).view(b, 1, 1, 1) if self.per_sequence_normalizer \
            else float(self.max_len)
        heads = self.num_heads
        for block in self.blocks:
            flat = x.reshape(b * n, d)
            u, q, k, v = block.project(flat)
            q, k, v = (t.reshape(b, n, heads, -1) for t in (q, k, v))
            p_hh = self._history_weights(block, q, k, hh_mask, hh_pos, hh_time, divisor)
            attn = torch.einsum("bhij,bjhd->bihd", p_hh, v).reshape(b * n, heads, -1)
            x = block.combine(flat, u, attn).reshape(b, n, d)
        last = (lens - 1).clamp(min=0)
        query = x.gather(1, last.view(b, 1, 1).expand(b, 1, d)).squeeze(1)            # [B, D]
        if self.output_norm is not None:  # per row: the gathered row normalised = the row of the normalised x
            query = self.output_norm(query)
        # An empty history has no output row: the model's query is then the zero vector.
        query = _l2(query) * (lens > 0).unsqueeze(1).to(query.dtype)
        return torch.einsum("bd,bmd->bm", query, _l2(candidates))

    def _mfalcon_scores(self, history: torch.Tensor, lens: torch.Tensor, candidates: torch.Tensor,
                        history_time: Optional[torch.Tensor], candidate_time: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = history.shape
        m = candidates.shape[1]
        L = self.max_len
        pos, valid, xh, hh_mask, hh_pos, hh_time = self._history_terms(history, lens, history_time)
        xc = candidates * math.sqrt(self.dim) + self.pos_emb.weight[lens].unsqueeze(1)  # [B, M, D]
        x = torch.cat([xh, xc], dim=1)                                                 # [B, N + M, D]

        # Position ids: history row i -> i, every candidate -> history_len (M-FALCON: targets
        # share the first target's id).
        ch_mask = valid.unsqueeze(1)                                                   # [B, 1, Nk]
        ch_pos = (pos.view(1, n) - lens.view(b, 1) + L - 1).clamp(0, 2 * L - 2)        # [B, Nk]
        ch_time = None
        if history_time is not None and candidate_time is not None:
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
            p_hh = self._history_weights(block, qh, kh, hh_mask, hh_pos, hh_time, float(L))   # [B, H, N, N]
            s_ch = torch.einsum("bchd,bjhd->bhcj", qc, kh) * self.alpha                   # [B, H, M, N]
            s_cc = (qc * kc).sum(-1).transpose(1, 2) * self.alpha                        # [B, H, M]
            if pos_w is not None:
                s_ch = s_ch + pos_w[ch_pos].view(b, 1, 1, n)
                s_cc = s_cc + pos_w[L - 1]
            if time_w is not None and ch_time is not None:
                s_ch = s_ch + time_w[ch_time].unsqueeze(1)
                s_cc = s_cc + time_w[0]  # a candidate with itself: gap 0 -> bucket 0
            p_ch = torch.where(ch_mask.unsqueeze(1), F.silu(s_ch) / L, s_ch.new_zeros(()))
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
    times ``[B, N]`` and each candidate's time ``[B, M]`` (the request time; the retrieval
    head does not read it, see the module docstring)."""

    timed = True

    def forward(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
                history_time: torch.Tensor, candidate_time: torch.Tensor) -> torch.Tensor:
        return self._score(history, history_len, candidates, history_time, candidate_time)


def build_ranker(model: nn.Module, head: Optional[str] = None) -> RankerProgram:
    """The ranker program of a trained HSTU retrieval model, in eval mode (no dropout);
    ``head``: ``"retrieval"`` or ``"mfalcon"`` (default :data:`DEFAULT_HEAD`)."""
    encoder = getattr(getattr(model, "encoder", None), "encoder", None)
    timed = getattr(getattr(encoder, "config", None), "num_time_buckets", 0) > 0
    program = (TimedRankerProgram if timed else RankerProgram)(model, DEFAULT_HEAD if head is None else head)
    return program.eval()
