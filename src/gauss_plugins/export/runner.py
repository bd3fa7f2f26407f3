"""Build and call ``gauss-runner``, the C++ program that serves a ``.pt2`` ranker without Python.

The sources ship with the package (``runner/main.cpp``, ``runner/CMakeLists.txt``). They are
compiled with CMake against the libtorch of the *installed* torch (``torch.utils.cmake_prefix_path``):
an AOTInductor package must be loaded by the libtorch that compiled it. The Redis embedding
source is compiled in when hiredis is found (``apt-get install libhiredis-dev``).

The binary is cached under ``$GAUSS_PLUGINS_CACHE/runner`` (default
``$XDG_CACHE_HOME/gauss_plugins`` or ``~/.cache/gauss_plugins``) in a folder named by a hash
of the sources, the torch version, the compiler and whether hiredis is present, so a new
torch or a newly installed hiredis gives a new build and an unchanged setup none. A build
takes about a minute on two cores; ``gauss build-runner`` does it ahead of time.

:func:`run_runner` feeds requests to the binary and parses its scores; it is what the tests
and ``benchmarks/serving.py`` compare with the Python predictor.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["RunnerBuildError", "RunnerError", "build_runner", "build_skip_reason", "find_runner", "format_requests",
           "run_runner", "run_runner_timed", "runner_has_redis"]

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner")
SOURCES = ("main.cpp", "CMakeLists.txt")
BINARY = "gauss-runner"
# Where a hiredis install puts its header; part of the cache key so that installing
# libhiredis-dev later leads to a build with Redis support.
_HIREDIS_HEADERS = ("/usr/include/hiredis/hiredis.h", "/usr/local/include/hiredis/hiredis.h")


class RunnerBuildError(RuntimeError):
    """gauss-runner could not be built here (the message says what is missing or what failed)."""


class RunnerError(RuntimeError):
    """gauss-runner exited with an error; ``returncode`` and ``stderr`` hold what it said."""

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def _cache_root() -> str:
    from gauss_plugins._cachedir import cache_root

    return cache_root("runner")


def _tool_version(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build_key() -> str:
    import torch

    key = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(SOURCE_DIR, name), "rb") as f:
            key.update(f.read())
        key.update(b"\0")
    cxx = _compiler() or ""
    for part in (torch.__version__, torch.__file__, cxx, _tool_version([cxx, "--version"]) if cxx else "",
                 platform.machine(), ",".join(p for p in _HIREDIS_HEADERS if os.path.exists(p))):
        key.update(part.encode())
        key.update(b"\0")
    return key.hexdigest()[:20]


def _cached_path(build_dir: Optional[str]) -> str:
    folder = build_dir if build_dir is not None else os.path.join(_cache_root(), _build_key())
    return os.path.join(os.path.abspath(folder), BINARY)


def _stamp_ok(binary: str) -> bool:
    """The binary exists and was built from the current sources (the stamp holds the key)."""
    stamp = binary + ".key"
    if not os.path.isfile(binary) or not os.path.isfile(stamp):
        return False
    with open(stamp) as f:
        return f.read().strip() == _build_key()


def find_runner(build_dir: Optional[str] = None) -> Optional[str]:
    """The path of an up-to-date gauss-runner binary, or None when it has not been built."""
    binary = _cached_path(build_dir)
    return binary if _stamp_ok(binary) else None


def build_skip_reason() -> Optional[str]:
    """Why gauss-runner cannot be built here (None when cmake and a C++ compiler are present)."""
    if shutil.which("cmake") is None:
        return "cmake is not on PATH (apt-get install cmake, or pip install cmake)"
    if _compiler() is None:
        return "no C++ compiler on PATH (apt-get install g++, or set CXX)"
    return None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build_runner(build_dir: Optional[str] = None, *, force: bool = False, jobs: Optional[int] = None,
                 verbose: bool = False) -> str:
    """Compile gauss-runner unless an up-to-date build exists; returns the binary's path.

    ``build_dir``: where the binary goes (default: the cache folder for the current sources
    and torch). Raises :class:`RunnerBuildError` naming what to install when cmake or a C++
    compiler is missing, and with the tail of the compiler's output when the build fails.
    """
    import torch.utils

    binary = _cached_path(build_dir)
    if not force and _stamp_ok(binary):
        return binary
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RunnerBuildError("cmake is not on PATH: install it (apt-get install cmake, or pip install cmake) to "
                               "build gauss-runner")
    cxx = _compiler()
    if cxx is None:
        raise RunnerBuildError("no C++ compiler on PATH: install g++ (apt-get install g++) or set CXX to build "
                               "gauss-runner")
    folder = os.path.dirname(binary)
    os.makedirs(folder, exist_ok=True)
    started = time.perf_counter()
    if verbose:
        print(f"building gauss-runner into {folder} (about a minute) ...", file=sys.stderr, flush=True)
    # A private build tree, so two processes building at once never share CMake state; the
    # finished binary is renamed into place atomically.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tree:
        env = dict(os.environ, CXX=cxx)
        configure = [cmake, "-S", SOURCE_DIR, "-B", tree, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
        steps = [("configuring", configure),
                 ("compiling", [cmake, "--build", tree, "--parallel", str(jobs or min(4, os.cpu_count() or 1))])]
        for what, cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            if proc.returncode != 0:
                raise RunnerBuildError(f"{what} gauss-runner failed (exit {proc.returncode}; command: "
                                       f"{' '.join(cmd)}):\n{_tail(proc.stdout + proc.stderr)}")
        built = os.path.join(tree, BINARY)
        if not os.path.isfile(built):
            raise RunnerBuildError(f"the build finished but produced no {BINARY} in {tree}")
        tmp = os.path.join(folder, f".{BINARY}.{os.getpid()}.tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, binary)
    stamp_tmp = f"{binary}.key.{os.getpid()}.tmp"
    with open(stamp_tmp, "w") as f:
        f.write(_build_key() + "\n")
    os.replace(stamp_tmp, binary + ".key")
    if verbose:
        print(f"built gauss-runner in {time.perf_counter() - started:.1f} s: {binary}", file=sys.stderr)
    return binary


def runner_has_redis(binary: str) -> bool:
    """Whether this build of gauss-runner has the Redis embedding source (hiredis was found)."""
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RunnerError(f"{binary} --version failed: {proc.stderr.strip()}", proc.returncode, proc.stderr)
    return "redis=yes" in proc.stdout


Request = Tuple[Sequence[int], Sequence[int]]


def format_requests(requests: Sequence[Request]) -> str:
    """The text request format: one ``<history ids> | <candidate ids>`` line per request."""
    lines = []
    for history, candidates in requests:
        lines.append(" ".join(str(int(i)) for i in history) + " | " + " ".join(str(int(i)) for i in candidates))
    return "\n".join(lines) + "\n"


def run_runner(package: str, requests: Union[str, Sequence[Request]], *, snapshot: Optional[str] = None,
               redis: Optional[str] = None, state_dim: int = 0, batch_size: Optional[int] = None,
               threads: Optional[int] = None, binary: Optional[str] = None, timeout: float = 600) -> List[List[float]]:
    """Score ``requests`` (text in the request format, or ``(history, candidates)`` pairs)
    with gauss-runner; returns one list of scores per request. Raises :class:`RunnerError`
    with the runner's message when it fails."""
    return run_runner_timed(package, requests, snapshot=snapshot, redis=redis, state_dim=state_dim,
                            batch_size=batch_size, threads=threads, binary=binary, timeout=timeout)[0]


