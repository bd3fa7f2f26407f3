"""Freshness of training -> serving sync: TierPS -> Syncer -> real Redis on loopback.

What runs (all on this machine, Redis on 127.0.0.1, no persistence):

* **Baseline** (the ceiling, same run): raw redis-py pipelined ``MSET`` of 256-byte rows in
  chunks of 1,000 and 10,000 (keys and values pre-built), and pipelined ``MGET``.
* **Sustained levels**: a trainer-like writer thread updates rows of dim 64 (fp32) of a
  TierPS at a fixed rate (uniform ids over ``--ids``, batches of 5,000; each row carries its
  write time in its first 8 bytes), the :class:`~gauss_plugins.stores.syncer.Syncer` pushes
  to :class:`~gauss_integrations.redis.store.RedisWePS` every ``--interval`` seconds, and a
  reader *process* polls 1,000 random ids with ``MGET`` every 50 ms; each time it sees a row's write
  time advance, ``seen - written`` is one freshness sample (end to end, including the
  reader's polling delay, so an over-estimate). A level is *sustained* when the writer
  reached >= 95% of its target rate, the lag did not grow (p90 freshness of the run's second
  half <= 1.25 x the first half's + one interval) and the syncer was caught up within one
  interval + 0.5 s after the writer stopped.
* **Restart**: the writer runs while redis-server is SIGKILLed and restarted empty; after
  the writer stops and the syncer catches up, every row of TierPS is compared with Redis:
  ``redis_restart_lost_rows`` counts rows missing or different (and deleted rows present).

Summary keys: ``p99_freshness_s`` / ``p50_freshness_s`` (reader-measured, at the highest
sustained level), ``sustained_rows_per_s`` (changed rows/s pushed at that level),
``rows_per_s_at_p99_freshness_le_1s`` (the same at the highest sustained level whose p99 is
within 1 s), ``redis_restart_lost_rows``, ``ceiling_mset_rows_per_s_chunk10000`` (the
baseline of this run), and the machine's load average before and after (2 shared cores:
other jobs running at the same time lower every number here, the baseline included).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

import numpy as np
import torch

from gauss_plugins.benchmarking import parser, print_table, write_report

DIM = 64
BATCH = 5000


# ---------------------------------------------------------------------------- redis-server
class Server:
    def __init__(self, workdir: str):
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found: apt-get install redis-server")
        self.binary, self.workdir = binary, workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.workdir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------- baseline
def baseline(port: int, rows: int) -> List[Dict[str, Any]]:
    import redis

    client = redis.Redis(port=port)
    value = bytes(range(256))
    mapping = {b"bench:%012d" % i: value for i in range(rows)}
    keys = list(mapping)
    out = []
    for chunk in (1000, 10_000):
        items = list(mapping.items())
        chunks = [dict(items[s:s + chunk]) for s in range(0, rows, chunk)]
        best = 0.0
        for _ in range(2):
            client.flushall()
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for c in chunks:
                pipe.mset(c)
            pipe.execute()
            best = max(best, rows / (time.perf_counter() - t0))
        out.append({"case": f"baseline redis-py pipelined MSET 256B, chunk {chunk}", "rows_per_s": best})
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for s in range(0, rows, 10_000):
        pipe.mget(keys[s:s + 10_000])
    pipe.execute()
    out.append({"case": "baseline redis-py pipelined MGET 256B, chunk 10000", "rows_per_s": rows / (time.perf_counter() - t0)})
    client.flushall()
    return out


# ---------------------------------------------------------------------------- reader process
def reader_main(port: int, prefix: bytes, ids: np.ndarray, duration: float, out_path: str) -> None:
    import redis

    from gauss_integrations.redis.store import row_keys

    client = redis.Redis(port=port, socket_timeout=2)
    keys = [k.tobytes() for k in row_keys(prefix, torch.from_numpy(ids))]
    last = np.zeros(len(keys))
    samples: List[float] = []
    end = time.time() + duration
    first = True
    while time.time() < end:
        try:
            vals = client.mget(keys)
        except redis.exceptions.RedisError:
            time.sleep(0.05)
            continue
        seen = time.time()
        written = np.array([np.frombuffer(v[:8], dtype=np.float64)[0] if v is not None else 0.0 for v in vals])
        newer = written > last
        if not first:  # the first poll shows old state, not transitions
            samples.extend([seen, f] for f in (seen - written[newer]).tolist())
        last = np.maximum(last, written)
        first = False
        time.sleep(0.05)  # 20k keys/s of polling: a light load next to the writes measured
    with open(out_path, "w") as f:
        json.dump(samples, f)


# ---------------------------------------------------------------------------- writer
class Writer(threading.Thread):
    """Puts BATCH uniform random rows at ``rate`` rows/s; each row's first 8 bytes = write time."""

    def __init__(self, ps, num_ids: int, rate: float, duration: float, seed: int, delete_every: int = 0):
        super().__init__(daemon=True)
        self.ps, self.num_ids, self.rate, self.duration = ps, num_ids, rate, duration
        self.g = torch.Generator().manual_seed(seed)
        self.delete_every = delete_every
        self.rows = 0
        self.deleted: List[torch.Tensor] = []
        self.max_put_s = 0.0
        self.elapsed = 0.0

    def run(self) -> None:
        t_start = time.monotonic()
        n = 0
        base = torch.randn(BATCH, DIM, generator=self.g)
        while True:
            now = time.monotonic()
            if now - t_start >= self.duration:
                break
            due = t_start + n * BATCH / self.rate
            if now < due:
                time.sleep(due - now)
            ids = torch.randint(0, self.num_ids, (BATCH,), generator=self.g)
            vals = base.clone()
            vals[:, :2] = torch.tensor([time.time()], dtype=torch.float64).view(torch.float32)
            t0 = time.monotonic()
            self.ps.put(ids, vals)
            if self.delete_every and n % self.delete_every == 0:
                d = torch.randint(0, self.num_ids, (50,), generator=self.g)
                self.ps.delete(d)
                self.deleted.append(d)
            self.max_put_s = max(self.max_put_s, time.monotonic() - t0)
            self.rows += BATCH
            n += 1
        self.elapsed = time.monotonic() - t_start


