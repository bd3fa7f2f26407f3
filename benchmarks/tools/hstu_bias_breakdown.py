"""Where the relative position bias costs time in the Triton HSTU kernels (GPU diagnostic).

For each shape, times fwd+bwd (CUDA graph replay, median) and each kernel (torch.profiler,
summed device time per kernel name) for: no bias; position bias without its gradient; with
its gradient reduced per tile diagonal (``pos_diag``: the default way, carried wraps;
``pos_diag_columns`` / ``pos_diag_rows``: the other two); with one atomic per pair; each
with the bias read from strips and from per-element gathers; ``*_nocap`` variants leave out
the register caps of the tile configs. ``--variants`` picks some. Writes JSON (``--json``, with
the tile config each kernel was tuned to) and prints a table.
Not a benchmark with a target: ``benchmarks/hstu_attention.py`` owns ``rab_cost_ratio``.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from typing import Any, Dict, List

import torch

SHAPES = {"n4096_bf16": (8, 4096, 4, 128, torch.bfloat16), "ml1m_fp32": (128, 200, 1, 50, torch.float32),
          "ml1m_bf16": (128, 200, 1, 50, torch.bfloat16), "n1024_bf16": (32, 1024, 4, 128, torch.bfloat16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="n4096_bf16,ml1m_fp32,ml1m_bf16")
    ap.add_argument("--strips", default="on,off", help="position strips: on, off or on,off")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tune-top", type=int, default=3, help="autotune over the first K candidates of each kernel")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variant names to run (default: all; 'none', the baseline, always runs)")
    ap.add_argument("--dkdv-configs", default="", metavar="M:N:W:S,...",
                    help="also time pos_diag with the dK/dV kernel pinned to each of these tile configs")
    args = ap.parse_args()
    from gauss_plugins.benchmarking import machine_info
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        if args.json:
            json.dump({"skipped": "needs a CUDA device"}, open(args.json, "w"))
        return
    import importlib.util
    import os

    # the input builders and timers of the attention benchmark, beside this folder
    spec = importlib.util.spec_from_file_location(
        "hstu_attention_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hstu_attention.py"))
    hb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hb)
    from gauss_kernels.hstu import triton_attention as ta

    backend = ta.hstu_attention_triton()
    for table in (ta._CANDIDATES, ta._WIDE_CANDIDATES):
        for kind in table:
            for d in table[kind]:
                table[kind][d] = table[kind][d][:args.tune_top]
    capped = {id(t): {kind: dict(t[kind]) for kind in t} for t in (ta._CANDIDATES, ta._WIDE_CANDIDATES)}

    def use_capped_configs(on: bool, dkdv: Any = None) -> None:
        # the same first K candidates, with or without their register caps (or one pinned dK/dV
        # config); tuning is redone so each variant is timed with the config it would get
        for table in (ta._CANDIDATES, ta._WIDE_CANDIDATES):
            for kind in table:
                for d, configs in capped[id(table)][kind].items():
                    if not on:  # the same tiles uncapped
                        configs = list(dict.fromkeys(c._replace(maxnreg=None) for c in configs))
                    table[kind][d] = configs
                    if kind == "dkdv" and dkdv is not None:
                        table[kind][d] = [dkdv]
        ta._tuned.clear()

    pinned = {f"pos_diag@{c}": ta._Config(*map(int, c.split(":"))) for c in args.dkdv_configs.split(",") if c}

    info = machine_info()

    def save(rows: List[Dict[str, Any]], complete: bool) -> None:
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"rows": rows, "complete": complete, "machine": info}, f, indent=1)
            os.replace(tmp, args.json)

    wanted = None if args.variants is None else set(args.variants.split(",")) | {"none"}
    rows: List[Dict[str, Any]] = []
    for shape in args.shapes.split(","):
        B, N, H, D, dtype = SHAPES[shape]
        lengths, offsets, q, k, v = hb.make_inputs(B, N, H, D, "cuda", dtype, 0)
        go = torch.randn_like(v)
        table = (0.1 * torch.randn(2 * N - 1, device="cuda"))
        flops = hb.fwd_flops(lengths, H, D)
        opts = dict(max_seq_len=N, alpha=1.0 / math.sqrt(D), causal=True)
        variants = [("none", None, True, True, "carried", False), ("none_nocap", None, True, True, "carried", False)]
        for strips in [{"on": True, "off": False}[x] for x in args.strips.split(",")]:
            variants += [("pos_nograd", table, strips, True, "carried", False),
                         ("pos_nograd_nocap", table, strips, True, "carried", False),
                         ("pos_diag", table, strips, True, "carried", True),
                         ("pos_diag_nocap", table, strips, True, "carried", True),
                         ("pos_diag_columns", table, strips, True, "columns", True),
                         ("pos_diag_rows", table, strips, True, "rows", True),
                         ("pos_pairs", table, strips, False, "carried", True)]
            if strips:
                variants += [("pos_nograd_noprefetch", table, strips, True, "carried", False),
                             ("pos_diag_noprefetch", table, strips, True, "carried", True)]
                variants += [(name, table, strips, True, "carried", True) for name in pinned]
        base = None
        for name, tab, strips, diagonal, rotation, grad in variants:
            if wanted is not None and name not in wanted and name not in pinned:
                continue
            use_capped_configs("nocap" not in name, pinned.get(name))
            ta._position_strips = strips
            ta._diagonal_position_grads = diagonal
            ta._diagonal_rotation = rotation
            ta._strip_prefetch = "noprefetch" not in name
            o = dict(opts) if tab is None else dict(opts, position_bias=tab)

            def fwdbwd(o=o, grad=grad):
                out = backend.forward(q, k, v, offsets, **o)
                return out, backend.backward(go, q, k, v, offsets, compute_drab=False,
                                             compute_dposition_bias=grad, compute_dtime_bias=False, **o)

            fwdbwd()
            torch.cuda.synchronize()
            ms = hb.time_graph(fwdbwd) * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fwdbwd()
                torch.cuda.synchronize()
            per = defaultdict(float)
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
                if ev.key.startswith("hstu_"):
                    per[ev.key] += t / 10 / 1e3
            row = dict(shape=shape, variant=name, strips=strips if tab is not None else None, fwdbwd_ms=ms,
                       tflops=3.5 * flops / (ms / 1e3) / 1e12,
                       fwd_ms=per.get("hstu_fwd_kernel"), dkdv_ms=per.get("hstu_bwd_dkdv_kernel"),
                       dq_ms=per.get("hstu_bwd_dq_kernel"),
                       tuned={key[0]: list(cfg) for key, cfg in ta._tuned.items()})
            if name == "none":
                base = ms
            row["ratio_vs_none"] = ms / base
            rows.append(row)
            print({k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in row.items()}, flush=True)
            save(rows, complete=False)  # a run cut short by a time limit keeps the rows it has
    ta._position_strips = True
    ta._diagonal_position_grads = True
    ta._diagonal_rotation = "carried"
    ta._strip_prefetch = True
    use_capped_configs(True)
    save(rows, complete=True)


if __name__ == "__main__":
    main()