def run_runner_timed(package: str, requests: Union[str, Sequence[Request]], *, snapshot: Optional[str] = None,
                     redis: Optional[str] = None, state_dim: int = 0, batch_size: Optional[int] = None,
                     threads: Optional[int] = None, binary: Optional[str] = None,
                     timeout: float = 600) -> Tuple[List[List[float]], Dict[str, float]]:
    """:func:`run_runner` plus the runner's own timing: ``{"load_s", "requests", "serve_s"}``
    (serving time excludes loading the package, so it compares with an in-process predictor)."""
    binary = binary or find_runner()
    if binary is None:
        raise RunnerBuildError("gauss-runner is not built: run `gauss build-runner` (or "
                               "gauss_plugins.export.runner.build_runner())")
    cmd = [binary, "--package", os.fspath(package), "--timing"]
    if snapshot is not None:
        cmd += ["--snapshot", os.fspath(snapshot)]
    if redis is not None:
        cmd += ["--redis", redis, "--state-dim", str(state_dim)]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    text = requests if isinstance(requests, str) else format_requests(requests)
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RunnerError(f"gauss-runner failed (exit {proc.returncode}): {proc.stderr.strip()}", proc.returncode,
                          proc.stderr)
    timing: Dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("gauss-runner timing:"):
            timing = {k: float(v) for k, v in (part.split("=") for part in line.split(":", 1)[1].split())}
    return [[float(x) for x in line.split()] for line in proc.stdout.splitlines()], timing
