"""SASRec encoder (Kang & McAuley, 2018): causal softmax self-attention over padded sequences.

The block is the original one, as the HSTU paper's baseline code keeps it: the query goes
through a LayerNorm before attention while keys and values do not, the attention output is
added to the normalised query, then LayerNorm -> point-wise feed-forward with its own
residual, and padded positions are zeroed after every block; a final LayerNorm closes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["SASRecConfig", "SASRecEncoder"]


@dataclass(frozen=True)
class SASRecConfig:
    """Sizes of a SASRec encoder; ``ffn_dim`` defaults to ``dim`` as in the original."""

    dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    ffn_dim: Optional[int] = None


class _PointWiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(torch.relu(self.fc1(x))))) + x


class SASRecEncoder(nn.Module):
    """``forward(x [B, N, D], valid [B, N] bool, timestamps ignored) -> [B, N, D]``.

    Causal: position ``i`` attends to positions ``<= i``. Sequences are right-padded; padded
    positions come out as zeros.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        if config.dim % config.num_heads:
            raise ValueError(f"dim {config.dim} is not divisible by num_heads {config.num_heads}")
        self.config = config
        hidden = config.ffn_dim or config.dim
        self.attn_norms = nn.ModuleList(nn.LayerNorm(config.dim, eps=1e-8) for _ in range(config.num_blocks))
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(config.dim, config.num_heads, dropout=config.dropout, batch_first=True)
            for _ in range(config.num_blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(config.dim, eps=1e-8) for _ in range(config.num_blocks))
        self.ffns = nn.ModuleList(_PointWiseFeedForward(config.dim, hidden, config.dropout) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.dim, eps=1e-8)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[1]
        # True = may not attend (future positions); padded keys only ever sit after the
        # valid ones of a right-padded row, so the causal mask already hides them from
        # every valid query.
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        keep = valid.unsqueeze(-1).to(x.dtype)
        x = x * keep
        for norm_q, attn, norm_f, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            q = norm_q(x)
            out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = q + out
            x = ffn(norm_f(x))
            x = x * keep
        return self.final_norm(x) * keep
