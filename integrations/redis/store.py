"""RedisWePS: the serving store on Redis through redis-py (embedding_store ``"redis"``).

Layout in Redis: one string key per row, ``{prefix}:{model}:{table}:{id:016x}`` (the id's
64-bit two's complement in hex, so negative ids are fine and every key has the same length),
holding the row packed as little-endian float32 bytes (``4 * (dim + state_dim)`` bytes, see
:func:`gauss_plugins.stores.base.pack_rows`). ``{prefix}:{model}:{table}:__version__`` holds
the training-store version the last complete push brought the table to. A deleted id is a
deleted key, so a lookup of an unknown or deleted id returns the configured default, never a
stale row; a value of the wrong length (another writer, another dim) is an error, not data.

Speed: a push of n rows is one pipelined burst of ``MSET`` commands of ``chunk_size`` rows.
Because every key and value has a fixed width, the RESP bytes are laid out with numpy
(vectorised, a block of rows at a time, the constant bytes written once into a buffer that
the push reuses) and written straight to a pooled redis-py connection, a group of chunks
(~16 MB) per blocking ``sendmsg``: the next group is encoded while Redis executes the one
before, which is still in the socket buffers. Per-row Python work (building a dict, redis-py's
per-argument encoder) would otherwise cost more than Redis itself, and a write that returns
to Python after every partial send waits for the GIL each time a training loop in another
thread holds it (see :func:`_send_blocking`). Reads are pipelined ``MGET`` s. With ``ttl_s`` each chunk's ``MSET`` is
followed by a server-side script that sets the expiry of its keys (one reply per chunk).

A ``redis.cluster.RedisCluster`` client is accepted: keys then hash to different slots, so
writes go through the cluster pipeline (``SET`` per key, grouped per node by redis-py) and
reads through ``mget_nonatomic``. Connection, password and TLS options are passed to
``redis.Redis`` unchanged (``password=``, ``username=``, ``ssl=True``, ``ssl_ca_certs=``...).
"""
from __future__ import annotations

import os
import socket
import struct
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gauss_plugins._optional import require
from gauss_plugins.stores.base import (ChangeBatch, EmbeddingStore, IdsLike, Lookup, RowBatch, as_ids, isin_ids,
                                       pack_rows, unpack_rows)

redis = require("redis", "redis", "the Redis serving store")
from redis.cluster import RedisCluster  # noqa: E402  (after the require above)

__all__ = ["RedisWePS", "row_keys"]

# Expire every key of a chunk in one round trip (MSET itself cannot set a TTL).
_EXPIRE_SCRIPT = b"for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end return #KEYS"


# Byte b -> its two lowercase hex digits as one little-endian uint16 (high digit first in
# memory): one table lookup per id byte instead of two nibble lookups and interleaving copies.
_HEX_PAIRS = np.array([ord(f"{b:02x}"[0]) | ord(f"{b:02x}"[1]) << 8 for b in range(256)], dtype="<u2")


def _hex_ids(ids: torch.Tensor) -> np.ndarray:
    """``[n, 16]`` uint8 ASCII hex of the ids' 64-bit two's complement (big-endian)."""
    raw = ids.numpy().astype(">i8").view(np.uint8).reshape(-1, 8)
    return _HEX_PAIRS[raw].view(np.uint8).reshape(-1, 16)


