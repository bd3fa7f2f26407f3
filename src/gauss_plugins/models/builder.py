"""Build a :class:`SequentialRetrievalModel` from an experiment config."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gauss_plugins.models.item_embeddings import build_item_embeddings
from gauss_plugins.models.retrieval import SequentialRetrievalModel
from gauss_plugins.models.sasrec import SASRecConfig, SASRecEncoder

__all__ = ["build_encoder", "build_model"]


def build_encoder(model_cfg, max_len: int) -> nn.Module:
    """HSTU (``gauss_plugins.hstu.modules.PaddedHSTUEncoder``) or SASRec, padded interface."""
    if model_cfg.arch == "sasrec":
        return SASRecEncoder(SASRecConfig(dim=model_cfg.dim, num_blocks=model_cfg.num_blocks,
                                          num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
                                          ffn_dim=model_cfg.ffn_dim))
    if model_cfg.arch == "hstu":
        from gauss_plugins.hstu.modules import HSTUConfig, PaddedHSTUEncoder

        # The paper's research settings (HSTUConfig defaults): SiLU on U, V, Q, K, alpha = 1,
        # normaliser max_seq_len; the relative bias parts come from the config.
        return PaddedHSTUEncoder(HSTUConfig(dim=model_cfg.dim, num_blocks=model_cfg.num_blocks,
                                            num_heads=model_cfg.num_heads, d_qk=model_cfg.attention_dim,
                                            d_v=model_cfg.linear_dim, max_seq_len=max_len,
                                            dropout=model_cfg.dropout,
                                            relative_position_bias=model_cfg.relative_position_bias,
                                            num_time_buckets=model_cfg.num_time_buckets,
                                            time_bucket_scale=float(model_cfg.time_bucket_scale),
                                            output_norm=bool(model_cfg.output_norm),
                                            layer_norm_affine=bool(model_cfg.layer_norm_affine)))
    raise ValueError(f"unknown model.arch {model_cfg.arch!r}; expected 'hstu' or 'sasrec'")


def build_model(config, num_items: int, device: Optional[torch.device] = None) -> SequentialRetrievalModel:
    """The retrieval model of ``config`` (an ExperimentConfig) over item ids ``1..num_items``."""
    items = build_item_embeddings(config.model.item_embedding, num_items=num_items, dim=config.model.dim,
                                  lr=config.optim.lr, betas=tuple(config.optim.betas),
                                  weight_decay=config.optim.weight_decay, device=device)
    encoder = build_encoder(config.model, config.data.max_len)
    return SequentialRetrievalModel(items, encoder, max_len=config.data.max_len, num_items=num_items,
                                    dropout=config.model.dropout, temperature=config.loss.temperature,
                                    num_negatives=config.loss.num_negatives,
                                    position_init=config.model.position_init)
