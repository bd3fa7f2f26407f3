"""The generative retrieval model of the HSTU paper, with a swappable sequence encoder.

    ids [B, N] --item embeddings--> * sqrt(D) + learned position --dropout--> encoder
        --L2 normalise--> query vectors u_i            (one per position, causal)

    loss: sampled softmax at every position i predicting item i+1:
        -log( exp(<u_i, e+> / T) / (exp(<u_i, e+> / T) + sum_r exp(<u_i, e_r> / T)) )
    with e = L2-normalised item embeddings, R negatives drawn uniformly from the corpus per
    position, and a negative equal to the positive masked out (as the paper's code does).

    retrieval: score all corpus items by <u_last, e_item>.

Item embeddings come from an :class:`~gauss_plugins.models.item_embeddings.ItemEmbeddings`
(the dynamic embedding table by default); the encoder is HSTU or SASRec.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gauss_plugins.models.item_embeddings import ItemEmbeddings, truncated_normal_

__all__ = ["POSITION_INITS", "SequentialRetrievalModel"]

L2_EPS = 1e-6  # the paper's l2_norm_eps
POSITION_INITS = ("normal", "truncated_normal", "xavier_normal")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=L2_EPS)


class SequentialRetrievalModel(nn.Module):
    """Item embeddings + positional input + causal encoder + L2-normalised outputs.

    ``encoder(x [B, N, D], valid [B, N], timestamps [B, N] or None) -> [B, N, D]``.
    ``num_items`` is the largest item id of the corpus: negatives are drawn from ``1..num_items``
    and retrieval scores those ids. ``position_init`` (one of :data:`POSITION_INITS`) initialises
    the position embedding: ``"normal"`` is N(0, 1/D) (``nn.init.trunc_normal_``, whose +-2
    absolute cut never acts at this std: the behaviour of earlier versions, kept as the default);
    ``"truncated_normal"`` is that normal cut at 2 std, the paper code's input preprocessor (and
    so its SASRec); ``"xavier_normal"`` is what the paper code's HSTU overwrites it with
    (``HSTU.reset_params`` re-initialises every parameter outside the blocks and the item table,
    std ``sqrt(2 / (rows + D))``; its table has ``max_len + 11`` rows, this one ``max_len``).
    """

    def __init__(self, item_embeddings: ItemEmbeddings, encoder: nn.Module, max_len: int, num_items: int,
                 dropout: float = 0.2, temperature: float = 0.05, num_negatives: int = 128,
                 position_init: str = "normal") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if position_init not in POSITION_INITS:
            raise ValueError(f"position_init must be one of {POSITION_INITS}, got {position_init!r}")
        self.item_embeddings = item_embeddings
        self.encoder = encoder
        self.dim = item_embeddings.dim
        self.max_len = int(max_len)
        self.num_items = int(num_items)
        self.temperature = float(temperature)
        self.num_negatives = int(num_negatives)
        self.pos_emb = nn.Embedding(self.max_len, self.dim)
        std = math.sqrt(1.0 / self.dim)
        if position_init == "xavier_normal":
            nn.init.xavier_normal_(self.pos_emb.weight)
        elif position_init == "truncated_normal":
            truncated_normal_(self.pos_emb.weight, std=std)
        else:
            nn.init.trunc_normal_(self.pos_emb.weight, std=std)
        self.input_dropout = nn.Dropout(dropout)

    # ------------------------------------------------------------------ encoding
    def encode(self, ids: torch.Tensor, lengths: torch.Tensor, timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Right-padded ``ids [B, N]`` (0 = padding) -> L2-normalised outputs ``[B, N, D]``."""
        self._check_length(ids)
        return self._encode_embedded(self.item_embeddings(ids), ids, lengths, timestamps)

    def _check_length(self, ids: torch.Tensor) -> None:
        """Before any lookup: a too-long batch must not insert ids into a dynamic table."""
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len {self.max_len}")

    def _encode_embedded(self, emb: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                         timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`encode` with the item embeddings of ``ids`` already looked up (``[B, N, D]``)."""
        n = ids.shape[1]
        valid = torch.arange(n, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        x = emb * math.sqrt(self.dim)
        x = x + self.pos_emb.weight[:n].unsqueeze(0)
        x = self.input_dropout(x) * valid.unsqueeze(-1).to(x.dtype)
        out = self.encoder(x, valid, timestamps)
        return l2_normalize(out)

    def query(self, ids: torch.Tensor, lengths: torch.Tensor, timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The query vector of each sequence: the output at its last valid position, ``[B, D]``."""
        out = self.encode(ids, lengths, timestamps)
        last = (lengths - 1).clamp(min=0)
        return out[torch.arange(out.shape[0], device=out.device), last]

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of ``ids`` (any shape)."""
        return l2_normalize(self.item_embeddings(ids))

    def corpus_vectors(self) -> torch.Tensor:
        """``[num_items + 1, D]``: row ``j`` is item id ``j`` (row 0, the padding id, is zero)."""
        ids = torch.arange(self.num_items + 1, device=self.pos_emb.weight.device)
        vecs = self.item_vectors(ids)
        return vecs * (ids > 0).unsqueeze(-1).to(vecs.dtype)

    def score_corpus(self, queries: torch.Tensor, corpus: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, num_items + 1]`` scores (cosine similarities) of every corpus item."""
        corpus = self.corpus_vectors() if corpus is None else corpus
        return queries @ corpus.T

    # ------------------------------------------------------------------ training
    def sampled_softmax_loss(self, ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                             timestamps: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None,
                             negatives: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Mean sampled-softmax loss over every valid position (``targets > 0``).

        ``negatives``: ids drawn before the step instead of here, ``[P, R]`` (one row per valid
        position, in order) or ``[R]`` (shared by every position of the batch), R =
        ``num_negatives``: an embedding cache must know every id a step reads ahead of it.
        Returns ``{"loss": scalar, "num_targets": int tensor}``.
        """
        self._check_length(ids)
        mask = targets > 0
        pos_ids = targets[mask]                  # [P]
        p = pos_ids.shape[0]
        if p == 0:
            raise ValueError("batch has no target to predict (all sequences shorter than 2)")
        if negatives is None:
            neg_ids = torch.randint(1, self.num_items + 1, (p, self.num_negatives), device=ids.device, generator=generator)
        elif negatives.shape in ((p, self.num_negatives), (self.num_negatives,)):
            neg_ids = negatives.to(ids.device).expand(p, self.num_negatives)
        else:
            raise ValueError(f"negatives must have shape [{p}, {self.num_negatives}] (one row per valid position) or "
                             f"[{self.num_negatives}] (shared), got {tuple(negatives.shape)}")
        # Look each distinct negative up once, then pick the negatives' logits either by
        # gathering [P, R, D] vectors or, when the distinct ids are few, from a [P, U] matmul;
        # both give the same numbers. The inputs, the positives and the distinct negatives are
        # read in ONE lookup: on a GPU every table lookup costs launches and a host sync (the
        # dynamic table's absent-id check, the static table's range check), the step's
        # largest fixed cost at ML-1M sizes. Gradients are the same sums.
        uniq, inverse = torch.unique(neg_ids, return_inverse=True)
        n_in = ids.numel()
        vecs = self.item_embeddings(torch.cat([ids.reshape(-1), pos_ids, uniq]))
        out = self._encode_embedded(vecs[:n_in].view(*ids.shape, -1), ids, lengths, timestamps)
        queries = out[mask]                      # [P, D]
        pos_logits = (queries * l2_normalize(vecs[n_in:n_in + p])).sum(-1, keepdim=True)
        neg_vecs = l2_normalize(vecs[n_in + p:])  # [U, D]
        if uniq.shape[0] <= 16 * self.num_negatives:
            neg_logits = (queries @ neg_vecs.T).gather(1, inverse)
        else:
            neg_logits = torch.einsum("pd,prd->pr", queries, neg_vecs[inverse])
        neg_logits = neg_logits.masked_fill(neg_ids == pos_ids.unsqueeze(1), -5e4 * self.temperature)
        logits = torch.cat([pos_logits, neg_logits], dim=1) / self.temperature
        loss = -F.log_softmax(logits, dim=1)[:, 0].mean()
        return {"loss": loss, "num_targets": torch.tensor(p)}