_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def _ids_from_hex(hexes: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`_hex_ids`: ``[n, 16]`` uint8 ASCII hex -> int64 ids."""
    nib = _NIBBLE[hexes]
    if (nib == 255).any():
        raise ValueError("a key under this prefix does not end in 16 lowercase hex digits")
    raw = (nib[:, 0::2] << 4) | nib[:, 1::2]
    return torch.from_numpy(np.ascontiguousarray(raw).view(">i8").reshape(-1).astype(np.int64))


def row_keys(prefix: bytes, ids: torch.Tensor) -> np.ndarray:
    """``[n, len(prefix) + 16]`` uint8: the key of each id (see the module docstring)."""
    p = np.frombuffer(prefix, dtype=np.uint8)
    keys = np.empty((ids.numel(), p.size + 16), dtype=np.uint8)
    keys[:, : p.size] = p
    keys[:, p.size:] = _hex_ids(ids)
    return keys


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


class _Records:
    """A buffer of up to ``capacity`` RESP records, each record the bulk strings ``args``
    (``(constant head, variable width)`` each: a key is the constant prefix and 16 hex
    digits, a row its packed bytes).

    The constant bytes (lengths, ``\\r\\n``, the key prefix) are laid out once; :meth:`fill`
    copies only the variable bytes in, so a push that reuses one buffer for all its groups
    of rows writes each constant byte once, not once per row. The copies go a block of rows
    at a time so that a block's records (~2.5 MB for 256-byte rows) stay in cache between
    the per-field passes (one pass over a whole push per field measured ~10% slower).
    """

    BLOCK = 8192

    def __init__(self, args: Sequence[Tuple[bytes, int]], capacity: int):
        template, self.slots = self.layout(args)
        const = np.frombuffer(template, dtype=np.uint8)
        self.buf = np.empty((capacity, len(template)), dtype=np.uint8)
        for s in range(0, capacity, self.BLOCK):
            self.buf[s:s + self.BLOCK] = const

    @staticmethod
    def layout(args: Sequence[Tuple[bytes, int]]) -> Tuple[bytes, List[Tuple[int, int]]]:
        """``(template record, (offset, width) of each variable part)``."""
        template = bytearray()
        slots = []
        for head, width in args:
            template += b"$%d\r\n" % (len(head) + width) + head
            slots.append((len(template), width))
            template += b"\x00" * width + b"\r\n"
        return bytes(template), slots

    def fill(self, variables: Sequence[np.ndarray]) -> np.ndarray:
        """The first ``n`` records with ``variables`` (``[n, width]`` uint8 per field) copied
        in (``n <= capacity``); valid until the next fill."""
        n = variables[0].shape[0]
        rec = self.buf[:n]
        for s in range(0, n, self.BLOCK):
            block = rec[s:s + self.BLOCK]
            for (off, width), v in zip(self.slots, variables):
                block[:, off:off + width] = v[s:s + self.BLOCK]
        return rec


def _command(head: Sequence[bytes], records: np.ndarray, fields_per_record: int,
             tail: Sequence[bytes] = ()) -> List[Any]:
    """The RESP encoding of ``head + records + tail`` as buffers (``records``: rows of a
    :class:`_Records`, each holding ``fields_per_record`` arguments); no copy of the records."""
    argc = len(head) + records.shape[0] * fields_per_record + len(tail)
    parts = [b"*%d\r\n" % argc + b"".join(_bulk(h) for h in head), memoryview(records).cast("B")]
    if tail:
        parts.append(b"".join(_bulk(t) for t in tail))
    return parts


# Records per blocking write of a push (a group of whole chunks): small enough that encoding
# the next group overlaps Redis executing this one -- a write returns once the kernel holds
# the rest (loopback buffers hold a few MB) -- and large enough that a push of 300k rows is a
# handful of writes (each return to Python may wait for the GIL; see _send_blocking).
_GROUP_BYTES = 16 << 20

# Buffers per sendmsg: the system's IOV_MAX (Linux: 1024), else the 16 POSIX guarantees.
try:
    _IOV_MAX = min(1024, max(16, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 16


def _send_blocking(sock: socket.socket, buffers: List[Any]) -> None:
    """Write every buffer to ``sock`` in as few system calls -- and GIL hand-overs -- as possible.

    Why not ``sendall``: a socket with a Python-level timeout (redis-py's ``socket_timeout``)
    is non-blocking underneath, so ``sendall`` of a push (~100 MB for 300k rows) returns to
    Python after every partial write, each time the server has drained a little of the send
    buffer, and must take the GIL back; with a training loop running Python in another
    thread each hand-over can wait up to the switch interval (5 ms). So the socket is made
    blocking for the write, the kernel's own send timeout (``SO_SNDTIMEO``) standing in for the socket's Python
    timeout so that a hung server still fails the push, and one ``sendmsg`` moves everything.
    A write that made no progress within that timeout raises :class:`socket.timeout`; the caller
    drops the connection on any error (its state is unknown then).
    """
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    timeout = sock.gettimeout()
    try:
        sock.settimeout(None)
        if timeout:
            sec = int(timeout)
            usec = max(int((timeout - sec) * 1e6), 0 if sec else 1)  # 0 s 0 us would mean "never"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec))
        i = 0
        while i < len(views):
            try:
                sent = sock.sendmsg(views[i:i + _IOV_MAX])
            except BlockingIOError:  # SO_SNDTIMEO expired with nothing written
                raise socket.timeout(f"no progress writing to Redis within {timeout}s") from None
            while sent:  # a partial write (a timeout or a signal after some progress): go on
                if sent >= len(views[i]):
                    sent -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", 0, 0))
            sock.settimeout(timeout)
        except OSError:  # a broken socket: the caller disconnects it anyway
            pass


class RedisWePS(EmbeddingStore):
    """Serving store on Redis (see the module docstring).

    Args:
        dim: row width; state_dim: optimizer-state width stored with each row (default 0).
        default: scalar or ``[dim]`` returned for unknown or deleted ids.
        client: a ready ``redis.Redis`` or ``redis.cluster.RedisCluster``; else one is built
            from ``url`` (``redis://`` / ``rediss://``) or ``host``/``port``/``db``, with
            ``client_options`` (password, username, ssl, ssl_ca_certs, timeouts...) passed on.
        prefix, model, table: the key prefix ``{prefix}:{model}:{table}:``.
        ttl_s: optional expiry of every written row, in seconds.
        chunk_size: rows per MSET / MGET command.
    """

    def __init__(self, dim: int, state_dim: int = 0, default: Any = 0.0, *, client: Any = None,
                 url: Optional[str] = None, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 prefix: str = "gauss", model: str = "default", table: str = "default",
                 ttl_s: Optional[float] = None, chunk_size: int = 10_000, **client_options: Any):
        super().__init__(dim, state_dim, default)
        for name, part in (("prefix", prefix), ("model", model), ("table", table)):
            if not isinstance(part, str) or not part or any(c in part for c in ":\r\n *?[]"):
                raise ValueError(f"{name} must be a non-empty string without ':', spaces or glob characters, got {part!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s!r}")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if client is None:
            # Bounded timeouts: a dead server must surface as an error, not a hung trainer.
            client_options.setdefault("socket_timeout", 5.0)
            client_options.setdefault("socket_connect_timeout", 2.0)
            # One immediate retry (a pooled connection the server dropped), no backoff:
            # redis-py's default backs off for seconds, and the syncer retries every
            # interval itself -- a dead server must fail fast.
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            client_options.setdefault("retry", Retry(NoBackoff(), 1))
            if url is not None:
                client = redis.Redis.from_url(url, **client_options)
            else:
                client = redis.Redis(host=host, port=port, db=db, **client_options)
        elif client_options or url is not None:
            raise ValueError("pass either client= or connection options (url, host, password, ...), not both")
        if not isinstance(client, (redis.Redis, RedisCluster)):
            raise TypeError(f"client must be a redis.Redis or redis.cluster.RedisCluster, got {type(client).__name__}")
        self.client = client
        self.is_cluster = isinstance(client, RedisCluster)
        self.key_prefix = f"{prefix}:{model}:{table}:".encode()
        self.version_key = self.key_prefix + b"__version__"
        self.ttl_ms = None if ttl_s is None else max(1, int(round(ttl_s * 1000)))
        self.chunk_size = chunk_size
        self.row_bytes = 4 * (dim + state_dim)
        self._counters = {"rows_written": 0, "rows_deleted": 0, "rows_read": 0, "bytes_written": 0,
                          "write_calls": 0, "read_calls": 0}
        self._script_sha: Optional[str] = None

    # ------------------------------------------------------------------ plumbing
    def _run_packed(self, groups: Iterable[List[List[Any]]]) -> List[Any]:
        """Send pre-encoded commands on one pooled connection, then read one reply each.

        ``groups``: lists of commands, each list written with one blocking write. A generator
        that encodes the next group only when asked overlaps that encoding with Redis
        executing the group before (still in the socket buffers), instead of encoding a whole
        push before Redis sees its first byte."""
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py 5.x wants a command name (unused by the pool)
            conn = pool.get_connection("MSET")
        try:
            sock = getattr(conn, "_sock", None)
            if sock is None:
                conn.connect()
                sock = getattr(conn, "_sock", None)
            sent = 0
            for commands in groups:
                if type(sock) is socket.socket:  # plain TCP or unix socket (TLS sockets have no sendmsg)
                    try:
                        _send_blocking(sock, [b for cmd in commands for b in cmd])
                    except socket.timeout:
                        raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
                    except OSError as exc:
                        raise redis.exceptions.ConnectionError(f"Error while writing to socket: {exc}") from None
                else:
                    for cmd in commands:
                        conn.send_packed_command(cmd, check_health=False)
                sent += len(commands)
            replies = [conn.read_response() for _ in range(sent)]
        except BaseException:
            # The connection's state is unknown (half a pipeline sent or read): never reuse it.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        errors = [r for r in replies if isinstance(r, redis.exceptions.ResponseError)]
        if errors:
            raise errors[0]
        return replies

    def _keys(self, ids: torch.Tensor) -> np.ndarray:
        return row_keys(self.key_prefix, ids)

    def _key_records(self, ids: torch.Tensor) -> np.ndarray:
        """The ids' keys as RESP records, one bulk string each (``DEL`` / ``MGET`` arguments)."""
        return _Records([(self.key_prefix, 16)], ids.numel()).fill([_hex_ids(ids)])

    def _group_rows(self, record_bytes: int) -> int:
        """Rows per blocking write of a push: whole chunks, ~:data:`_GROUP_BYTES` of records."""
        return max(1, _GROUP_BYTES // (record_bytes * self.chunk_size)) * self.chunk_size

    # ------------------------------------------------------------------ writes
    def put(self, ids: IdsLike, values: Any, state: Any = None) -> int:
        uniq, vals, st = self._check_put(ids, values, state)
        if self.state_dim and st is None:
            st = torch.zeros(uniq.numel(), self.state_dim)
        self._write(uniq, vals, st)
        return self.version

    def _write(self, ids: torch.Tensor, values: torch.Tensor, state: Optional[torch.Tensor]) -> None:
        if ids.numel() == 0:
            return
        packed = pack_rows(values, state)
        n = ids.numel()
        if self.is_cluster:
            keys = self._keys(ids)
            pipe = self.client.pipeline()
            for i in range(n):
                pipe.set(keys[i].tobytes(), packed[i].tobytes(), px=self.ttl_ms)
            pipe.execute()
        else:
            self._run_packed(self._mset_groups(ids, packed))
        self._counters["rows_written"] += n
        self._counters["bytes_written"] += int(packed.nbytes) + n * (len(self.key_prefix) + 16)
        self._counters["write_calls"] += 1

    def _mset_groups(self, ids: torch.Tensor, packed: np.ndarray) -> Iterator[List[List[Any]]]:
        """The push's ``MSET`` commands (and expiry scripts), a group of chunks at a time, each
        group encoded into the same record buffers when the one before has been written."""
        n = ids.numel()
        args = [(self.key_prefix, 16), (b"", self.row_bytes)]
        group = min(n, self._group_rows(len(_Records.layout(args)[0])))
        rows = _Records(args, group)
        expire = _Records([(self.key_prefix, 16)], group) if self.ttl_ms is not None else None
        for g in range(0, n, group):
            hexes = _hex_ids(ids[g:g + group])
            rec = rows.fill([hexes, packed[g:g + group]])
            keys = expire.fill([hexes]) if expire is not None else None
            commands = []
            for start in range(0, rec.shape[0], self.chunk_size):
                part = rec[start:start + self.chunk_size]
                commands.append(_command([b"MSET"], part, 2))
                if keys is not None:
                    commands.append(_command([b"EVAL", _EXPIRE_SCRIPT, b"%d" % part.shape[0]],
                                             keys[start:start + self.chunk_size], 1, [b"%d" % self.ttl_ms]))
            yield commands

    def delete(self, ids: IdsLike) -> int:
        d = as_ids(ids)
        self._delete(d)
        return self.version

    def _delete(self, ids: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        if self.is_cluster:
            keys = self._keys(ids)
            pipe = self.client.pipeline()
            for i in range(keys.shape[0]):
                pipe.delete(keys[i].tobytes())
            pipe.execute()
        else:
            rec = self._key_records(ids)
            self._run_packed([[_command([b"DEL"], rec[s:s + self.chunk_size], 1)
                               for s in range(0, rec.shape[0], self.chunk_size)]])
        self._counters["rows_deleted"] += int(ids.numel())

    def apply_changes(self, batch: ChangeBatch) -> None:
        """Write a syncer push: rows, tombstones, then the version key (last, so a reader
        that sees version V sees every row of V)."""
        uniq, vals, st = self._check_put(batch.ids, batch.values, batch.state)
        deleted = as_ids(batch.deleted, "deleted")
        if deleted.numel() and uniq.numel():
            deleted = deleted[~isin_ids(deleted, uniq)]  # upserted after the eviction: keep the row
        if self.state_dim and st is None:
            st = torch.zeros(uniq.numel(), self.state_dim)
        self._delete(deleted)
        self._write(uniq, vals, st)
        self.client.set(self.version_key, b"%d" % int(batch.version))

    # ------------------------------------------------------------------ reads
    def _read(self, ids: torch.Tensor) -> List[Optional[bytes]]:
        n = ids.numel()
        if self.is_cluster:
            keys = self._keys(ids)
            return list(self.client.mget_nonatomic([keys[i].tobytes() for i in range(n)]))
        rec = self._key_records(ids)
        replies = self._run_packed([[_command([b"MGET"], rec[s:s + self.chunk_size], 1)
                                     for s in range(0, n, self.chunk_size)]])
        out: List[Optional[bytes]] = []
        for r in replies:
            out.extend(r)
        return out

    def lookup(self, ids: IdsLike) -> Lookup:
        q = as_ids(ids)
        n = q.numel()
        result = self._missing(n)
        if n == 0:
            return result
        raw = self._read(q)
        found = np.fromiter((r is not None for r in raw), dtype=bool, count=n)
        present = [r for r in raw if r is not None]
        bad = [len(r) for r in present if len(r) != self.row_bytes]
        if bad:
            raise ValueError(f"Redis rows under {self.key_prefix.decode()!r} have {bad[0]} bytes, expected "
                             f"{self.row_bytes} (dim={self.dim}, state_dim={self.state_dim}): another writer or "
                             f"another configuration uses this prefix")
        if present:
            vals, st = unpack_rows(b"".join(present), len(present), self.dim, self.state_dim)
            idx = torch.from_numpy(np.flatnonzero(found))
            result.values[idx] = vals
            if st is not None:
                result.state[idx] = st
        result.found.copy_(torch.from_numpy(found))
        self._counters["rows_read"] += n
        self._counters["read_calls"] += 1
        return result

    @property
    def version(self) -> int:
        """The training-store version of the last complete push (0 before any)."""
        raw = self.client.get(self.version_key)
        return int(raw) if raw is not None else 0

    def _scan_keys(self) -> Iterator[bytes]:
        pattern = self.key_prefix + b"?" * 16
        yield from self.client.scan_iter(match=pattern, count=10_000)

    def __len__(self) -> int:
        """Rows under this prefix (a SCAN: O(keys in the database))."""
        return sum(1 for _ in self._scan_keys())

    def stored_ids(self) -> torch.Tensor:
        """Every id with a row under this prefix (a SCAN: O(keys in the database))."""
        keys = [k[-16:] for k in self._scan_keys()]
        if not keys:
            return torch.empty(0, dtype=torch.int64)
        return _ids_from_hex(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16))

    def export(self, batch_size: int = 65536) -> Iterator[RowBatch]:
        """Every row under this prefix (SCAN + MGET; rows deleted meanwhile are skipped)."""
        batch: List[bytes] = []

        def flush(keys: List[bytes]) -> Optional[RowBatch]:
            ids = _ids_from_hex(np.frombuffer(b"".join(k[-16:] for k in keys), dtype=np.uint8).reshape(-1, 16))
            got = self.lookup(ids)
            keep = got.found
            return RowBatch(ids[keep], got.values[keep], got.state[keep] if got.state is not None else None)

        for key in self._scan_keys():
            batch.append(key)
            if len(batch) == batch_size:
                yield flush(batch)
                batch = []
        if batch:
            yield flush(batch)

    def clear(self) -> int:
        """Delete every row and the version key of this prefix; returns rows deleted."""
        deleted = 0
        keys = list(self._scan_keys())
        for s in range(0, len(keys), self.chunk_size):
            deleted += int(self.client.delete(*keys[s:s + self.chunk_size]))
        self.client.delete(self.version_key)
        return deleted

    def instance_id(self) -> str:
        """The server's ``run_id`` (all nodes' for a cluster): it changes when a server
        restarts, which tells a syncer that rows it pushed before may be gone."""
        info = self.client.info("server")
        if "run_id" in info:
            return str(info["run_id"])
        return ",".join(sorted(str(v.get("run_id")) for v in info.values() if isinstance(v, dict)))

    def ping(self) -> bool:
        """True when the server answers."""
        try:
            return bool(self.client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            return False

    def stats(self) -> Dict[str, Any]:
        s = {"dim": self.dim, "state_dim": self.state_dim, "kind": "redis", "cluster": self.is_cluster,
             "prefix": self.key_prefix.decode(), "ttl_ms": self.ttl_ms}
        s.update(self._counters)
        return s

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client whose server is gone must not raise
            pass