def fill(ps, num_ids: int) -> None:
    for s in range(0, num_ids, 100_000):
        ids = torch.arange(s, min(s + 100_000, num_ids))
        v = torch.zeros(ids.numel(), DIM)
        ps.put(ids, v)


def wait_caught_up(syncer, ps, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = syncer.stats()
        if s["pushed_version"] == ps.version and s["pending_rows"] == 0 and s["consecutive_failures"] == 0:
            return time.monotonic() - t0
        time.sleep(0.01)
    return float("inf")


def run_level(server, ps, store, syncer, num_ids, rate, duration, seed, tmp) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)
    probe = rng.choice(num_ids, size=min(1000, num_ids), replace=False).astype(np.int64)
    out_path = os.path.join(tmp, f"reader-{rate}.json")
    ctx = mp.get_context("spawn")
    reader = ctx.Process(target=reader_main, args=(server.port, store.key_prefix, probe, duration + 1.0, out_path))
    reader.start()
    time.sleep(0.5)  # let the reader take its first look
    pushed0, reports0 = syncer.rows_pushed, len(syncer.reports)
    w = Writer(ps, num_ids, rate, duration, seed)
    w.start()
    w.join()
    catch_up = wait_caught_up(syncer, ps, 30.0)
    pushed = syncer.rows_pushed - pushed0
    reader.join(duration + 30)
    pairs = np.array(json.load(open(out_path))).reshape(-1, 2) if os.path.exists(out_path) else np.empty((0, 2))
    samples = pairs[:, 1]
    reports = list(syncer.reports)[reports0:]
    achieved = w.rows / max(w.elapsed, 1e-9)
    # Keeping up = a lag that does not grow: the second half of the run is not staler than
    # the first (p90, with one interval of slack), and the backlog is gone soon after.
    def p90(x: np.ndarray) -> float:
        return float(np.percentile(x, 90)) if x.size >= 10 else float("inf")  # too few to judge

    mid = (pairs[:, 0].min() + pairs[:, 0].max()) / 2 if len(pairs) else 0.0
    first_p90, second_p90 = p90(pairs[pairs[:, 0] <= mid, 1]), p90(pairs[pairs[:, 0] > mid, 1])
    sustained = bool(achieved >= 0.95 * rate and catch_up <= syncer.interval_s + 0.5
                     and second_p90 <= 1.25 * first_p90 + syncer.interval_s)
    return {
        "case": f"writer {rate / 1000:.0f}k rows/s", "target_rows_per_s": rate, "written_rows_per_s": achieved,
        "pushed_rows_per_s": pushed / max(w.elapsed, 1e-9), "catch_up_s": catch_up, "sustained": sustained,
        "reader_samples": int(samples.size), "p90_freshness_first_half_s": first_p90,
        "p90_freshness_second_half_s": second_p90,
        "p50_freshness_s": float(np.percentile(samples, 50)) if samples.size else None,
        "p99_freshness_s": float(np.percentile(samples, 99)) if samples.size else None,
        "syncer_p99_freshness_s": float(np.nanmax([r["freshness_p99_s"] for r in reports])) if reports else None,
        "pushes": len(reports),
        "mean_push_latency_s": float(np.mean([r["latency_s"] for r in reports])) if reports else None,
        "max_put_s": w.max_put_s,
    }


