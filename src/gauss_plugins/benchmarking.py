"""The benchmark convention shared by every script under ``benchmarks/``.

Each script measures the system and its baseline in the same run, prints a table, writes
``{"benchmark", "machine", "results", "summary"}`` JSON with ``--json PATH`` (plus
``"targets"``: summary key -> ``">= 0.5"`` / ``"<= 24"`` where the issue sets one), supports
``--quick`` (about a minute on the 2-core CPU machine), and ends with a one-line summary.

A benchmark that cannot run here (a GPU-only one on a CPU machine, ML data that is absent)
calls :func:`write_skip`: its JSON is ``{"benchmark", "machine", "skipped": "<reason>"}`` and
it exits 0, so ``make bench`` goes on and ``benchmarks/summarize.py`` shows the reason.
Redis-backed benchmarks start a private server with :class:`RedisServer`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional


def machine_info() -> Dict[str, Any]:
    """CPU/GPU model, thread count and library versions, for the JSON record."""
    import torch

    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for mod in ("triton", "torchrec", "fbgemm_gpu", "redis", "ray", "pytorch_lightning"):
        info[mod] = _version_of(mod)
    return info


def _version_of(module: str) -> Optional[str]:
    from importlib import metadata

    dist = {"fbgemm_gpu": "fbgemm-gpu-cpu", "pytorch_lightning": "pytorch-lightning"}.get(module, module)
    for name in (dist, module, "fbgemm-gpu" if module == "fbgemm_gpu" else dist):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small run, about a minute on the CPU machine")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    return p


def gpu_list(text: str) -> List[str]:
    """``--gpus`` of the scripts that spread processes over GPUs: ``"0,1"`` -> ``["0", "1"]``
    (CUDA device numbers, each process's CUDA_VISIBLE_DEVICES in turn). An argparse ``type``."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise argparse.ArgumentTypeError(f"--gpus takes CUDA device numbers separated by commas (e.g. 0,1), "
                                         f"got {text!r}")
    return gpus


def print_table(rows: Iterable[Dict[str, Any]], columns: Optional[List[str]] = None) -> None:
    rows = list(rows)
    if not rows:
        return
    columns = columns or list(rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_report(name: str, results: List[Dict[str, Any]], summary: Dict[str, Any], json_path: Optional[str],
                 targets: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Write the JSON record (atomically) when asked, and print the one-line summary last.

    ``targets`` maps summary keys to the goal the issue sets, as ``">= 0.5"`` or ``"<= 24"``."""
    report: Dict[str, Any] = {"benchmark": name, "machine": machine_info(), "results": results, "summary": summary}
    if targets:
        bad = {k: v for k, v in targets.items() if parse_target(v) is None}
        if bad:
            raise ValueError(f"targets must read like '>= 0.5' or '<= 24', got {bad}")
        report["targets"] = dict(targets)
    _write_json(json_path, report)
    print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()))
    return report


def write_skip(name: str, reason: str, json_path: Optional[str]) -> Dict[str, Any]:
    """Record that the benchmark cannot run on this machine, and why (the caller then exits 0)."""
    report = {"benchmark": name, "machine": machine_info(), "skipped": reason}
    _write_json(json_path, report)
    print(f"{name}: skipped ({reason})")
    return report


def _write_json(json_path: Optional[str], report: Dict[str, Any]) -> None:
    if json_path:
        from gauss_plugins.train.report import write_json

        write_json(json_path, report)


def parse_target(target: str) -> Optional[tuple]:
    """``">= 0.5"`` -> ``(">=", 0.5)``; None when it does not read like that."""
    parts = str(target).split()
    if len(parts) != 2 or parts[0] not in (">=", "<=", "=="):
        return None
    try:
        return parts[0], float(parts[1])
    except ValueError:
        return None


def meets_target(value: Any, target: str) -> Optional[bool]:
    """Whether ``value`` meets ``target`` (None when either is not a number / a target)."""
    parsed = parse_target(target)
    if parsed is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    op, bound = parsed
    return {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op]


def cuda_skip_reason() -> Optional[str]:
    """Why a GPU-only benchmark cannot run here (None when a CUDA device is usable)."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False on this machine)"
    return None


class RedisServer:
    """A private ``redis-server`` on a free loopback port, without persistence (``--save ''
    --appendonly no``: a :meth:`kill` really loses the data), as the store tests run it.

    ``with RedisServer() as server:`` starts it and always stops it; :meth:`kill` and
    :meth:`start` restart it on the same port (the Redis-restart measurements).
    :func:`redis_skip_reason` says beforehand whether one can be started here.
    """

    def __init__(self, workdir: Optional[str] = None, extra_args: Iterable[str] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found on PATH: apt-get install redis-server")
        self.binary = binary
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="gauss-bench-redis-")
        self.extra_args = tuple(extra_args)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.proc is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        os.makedirs(self.workdir, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--protected-mode", "yes", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"redis-server exited with {code} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64)[:1] in (b"+", b"-"):  # -NOAUTH counts: the server is up
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def redis_skip_reason() -> Optional[str]:
    """Why a Redis-backed benchmark cannot run here (None when it can)."""
    if shutil.which("redis-server") is None:
        return "redis-server not found on PATH (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py missing: pip install -c constraints.txt 'gauss-plugins[redis]'"
    return None
