"""The last step of ``gauss demo``: export the trained HSTU model and rank through the ``.pt2``.

From the HSTU run folder: freeze the item rows into a snapshot, export the ranker with the
retrieval head (the score the model was trained and evaluated with: ``<query at the last
history position, item>``) with AOTInductor (the parity check prints its max difference),
then, for a few users, take the history before their held-out test event (its most recent
``max_len`` items, as the evaluation cuts it) and rank ten candidates (the held-out item and
nine random items outside the history) through the compiled package, reading rows from the
snapshot, as a server would. Beside each rank is the held-out item's rank under the
evaluation's own score (``model.query`` / ``score_corpus``), and the step says whether they
agree; the same requests also go through the eager program, and the largest difference is
printed.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List

import torch

from gauss_plugins.export.aoti import LoadedPackage, export_aoti, load_package
from gauss_plugins.export.checkpoint import item_rows, load_trained_model
from gauss_plugins.export.predictor import Predictor, Request
from gauss_plugins.export.program import build_ranker
from gauss_plugins.export.snapshot import read_snapshot, write_snapshot

__all__ = ["export_and_rank"]


def export_and_rank(run_dir: str, out_dir: str, log: Callable[[str], None] = print, users: int = 3,
                    candidates: int = 10, seed: int = 0) -> Dict[str, object]:
    """Export the model of ``run_dir`` into ``out_dir`` and rank for ``users`` users; returns
    what was printed as a dict (paths, parity, ranks of the held-out items)."""
    from gauss_plugins.data.locate import load_configured_dataset

    t0 = time.time()
    trained = load_trained_model(run_dir)
    model, config = trained.model, trained.config
    ids, rows, version = item_rows(model)
    os.makedirs(out_dir, exist_ok=True)
    snap_path = os.path.join(out_dir, "items.gsnp")
    pkg_path = os.path.join(out_dir, "hstu_ranker.pt2")
    write_snapshot(snap_path, ids, rows)
    log(f"\nExport: {trained.path} -> {pkg_path} (AOTInductor, retrieval head: the training score <query, item>; "
        f"compiling takes 20-150 s on this CPU)")
    result = export_aoti(model, pkg_path, model_version=trained.version, embedding_version=version,
                         embedding_source=f"snapshot:{os.path.abspath(snap_path)}", row_std=float(rows.std()),
                         head="retrieval")
    parity = result.parity
    # export_aoti raises ParityError (and writes nothing) on a failed check: reaching here means it passed.
    log(f"  parity check (eager vs .pt2, {parity.trials} random batches): max |diff| = {parity.max_abs_diff:.3g} "
        f"<= {parity.tolerance:g}: passed; export {result.export_s:.0f} s, compile {result.compile_s:.0f} s")
    log(f"  snapshot {snap_path}: {len(ids)} item rows ({version})")

    package = load_package(pkg_path)
    snapshot = read_snapshot(snap_path)
    predictor = Predictor(package, snapshot)
    seqs = load_configured_dataset(config.data.dataset, config.data.path, config.data.options)
    known = set(snapshot.ids.tolist())
    g = torch.Generator().manual_seed(seed)
    requests: List[Request] = []
    held_out: List[int] = []
    history_times: List[List[int]] = []
    candidate_times: List[List[int]] = []
    for u in range(len(seqs)):
        if len(requests) == users:
            break
        items, times = seqs.sequence(u)
        items = [int(i) for i in items]
        if len(items) < 3 or items[-1] not in known or any(i not in known for i in items[:-1]):
            continue
        history, target = items[:-1][-package.max_history:], items[-1]
        pool = torch.tensor(sorted(known - set(history) - {target}))
        others = pool[torch.randperm(len(pool), generator=g)[:candidates - 1]].tolist()
        requests.append(Request(tuple(history), tuple([target] + others)))
        held_out.append(target)
        if package.timed:
            ts = [int(t) for t in times]
            history_times.append(ts[:-1][-package.max_history:])
            candidate_times.append([ts[-1]] * candidates)  # every candidate is scored at the test event's time
    if not requests:
        log("  no user with a fully known history to rank for; skipped the ranking step")
        return {"package": pkg_path, "snapshot": snap_path, "parity_max_abs_diff": parity.max_abs_diff}
    times = (history_times, candidate_times) if package.timed else (None, None)
    scores = predictor.rank(requests, *times)
    eager_package = LoadedPackage(build_ranker(model, package.head), package.metadata, "eager program")
    eager = Predictor(eager_package, snapshot).rank(requests, *times)
    served_diff = max(float((a - b).abs().max()) for a, b in zip(scores, eager))
    ranks, retrieval_ranks = [], []
    log(f"  ranking {candidates} candidates (the held-out next item + {candidates - 1} random) for {len(requests)} "
        f"users through the .pt2 ({package.head} head{', with event times' if package.timed else ''}):")
    for i, (req, s, target) in enumerate(zip(requests, scores, held_out)):
        order = torch.argsort(s, descending=True).tolist()
        rank = int((s > s[0]).sum()) + 1  # counted as _retrieval_rank counts, so equal scores give equal ranks
        ranks.append(rank)
        retrieval_ranks.append(_retrieval_rank(model, req, history_times[i] if package.timed else None))
        top = ", ".join(f"{req.candidates[j]} ({s[j]:.3f})" for j in order[:3])
        log(f"    history of {len(req.history)} items -> top 3: {top}; held-out item {target} ranked {rank}/{candidates} "
            f"by the .pt2, {retrieval_ranks[-1]}/{candidates} by the evaluation's score (model.query)")
    differ = sum(a != b for a, b in zip(ranks, retrieval_ranks))
    if differ == 0:
        log(f"  the .pt2's ranks equal the evaluation's for all {len(ranks)} users")
    else:  # possible only for near-ties (eager and compiled differ by ~1e-7) or a serving fault
        log(f"  the .pt2's ranks DIFFER from the evaluation's for {differ} of {len(ranks)} users")
    log(f"  .pt2 vs eager on these requests: max |diff| = {served_diff:.3g}; step total {time.time() - t0:.0f} s")
    return {"package": pkg_path, "snapshot": snap_path, "parity_max_abs_diff": parity.max_abs_diff,
            "served_max_abs_diff": served_diff, "held_out_ranks": ranks, "retrieval_ranks": retrieval_ranks,
            "ranks_agree": differ == 0, "head": package.head, "export_s": result.export_s,
            "compile_s": result.compile_s}



@torch.no_grad()
def _retrieval_rank(model, req: Request, history_times) -> int:
    """Rank of the first candidate under the score the model was trained with:
    ``<query at the last history position, L2-normalised item embedding>``."""
    if not req.history:
        return 0
    ids = torch.tensor([req.history], dtype=torch.int64)
    times = torch.tensor([history_times], dtype=torch.int64) if history_times is not None else None
    query = model.query(ids, torch.tensor([len(req.history)]), times)
    scores = model.score_corpus(query, model.item_vectors(torch.tensor(req.candidates)))[0]
    return int((scores > scores[0]).sum()) + 1
