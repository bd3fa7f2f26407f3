"""Stream events, train HSTU retrieval, sync to a serving store while training, then serve.

    python examples/stream_sync_rank.py [--steps 300] [--out runs/stream_sync_rank]
                                        [--dataset synthetic|ml-100k]

End to end, on CPU, in well under a minute:

1. *Data*: the synthetic event stream (:func:`gauss_plugins.data.synthetic_event_stream`), or
   MovieLens-100K with ``--dataset ml-100k`` (``--data-dir``, else ``ml-100k/`` in the data
   folder: ``$GAUSS_DATA``, see :mod:`gauss_plugins.data.locate`). Each user's
   last event is held out; every other event (with some history before it) is a training
   event, and training events are consumed in global time order.
2. *Training*: the HSTU retrieval model of :mod:`gauss_plugins.models`; item embeddings are
   rows of a :class:`~gauss_plugins.embedding.DynamicEmbeddingTable` stepped by its fused
   :class:`~gauss_plugins.embedding.SparseOptimizer`, the dense parameters by AdamW. Each step
   predicts the next ``--batch`` events of the stream from their users' histories.
   Meanwhile a :class:`~gauss_plugins.stores.syncer.Syncer` (``TableSource(table) -> WePS``)
   pushes changed item rows every ``--sync-interval`` seconds, and ``publish_dense`` hands it
   the dense weights every ``--publish-every`` steps (written with the manifest under
   ``OUT/dense``). The training step holds ``TableSource.lock`` so a pull never sees half a
   step.
3. *Serving*: after the final push (``syncer.close()``), the manifest names a dense file and
   an embedding version; the serving model is the dense weights (``load_dense``) plus item
   rows read from the pinned WePS snapshot of that version. Checked exactly: served rows ==
   the trained table's rows (same id set too), dense weights == the trained ones, rows
   changed by the very last training step are in the snapshot, and the serving model's
   scores == the training model's scores.
4. *Ranking*: the retrieval model scores an item by ``<u_last, e_item>`` (the query is the
   encoder output at the last history position); that does not fit M-FALCON's candidate
   interface (M-FALCON returns an output *per candidate row*), so the corpus is ranked by the
   serving model's query against the WePS rows. M-FALCON still computes the query of a few
   users from a cached history (``encode_history`` over all but the last history row, then
   ``score_cached`` with the last row as the single target) and is checked against the model.
   HR@10 / NDCG@10 on the held-out items are reported next to a popularity baseline.
5. A summary is printed and ``OUT/report.json`` written atomically.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gauss_plugins.data import UserSequences, load_movielens_100k, locate_dataset, synthetic_event_stream
from gauss_plugins.hstu.mfalcon import MFalcon
from gauss_plugins.hstu.modules import HSTUConfig, PaddedHSTUEncoder
from gauss_plugins.models import SequentialRetrievalModel, build_item_embeddings, metrics_from_ranks, target_ranks
from gauss_plugins.models.item_embeddings import ItemEmbeddings
from gauss_plugins.models.retrieval import l2_normalize
from gauss_plugins.stores import WePS, load_dense, read_manifest
from gauss_plugins.stores.syncer import Syncer, TableSource
from gauss_plugins.train.report import write_json

REPORT_KEYS = ("dataset", "steps", "events_trained", "train_seconds", "events_per_s", "final_loss", "syncer",
               "manifest", "consistency", "ranking", "top10")
ITEM_PREFIX = "item_embeddings."


# ---------------------------------------------------------------------------- data
def load_events(args: argparse.Namespace) -> UserSequences:
    if args.dataset == "ml-100k":
        if args.data_dir is not None:
            if os.path.exists(os.path.join(args.data_dir, "u.data")):
                return load_movielens_100k(args.data_dir)
            why = f"no u.data under --data-dir {args.data_dir}"
        else:
            found = locate_dataset("ml-100k")
            if found:
                return load_movielens_100k(found.path)
            why = found.reason
        print(f"--dataset ml-100k: {why}; using the synthetic stream instead", file=sys.stderr)
    return synthetic_event_stream(num_users=args.users, num_items=args.items, mean_length=args.mean_length,
                                  min_length=3, num_topics=10, seed=args.seed)


def time_ordered_events(seqs: UserSequences) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train events, eval users, eval positions)``: absolute indices into ``seqs.items``.

    A user's last event is held out when the user has 3+ events; training events are all
    other events with at least one event before them, ordered by (time, user).
    """
    lengths = seqs.lengths
    starts, ends = seqs.offsets[:-1], seqs.offsets[1:]
    user_of = np.repeat(np.arange(seqs.num_users), lengths)
    pos = np.arange(seqs.num_events) - starts[user_of]
    held_out = np.zeros(seqs.num_events, dtype=bool)
    eval_users = np.nonzero(lengths >= 3)[0]
    held_out[ends[eval_users] - 1] = True
    train = np.nonzero((pos >= 1) & ~held_out)[0]
    times = seqs.timestamps if seqs.timestamps is not None else pos
    order = np.lexsort((user_of[train], times[train]))
    return train[order], eval_users, ends[eval_users] - 1


