"""Fixtures of the store tests: a real ``redis-server`` on a free loopback port.

The server runs without persistence (``--save '' --appendonly no``) so that a kill really
loses its data: the syncer must notice the restart and push everything again.
"""
from __future__ import annotations

import shutil

import pytest

from gauss_plugins.benchmarking import RedisServer as _SharedRedisServer

REDIS_SERVER = shutil.which("redis-server")


class RedisServer(_SharedRedisServer):
    """The project's private redis-server (:class:`gauss_plugins.benchmarking.RedisServer`:
    loopback, free port, no persistence, :meth:`kill` is SIGKILL); clients time out after 5 s
    so that a test against a stopped server fails instead of hanging."""

    def client(self, **kwargs):
        kwargs.setdefault("socket_timeout", 5)
        return super().client(**kwargs)


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
