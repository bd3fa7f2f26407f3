"""Small HSTU retrieval models and their reference scores for the export tests: the
training/eval score (``model.query`` with ``score_corpus``) and M-FALCON's (``MFalcon.score``)."""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from gauss_plugins.hstu.mfalcon import MFalcon
from gauss_plugins.hstu.modules import HSTUConfig, PaddedHSTUEncoder
from gauss_plugins.jagged import lengths_to_offsets
from gauss_plugins.models.item_embeddings import StaticItemEmbeddings
from gauss_plugins.models.retrieval import SequentialRetrievalModel, l2_normalize


def tiny_model(num_items: int = 40, dim: int = 8, max_len: int = 12, num_blocks: int = 2, num_heads: int = 2,
               num_time_buckets: int = 0, seed: int = 0, normalizer: str = "max_seq_len") -> SequentialRetrievalModel:
    torch.manual_seed(seed)
    config = HSTUConfig(dim=dim, num_blocks=num_blocks, num_heads=num_heads, max_seq_len=max_len, dropout=0.2,
                        num_time_buckets=num_time_buckets, normalizer=normalizer)
    model = SequentialRetrievalModel(StaticItemEmbeddings(num_items, dim), PaddedHSTUEncoder(config), max_len=max_len,
                                     num_items=num_items)
    with torch.no_grad():  # trained-looking biases: non-zero tables, so a wrong index shows
        for block in model.encoder.encoder.blocks:
            for table in (block.relative_bias.position_weight, block.relative_bias.time_weight):
                if table is not None:
                    table.normal_(0.0, 0.5)
    return model.eval()


def retrieval_reference(model: SequentialRetrievalModel, histories: List[List[int]], candidates: List[List[int]],
                        history_times: Optional[List[List[int]]] = None) -> List[torch.Tensor]:
    """Scores as training's evaluation computes them: ``model.query`` on the right-padded
    history (its timestamps, when given) scored by ``model.score_corpus`` on the candidates'
    ``item_vectors``, one request at a time."""
    out = []
    with torch.no_grad():
        for i, (h, c) in enumerate(zip(histories, candidates)):
            ids = torch.tensor([h or [0]], dtype=torch.long)
            times = torch.tensor([history_times[i] or [0]], dtype=torch.long) if history_times is not None else None
            query = model.query(ids, torch.tensor([len(h)]), times)
            out.append(model.score_corpus(query, model.item_vectors(torch.tensor(c, dtype=torch.long)))[0])
    return out


def mfalcon_reference(model: SequentialRetrievalModel, histories: List[List[int]], candidates: List[List[int]],
                      history_times: Optional[List[List[int]]] = None,
                      candidate_times: Optional[List[List[int]]] = None) -> List[torch.Tensor]:
    """Scores through the model's own jagged path: MFalcon.score on the encoder, the inputs
    built as SequentialRetrievalModel.encode builds them."""
    emb = model.item_embeddings
    scale = math.sqrt(model.dim)
    pos = model.pos_emb.weight
    xh = torch.cat([emb(torch.tensor(h, dtype=torch.long)) * scale + pos[:len(h)] for h in histories])
    xc = torch.cat([emb(torch.tensor(c, dtype=torch.long)) * scale + pos[len(h)] for h, c in zip(histories, candidates)])
    ho = lengths_to_offsets(torch.tensor([len(h) for h in histories]))
    co = lengths_to_offsets(torch.tensor([len(c) for c in candidates]))
    ht = ct = None
    if history_times is not None:
        ht = torch.tensor([t for ts in history_times for t in ts], dtype=torch.long)
        ct = torch.tensor([t for ts in candidate_times for t in ts], dtype=torch.long)
    with torch.no_grad():
        out = MFalcon(model.encoder.encoder, micro_batch_size=3).score(xh, ho, xc, co, ht, ct)
        e = l2_normalize(emb(torch.tensor([i for c in candidates for i in c], dtype=torch.long)))
        scores = (l2_normalize(out) * e).sum(-1)
    return list(scores.split([len(c) for c in candidates]))


def padded(model, histories, candidates, history_times=None, candidate_times=None):
    """The program's padded inputs for the same requests."""
    b = len(histories)
    n = max(len(h) for h in histories)
    m = max(len(c) for c in candidates)
    ids_h = torch.zeros(b, n, dtype=torch.long)
    ids_c = torch.ones(b, m, dtype=torch.long)
    th = torch.zeros(b, n, dtype=torch.long)
    tc = torch.zeros(b, m, dtype=torch.long)
    for i, (h, c) in enumerate(zip(histories, candidates)):
        ids_h[i, :len(h)] = torch.tensor(h)
        ids_c[i, :len(c)] = torch.tensor(c)
        if history_times is not None:
            th[i, :len(h)] = torch.tensor(history_times[i])
            tc[i, :len(c)] = torch.tensor(candidate_times[i])
    with torch.no_grad():
        args = (model.item_embeddings(ids_h), torch.tensor([len(h) for h in histories]), model.item_embeddings(ids_c))
    return args + ((th, tc) if history_times is not None else ())


def tiny_config(num_time_buckets: int = 0, max_len: int = 12, dim: int = 8, item_embedding: str = "dynamic"):
    from gauss_plugins.train.config import ExperimentConfig, with_overrides

    return with_overrides(ExperimentConfig(name="tiny-hstu"), data__max_len=max_len, model__dim=dim,
                          model__attention_dim=4, model__linear_dim=4, model__num_heads=2,
                          model__num_time_buckets=num_time_buckets, model__item_embedding=item_embedding)


def write_checkpoint(run_dir: str, config, num_items: int = 40, seen: int = 30, seed: int = 0):
    """A checkpoint as `gauss train` writes it, of a model whose table has rows for items
    1..seen (trained-looking: ids above ``seen`` were never inserted)."""
    import os

    from gauss_integrations.lightning.fit import save_checkpoint
    from gauss_plugins.models.builder import build_model

    torch.manual_seed(seed)
    model = build_model(config, num_items=num_items)
    model.train()
    model.item_embeddings(torch.arange(1, seen + 1))  # training inserts the rows it sees
    with torch.no_grad():
        for block in model.encoder.encoder.blocks:
            for table in (block.relative_bias.position_weight, block.relative_bias.time_weight):
                if table is not None:
                    table.normal_(0.0, 0.5)
    model.eval()
    os.makedirs(run_dir, exist_ok=True)
    save_checkpoint(os.path.join(run_dir, "model.safetensors"), model, config, {"mode": "test"})
    return model
