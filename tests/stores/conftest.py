"""Fixtures of the store tests: a real ``redis-server`` on a free loopback port.

The server runs without persistence (``--save '' --appendonly no``) so that a kill really
loses its data: the syncer must notice the restart and push everything again.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process bound to 127.0.0.1; :meth:`kill` (SIGKILL) and :meth:`start`."""

    def __init__(self, workdir: str, port: int | None = None, extra_args: tuple = ()):
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        os.makedirs(self.workdir, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--protected-mode", "yes", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64)[:1] in (b"+", b"-"):  # -NOAUTH counts: the server is up
                        return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save -- the data is gone."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)


@pytest.fixture
def redis_server(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server); CI installs it")
    pytest.importorskip("redis", reason="redis-py missing: pip install 'gauss-plugins[redis]'")
    server = RedisServer(str(tmp_path / "redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def make_redis_server(tmp_path):
    """``make(*extra_args) -> RedisServer`` (started); every server is killed at teardown."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server); CI installs it")
    pytest.importorskip("redis", reason="redis-py missing: pip install 'gauss-plugins[redis]'")
    servers = []

    def make(*extra_args: str) -> RedisServer:
        server = RedisServer(str(tmp_path / f"redis{len(servers)}"), extra_args=extra_args)
        servers.append(server)
        server.start()
        return server

    yield make
    for s in servers:
        s.kill()