def restart_phase(server, ps, store, syncer, num_ids, rate, duration, seed) -> Dict[str, Any]:
    w = Writer(ps, num_ids, rate, duration, seed, delete_every=5)
    w.start()
    time.sleep(duration * 0.3)
    server.kill()
    time.sleep(duration * 0.3)
    server.start()
    w.join()
    catch_up = wait_caught_up(syncer, ps, 60.0)
    missing = differ = 0
    for batch in ps.export(100_000):
        got = store.lookup(batch.ids)
        # Compare bits: the write time packed into the first two floats can be a NaN pattern.
        diff = (got.values.view(torch.int32) != batch.values.view(torch.int32)).any(1)
        missing += int((~got.found).sum())
        differ += int((got.found & diff).sum())
    deleted = torch.unique(torch.cat(w.deleted)) if w.deleted else torch.empty(0, dtype=torch.int64)
    gone = deleted[~ps.lookup(deleted, promote=False).found]
    stale = int(store.lookup(gone).found.sum())  # deleted in training, still served
    s = syncer.stats()
    return {"case": f"restart: redis-server SIGKILLed + restarted empty, writer {rate / 1000:.0f}k rows/s",
            "lost_rows": missing + differ + stale, "missing_rows": missing, "different_rows": differ,
            "stale_deleted_rows": stale, "catch_up_s": catch_up, "resyncs": s["resyncs"], "failures": s["failures"],
            "max_put_s": w.max_put_s, "written_rows_per_s": w.rows / max(w.elapsed, 1e-9)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ids", type=int, default=None, help="id space (table rows)")
    p.add_argument("--interval", type=float, default=0.25, help="syncer interval_s")
    p.add_argument("--rates", default=None, help="comma-separated writer rates, rows/s")
    p.add_argument("--duration", type=float, default=None, help="seconds per level")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (writer, syncer and redis-server share the cores; more "
                        "OpenMP threads than free cores make every sort and gather many times slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a long run is
    # SIGTERM (timeout, a CI cancel) unwinds through `finally`, which stops redis-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    num_ids = args.ids or (200_000 if args.quick else 1_000_000)
    duration = args.duration or (6.0 if args.quick else 15.0)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else (
        [150_000, 300_000] if args.quick else [150_000, 200_000, 250_000, 300_000, 400_000])

    from gauss_integrations.redis.store import RedisWePS
    from gauss_plugins.stores.syncer import Syncer
    from gauss_plugins.stores.tierps import TierPS

    # Other work on this machine slows Redis and the syncer alike: record how busy it was.
    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="gauss-bench-sync-")
    server = Server(tmp)
    server.start()
    results: List[Dict[str, Any]] = []
    try:
        import redis

        server_version = redis.Redis(port=server.port).info("server")["redis_version"]
        results += baseline(server.port, 200_000 if args.quick else 500_000)
        ps = TierPS(DIM, os.path.join(tmp, "ps"), ram_bytes=2 * num_ids * (4 * DIM + 32))
        store = RedisWePS(DIM, port=server.port, model="bench", socket_timeout=2.0, socket_connect_timeout=0.5)
        fill(ps, num_ids)
        t0 = time.perf_counter()
        syncer = Syncer(ps, store, interval_s=args.interval, start=False)
        assert syncer.sync_now(), syncer.last_error
        full = time.perf_counter() - t0
        results.append({"case": f"initial full push of {num_ids} rows (RedisWePS)", "rows_per_s": num_ids / full})
        syncer.start()
        for i, rate in enumerate(rates):
            results.append(run_level(server, ps, store, syncer, num_ids, rate, duration, 10 + i, tmp))
        results.append(restart_phase(server, ps, store, syncer, num_ids, min(rates), max(6.0, duration * 0.6), 99))
        syncer.close()
        ps.close(flush=False)  # a throw-away store: persisting a million rows is not measured here
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    print_table(results, ["case", "rows_per_s", "target_rows_per_s", "written_rows_per_s", "pushed_rows_per_s",
                          "sustained", "catch_up_s", "p50_freshness_s", "p99_freshness_s", "syncer_p99_freshness_s",
                          "mean_push_latency_s", "max_put_s", "lost_rows"])
    levels = [r for r in results if "sustained" in r]
    ok = [r for r in levels if r["sustained"]]
    best = max(ok, key=lambda r: r["target_rows_per_s"]) if ok else None
    ceiling = next(r["rows_per_s"] for r in results if r["case"].endswith("chunk 10000") and "MSET" in r["case"])
    fresh = [r for r in ok if r["p99_freshness_s"] is not None and r["p99_freshness_s"] <= 1.0]
    best_fresh = max(fresh, key=lambda r: r["target_rows_per_s"]) if fresh else None
    summary = {
        "p99_freshness_s": best["p99_freshness_s"] if best else None,
        "p50_freshness_s": best["p50_freshness_s"] if best else None,
        "sustained_rows_per_s": best["pushed_rows_per_s"] if best else 0.0,
        "sustained_target_rows_per_s": best["target_rows_per_s"] if best else 0.0,
        "rows_per_s_at_p99_freshness_le_1s": best_fresh["pushed_rows_per_s"] if best_fresh else 0.0,
        "redis_restart_lost_rows": results[-1]["lost_rows"],
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "ceiling_mset_rows_per_s_chunk10000": ceiling,
        "redis_server_version": server_version,
        "interval_s": args.interval,
        "torch_threads": args.threads,
        "dim": DIM,
        "id_space": num_ids,
    }
    write_report("sync_freshness", results, summary, args.json)


if __name__ == "__main__":
    main()