def user_of_event(seqs: UserSequences, event: np.ndarray) -> np.ndarray:
    return np.searchsorted(seqs.offsets, event, side="right") - 1


def history_batch(seqs: UserSequences, users: np.ndarray, ends: np.ndarray, max_len: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, lengths, timestamps)`` of ``items[max(start, end - max_len):end]``."""
    lo = np.maximum(seqs.offsets[users], ends - max_len)
    lens = ends - lo
    width = int(lens.max())
    ids = np.zeros((len(users), width), dtype=np.int64)
    ts = np.zeros((len(users), width), dtype=np.int64)
    for b in range(len(users)):
        ids[b, : lens[b]] = seqs.items[lo[b]:ends[b]]
        if seqs.timestamps is not None:
            ts[b, : lens[b]] = seqs.timestamps[lo[b]:ends[b]]
    times = torch.from_numpy(ts) if seqs.timestamps is not None else None
    return torch.from_numpy(ids), torch.from_numpy(lens.astype(np.int64)), times


# ---------------------------------------------------------------------------- models
def hstu_config(args: argparse.Namespace) -> HSTUConfig:
    return HSTUConfig(dim=args.dim, num_blocks=args.blocks, num_heads=1, max_seq_len=args.max_len,
                      dropout=args.dropout, backend="auto")


def build_training_model(args: argparse.Namespace, num_items: int) -> SequentialRetrievalModel:
    items = build_item_embeddings("dynamic", num_items=num_items, dim=args.dim, lr=args.lr, betas=(0.9, 0.98))
    return SequentialRetrievalModel(items, PaddedHSTUEncoder(hstu_config(args)), max_len=args.max_len,
                                    num_items=num_items, dropout=args.dropout, num_negatives=args.negatives)


class WePSItemEmbeddings(ItemEmbeddings):
    """Serving-side item vectors: rows of one pinned (immutable) WePS snapshot."""

    kind = "weps"

    def __init__(self, snapshot: Any, dim: int) -> None:
        super().__init__(dim)
        self.snapshot = snapshot

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.snapshot.get(flat.cpu()).to(flat.device)
        rows = rows * (flat > 0).unsqueeze(-1).to(rows.dtype)  # padding id 0 -> zeros
        return rows.reshape(*ids.shape, self.dim)


def build_serving_model(args: argparse.Namespace, num_items: int, dense: Dict[str, torch.Tensor],
                        snapshot: Any) -> SequentialRetrievalModel:
    model = SequentialRetrievalModel(WePSItemEmbeddings(snapshot, args.dim), PaddedHSTUEncoder(hstu_config(args)),
                                     max_len=args.max_len, num_items=num_items, dropout=args.dropout,
                                     num_negatives=args.negatives)
    model.load_state_dict(dense, strict=True)  # every dense key, nothing else
    return model.eval()


def dense_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's dense weights: everything but the dynamic table's exported state."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(ITEM_PREFIX)}


def all_rows(table: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    ids, values, _ = table.changed_since(-(1 << 62))  # a version before every stamp: every live row
    return ids, values.float()


@torch.no_grad()
def mfalcon_queries(model: SequentialRetrievalModel, ids: torch.Tensor, lengths: torch.Tensor,
                    times: Optional[torch.Tensor]) -> torch.Tensor:
    """Query vectors via M-FALCON: cache all but the last history row, score the last row as
    the single target (a target sees the history and itself: the causal last position)."""
    x = model.item_embeddings(ids) * math.sqrt(model.dim) + model.pos_emb.weight[: ids.shape[1]].unsqueeze(0)
    hist_rows, cand_rows, hist_t, cand_t = [], [], [], []
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        hist_rows.append(x[b, : n - 1])
        cand_rows.append(x[b, n - 1: n])
        if times is not None:
            hist_t.append(times[b, : n - 1])
            cand_t.append(times[b, n - 1: n])
    h_off = torch.zeros(ids.shape[0] + 1, dtype=torch.int64)
    h_off[1:] = torch.cumsum(lengths - 1, 0)
    c_off = torch.arange(ids.shape[0] + 1, dtype=torch.int64)
    mf = MFalcon(model.encoder.encoder, micro_batch_size=1)
    cache = mf.encode_history(torch.cat(hist_rows), h_off, torch.cat(hist_t) if times is not None else None)
    out = mf.score_cached(cache, torch.cat(cand_rows), c_off, torch.cat(cand_t) if times is not None else None)
    return l2_normalize(out)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps (stops early at the end of the stream)")
    p.add_argument("--out", default="runs/stream_sync_rank")
    p.add_argument("--dataset", choices=("synthetic", "ml-100k"), default="synthetic")
    p.add_argument("--data-dir", help="ml-100k folder (default: ml-100k/ in the data folder, see `gauss data list`)")
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--mean-length", type=int, default=40)
    p.add_argument("--batch", type=int, default=64, help="stream events per training step")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--negatives", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sync-interval", type=float, default=0.5)
    p.add_argument("--publish-every", type=int, default=50)
    p.add_argument("--show-users", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _finite(x: Any) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else print
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    seqs = load_events(args)
    num_items = seqs.max_item_id
    train_events, eval_users, eval_pos = time_ordered_events(seqs)
    say(seqs.describe())
    say(f"stream: {len(train_events)} training events in time order, {len(eval_users)} held-out next items")

    model = build_training_model(args, num_items)
    table = model.item_embeddings.table
    dense_opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    assert not any(p is table for p in model.parameters())  # the table holds no nn.Parameter

    dense_url = os.path.join(os.path.abspath(args.out), "dense")
    os.makedirs(dense_url, exist_ok=True)
    for name in os.listdir(dense_url):  # a fresh run: the manifest and dense files must be this run's
        if name in ("manifest.json", ".manifest.json.tmp") or name.lstrip(".").startswith("dense-"):
            os.unlink(os.path.join(dense_url, name))
    source = TableSource(table)
    weps = WePS(args.dim, retain=8)
    syncer = Syncer(source, weps, interval_s=args.sync_interval, dense_url=dense_url)

    # ------------------------------------------------------------------ training
    steps = min(args.steps, -(-len(train_events) // args.batch))
    losses: List[float] = []
    last_step: Dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    events = 0
    try:
        for step in range(steps):
            ev = train_events[step * args.batch:(step + 1) * args.batch]
            users = user_of_event(seqs, ev)
            ids, lens, times = history_batch(seqs, users, ev, args.max_len)
            targets = torch.zeros_like(ids)
            # history = the user's events before ev; the only target is event ev itself
            targets[torch.arange(len(ev)), lens - 1] = torch.from_numpy(seqs.items[ev])
            is_last = step == steps - 1
            with source.lock:  # lookups (inserts, stamps) and the sparse step mutate the table
                if is_last:
                    before_version = table.version
                    before_ids, before_vals = all_rows(table)
                model.train()
                out = model.sampled_softmax_loss(ids, lens, targets, times, generator=gen)
                dense_opt.zero_grad(set_to_none=True)
                model.item_embeddings.sparse_zero_grad()
                out["loss"].backward()
                dense_opt.step()
                model.item_embeddings.sparse_step()
                if is_last:
                    ids_now, vals_now, _ = table.changed_since(before_version)
                    last_step = {"before_ids": before_ids, "before_vals": before_vals,
                                 "ids": ids_now, "vals": vals_now.float()}
            losses.append(float(out["loss"].detach()))
            events += len(ev)
            if (step + 1) % args.publish_every == 0 or is_last:
                syncer.publish_dense(dense_state(model))
            if not args.quiet and ((step + 1) % max(1, steps // 6) == 0 or is_last):
                s = syncer.stats()
                say(f"step {step + 1:4d}/{steps}  loss {np.mean(losses[-20:]):.3f}  table v{table.version} "
                    f"rows {len(table)}  pushed v{s['pushed_version']} ({s['pushes']} pushes)")
        train_s = time.perf_counter() - t0
    finally:
        syncer.close()  # final push (rows, dense file, manifest); errors are kept in stats
    stats = syncer.stats()
    if stats["last_error"]:
        say(f"syncer error: {stats['last_error']}")

    # ------------------------------------------------------------------ serving copy
    manifest = read_manifest(dense_url)
    if manifest is None:
        raise RuntimeError(f"no manifest under {dense_url}: the syncer never published ({stats['last_error']})")
    dense, manifest = load_dense(dense_url, manifest)
    snapshot = weps.snapshot(manifest["embedding_version"])
    serving = build_serving_model(args, num_items, dense, snapshot)
    model.eval()

    t_ids, t_vals = all_rows(table)
    served = snapshot.lookup(t_ids)
    trained_dense = dense_state(model)
    checks: Dict[str, Any] = {
        "manifest_version_is_final": int(manifest["embedding_version"]) == int(table.version)
        and int(manifest["dense_embedding_version"]) == int(table.version),
        "snapshot_version": int(snapshot.version),
        "table_version": int(table.version),
        "rows_checked": int(t_ids.numel()),
        "served_rows_equal_trained": bool(served.found.all()) and torch.equal(served.values, t_vals),
        "served_id_set_equal": len(snapshot) == int(t_ids.numel()),
        "dense_equal_trained": set(dense) == set(trained_dense)
        and all(torch.equal(dense[k], trained_dense[k].cpu()) for k in dense),
    }
    # rows the last training step changed (new rows or new values) must be in the snapshot
    b_ids, b_vals = last_step["before_ids"], last_step["before_vals"]
    ids_l, vals_l = last_step["ids"], last_step["vals"]
    pos = torch.searchsorted(b_ids, ids_l).clamp(max=max(b_ids.numel() - 1, 0))
    existed = (b_ids[pos] == ids_l) if b_ids.numel() else torch.zeros_like(ids_l, dtype=torch.bool)
    changed = ~existed
    changed[existed] = (b_vals[pos[existed]] != vals_l[existed]).any(dim=1)
    ch_ids = ids_l[changed]
    checks["last_step_rows_changed"] = int(ch_ids.numel())
    checks["last_step_rows_visible"] = bool(ch_ids.numel() > 0) and torch.equal(snapshot.get(ch_ids), vals_l[changed])

    # scores of the training model (dynamic table) vs the serving model (WePS rows), held-out users
    eval_ids, eval_lens, eval_times = history_batch(seqs, eval_users, eval_pos, args.max_len)
    with torch.no_grad():
        q_train = model.query(eval_ids, eval_lens, eval_times)
        s_train = model.score_corpus(q_train)
        q_serve = serving.query(eval_ids, eval_lens, eval_times)
        corpus = serving.corpus_vectors()
        s_serve = serving.score_corpus(q_serve, corpus)
    checks["score_users"] = int(eval_ids.shape[0])
    checks["scores_equal"] = torch.equal(s_train, s_serve)
    checks["scores_max_abs_diff"] = float((s_train - s_serve).abs().max())

    # ------------------------------------------------------------------ ranking
    show = min(args.show_users, len(eval_users))
    sel = torch.arange(show)
    q_mf = mfalcon_queries(serving, eval_ids[sel], eval_lens[sel], eval_times[sel] if eval_times is not None else None)
    checks["mfalcon_query_max_abs_diff"] = float((q_mf - q_serve[sel]).abs().max()) if show else 0.0
    checks["mfalcon_query_matches"] = bool(torch.allclose(q_mf, q_serve[sel], atol=1e-4)) if show else True

    # exclude each user's whole past (not only the max_len window) from the ranking
    full_hist = [seqs.items[seqs.offsets[u]:p] for u, p in zip(eval_users, eval_pos)]
    width = max(len(h) for h in full_hist)
    hist = torch.zeros(len(full_hist), width, dtype=torch.int64)
    for b, h in enumerate(full_hist):
        hist[b, : len(h)] = torch.from_numpy(h)
    targets = torch.from_numpy(seqs.items[eval_pos])
    ranks = target_ranks(s_serve, targets, hist)
    pop = torch.from_numpy(np.bincount(seqs.items[train_events[: steps * args.batch]],
                                       minlength=num_items + 1).astype(np.float64)).float()
    pop_ranks = target_ranks((pop + 1e-6 * torch.rand(num_items + 1, generator=gen)).expand(len(targets), -1),
                             targets, hist)
    m, mp = metrics_from_ranks(ranks, (10,)), metrics_from_ranks(pop_ranks, (10,))
    masked = s_serve.clone()
    masked[:, 0] = float("-inf")
    masked.scatter_(1, hist, float("-inf"))
    top10 = masked[:show].topk(10, dim=1).indices
    top = [{"user": int(seqs.user_ids[eval_users[b]]), "top10": [int(i) for i in top10[b]],
            "held_out": int(targets[b]), "hit": bool(int(targets[b]) in top10[b].tolist())} for b in range(show)]

    report = {
        "dataset": seqs.name,
        "steps": steps,
        "events_trained": events,
        "train_seconds": train_s,
        "events_per_s": events / train_s if train_s > 0 else None,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "syncer": {"pushes": stats["pushes"], "rows_pushed": stats["rows_pushed"],
                   "bytes_pushed": stats["bytes_pushed"], "failures": stats["failures"],
                   "last_error": stats["last_error"], "pushed_version": stats["pushed_version"],
                   "freshness_p50_s": _finite(stats["freshness_p50_s"]),
                   "freshness_p99_s": _finite(stats["freshness_p99_s"]), "weps": weps.stats()},
        "manifest": manifest,
        "consistency": checks,
        "ranking": {"users": int(len(targets)), "hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"],
                    "popularity_hr@10": mp["hr@10"], "method": "full corpus, serving query x WePS rows"},
        "top10": top,
    }
    write_json(os.path.join(args.out, "report.json"), report)

    # ------------------------------------------------------------------ summary
    for t in top:
        say(f"user {t['user']}: top-10 {t['top10']}  held-out {t['held_out']}{'  HIT' if t['hit'] else ''}")
    fr = report["syncer"]
    say(f"trained {steps} steps, {events} events in {train_s:.2f}s ({report['events_per_s']:.0f} events/s), "
        f"loss {report['final_loss']:.3f}")
    say(f"syncer: {fr['pushes']} pushes, {fr['rows_pushed']} rows, {fr['failures']} failures, freshness "
        f"p50 {fr['freshness_p50_s']} s / p99 {fr['freshness_p99_s']} s")
    say("consistency: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
    say(f"HR@10 {m['hr@10']:.4f} (NDCG@10 {m['ndcg@10']:.4f}) over {len(targets)} users; "
        f"popularity HR@10 {mp['hr@10']:.4f}")
    say(f"report: {os.path.join(args.out, 'report.json')}")
    return report


if __name__ == "__main__":
    report = main()
    ok = all(report["consistency"][k] for k in ("served_rows_equal_trained", "served_id_set_equal",
                                                "dense_equal_trained", "last_step_rows_visible", "scores_equal"))
    sys.exit(0 if ok else 1)
