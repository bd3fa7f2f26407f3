"""Does aborting a hung NCCL collective work here (this torch, this NCCL, this driver)?

The elastic launcher's NCCL recovery rests on it (integrations/ray/elastic.py, ``_abort_collectives``):
two processes on two GPUs form an NCCL group and run one good all-reduce; rank 1 then SIGKILLs
itself, and rank 0's next all-reduce, whose peer is dead, hangs until another thread of rank 0
aborts the group (``ProcessGroup.abort()``), as the launcher's watch thread does. Rank 0 must get
its wait back, tear the group down with ``_abort_process_group()`` and form a new group of one on
a new store whose all-reduce works. No Ray involved: when the Ray test fails, this says whether
the NCCL mechanism underneath works. Writes a JSON record (``--json PATH``); exits 1 on failure.

    python scripts/nccl_abort_probe.py --json /tmp/out/nccl_abort_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch


def _rank(rank: int, port: int, abort_after_s: float, q) -> None:
    import torch.distributed as dist

    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"  # as the launcher: no watchdog action of its own
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    timeout = timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, timeout=timeout, device_id=dev)
    x = torch.ones(1 << 20, device=dev)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    good = float(x[0])
    if rank == 1:
        time.sleep(0.5)  # rank 0 is inside its next all-reduce by then
        os.kill(os.getpid(), signal.SIGKILL)
    pg = dist.group.WORLD
    timing = {}

    def abort() -> None:
        t = time.time()
        pg.abort()
        timing["abort_call_s"] = time.time() - t

    timer = threading.Timer(abort_after_s, abort)
    t0 = time.time()
    timer.start()
    dist.all_reduce(x)  # the peer is dead: the kernel waits for it until the abort
    torch.cuda.current_stream().synchronize()
    returned = time.time() - t0
    timer.join()
    t = time.time()
    dist.distributed_c10d._abort_process_group()
    teardown = time.time() - t
    t = time.time()
    store2 = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
    dist.init_process_group("nccl", store=store2, rank=0, world_size=1, timeout=timeout, device_id=dev)
    y = torch.full((4,), 3.0, device=dev)
    dist.all_reduce(y)
    regrouped = y.tolist() == [3.0] * 4
    regroup_s = time.time() - t
    dist.destroy_process_group()
    q.put({"good_all_reduce_value": good, "hung_wait_returned_after_s": round(returned, 3),
           "abort_requested_after_s": abort_after_s, "abort_call_s": round(timing.get("abort_call_s", -1), 3),
           "teardown_s": round(teardown, 3), "regroup_s": round(regroup_s, 3), "regrouped_all_reduce_ok": regrouped})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--abort-after-s", type=float, default=2.0)
    ap.add_argument("--timeout-s", type=float, default=90.0)
    args = ap.parse_args()
    record = {"torch": torch.__version__, "cuda_devices": torch.cuda.device_count()}
    if torch.cuda.device_count() < 2:
        record["skipped"] = f"needs 2 CUDA devices, found {torch.cuda.device_count()}"
    else:
        import socket

        import torch.multiprocessing as mp

        record["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, port, args.abort_after_s, q)) for r in (0, 1)]
        for p in procs:
            p.start()
        try:
            record.update(q.get(timeout=args.timeout_s))
        except Exception:  # queue.Empty: rank 0 never got its wait back (or died)
            record["error"] = (f"rank 0 reported nothing within {args.timeout_s} s: the aborted collective did not "
                               f"return, or rank 0 failed (exit code {procs[0].exitcode})")
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        record["rank1_exitcode"] = procs[1].exitcode  # -9: it died by SIGKILL, as planned
        ok = record.get("regrouped_all_reduce_ok") is True and record.get("good_all_reduce_value") == 2.0
        record["ok"] = ok
    print(json.dumps(record, indent=1))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)
    return 0 if record.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
