"""M-FALCON candidate scoring: the cached-history path against the uncached one, same run.

What runs (CPU, or CUDA when there is a device; fp32; an HSTU encoder with position + time
bias, in eval mode): ``users`` users, each with a ``history``-long history and
``candidates`` candidates, scored in micro-batches of ``mb`` candidates per user.

* **Baseline**: :meth:`MFalcon.score`, one full encoder pass per round over
  ``[history ; round's candidates]`` (every block's projections, norms and output layers
  run on the history again in every round).
* **Cached**: :meth:`MFalcon.encode_history` once, then :meth:`MFalcon.score_cached`: only
  the candidate rows go through the blocks, all rounds at once; each block's attention is
  one ``hstu_attention`` call over ``[cached K/V ; round's K/V]`` per (user, round) with
  ``num_targets`` (the fused kernel on CUDA). ``cached_s`` includes encoding the history;
  ``cache_reused_s`` is a later request against the same cached history.

The attention of a round costs the same FLOPs on both paths (the op computes every row of
``[history ; candidates]``; the history rows' outputs are dropped): the cache saves the
history's projections, norms and output layers, one launch per round (rounds run
together), and the history pass when it is reused.

On the CPU (reference backend) the attention, which pads every sequence to
``max_seq_len`` and builds its bias densely, is nearly all of the time, so the cache does
not pay there (measured 2026-11-29 on the 2-core machine, one thread: 0.4-0.7x); what it
saves is meant for the fused kernel on CUDA, where this benchmark has not run yet.

Each row also records the largest difference between the two outputs (they compute the
same function). Summary keys: ``cached_speedup_mb64`` (baseline time / cached time at the
largest micro-batch), ``cache_reused_speedup_mb64`` (same, the history already cached),
``cached_candidates_per_s_mb64``, ``max_abs_diff``, and ``mfalcon_speedup_gpu`` (on CUDA;
``mfalcon_speedup_cpu`` elsewhere): the cached M-FALCON time at micro-batch 64 against one
forward per candidate (micro-batch 1: an encoder pass over ``[history ; candidate]`` per
candidate, batched over the users), the issue's M-FALCON comparison through the fused kernel.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List

import torch

from gauss_plugins.benchmarking import median_time, parser, print_table, write_report
from gauss_plugins.hstu.mfalcon import MFalcon
from gauss_plugins.hstu.modules import HSTUConfig, HSTUEncoder
from gauss_plugins.jagged import lengths_to_offsets

NAME = "mfalcon"


def make_inputs(users: int, history: int, candidates: int, dim: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ho = lengths_to_offsets(torch.full((users,), history, dtype=torch.int64))
    co = lengths_to_offsets(torch.full((users,), candidates, dtype=torch.int64))
    h = torch.randn(users * history, dim, generator=g)
    c = torch.randn(users * candidates, dim, generator=g)
    # increasing history times (gaps up to a day), candidates scored "now"
    ht = torch.randint(1, 86_400, (users, history), generator=g).cumsum(1).reshape(-1)
    ct = ht.view(users, history)[:, -1:].expand(users, candidates).reshape(-1) + 60
    return [t.to(device) for t in (h, ho, c, co, ht, ct)]


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mfalcon: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.quick:
        users, history, candidates, dim, blocks, repeats = 8, 60, 64, 32, 2, 3
        micro_batches = (16, 64)
    else:
        users, history, candidates, dim, blocks, repeats = 32, 200, 512, 64, 2, 5
        micro_batches = (16, 64)
    torch.manual_seed(0)
    config = HSTUConfig(dim=dim, num_blocks=blocks, num_heads=2, max_seq_len=history + max(micro_batches),
                        dropout=0.0, num_time_buckets=128)
    encoder = HSTUEncoder(config).to(device).eval()
    h, ho, c, co, ht, ct = make_inputs(users, history, candidates, dim, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    results: List[Dict[str, Any]] = []
    for mb in micro_batches:
        mf = MFalcon(encoder, mb)
        uncached = mf.score(h, ho, c, co, ht, ct)
        cached = mf.score_cached(mf.encode_history(h, ho, ht), c, co, ct)
        diff = float((cached - uncached).abs().max())
        t_base = median_time(lambda: mf.score(h, ho, c, co, ht, ct), repeats, sync=sync)
        t_cached = median_time(lambda: mf.score_cached(mf.encode_history(h, ho, ht), c, co, ct), repeats, sync=sync)
        cache = mf.encode_history(h, ho, ht)
        t_reuse = median_time(lambda: mf.score_cached(cache, c, co, ct), repeats, sync=sync)
        scored = users * candidates
        results.append({"device": device.type, "users": users, "history": history, "candidates": candidates,
                        "micro_batch": mb, "rounds": -(-candidates // mb), "uncached_s": t_base,
                        "cached_s": t_cached, "cache_reused_s": t_reuse, "speedup": t_base / t_cached,
                        "speedup_cache_reused": t_base / t_reuse,
                        "cached_candidates_per_s": scored / t_cached, "max_abs_diff": diff})
    # One forward per candidate (what a ranker without the M-FALCON mask does): micro-batch 1,
    # every round an encoder pass over [history ; one candidate], batched over the users.
    per_candidate = MFalcon(encoder, 1)
    t_per = median_time(lambda: per_candidate.score(h, ho, c, co, ht, ct), 1 if not args.quick else repeats, sync=sync)
    for r in results:
        r["per_candidate_s"] = t_per
        r["mfalcon_speedup"] = t_per / r["cached_s"]
    print_table(results)
    last = results[-1]
    summary = {"cached_speedup_mb64": round(last["speedup"], 3),
               "cache_reused_speedup_mb64": round(last["speedup_cache_reused"], 3),
               "cached_candidates_per_s_mb64": round(last["cached_candidates_per_s"], 1),
               "max_abs_diff": max(r["max_abs_diff"] for r in results), "device": device.type,
               # candidates/s of M-FALCON (cached history, mb 64) over one forward per candidate
               ("mfalcon_speedup_gpu" if device.type == "cuda" else "mfalcon_speedup_cpu"): round(last["mfalcon_speedup"], 2)}
    write_report(NAME, results, summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
