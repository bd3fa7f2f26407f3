"""Peer links: a TCP connection between every two members of a generation, so that a member's
death is seen by its peers within milliseconds.

Why: a SIGKILLed process's kernel closes its sockets at once, but nobody reads them. A survivor
in its forward or backward learns of the death only at the step's all-reduce (after computing a
gradient nobody will use) or when the launcher's supervisor sees the actor die (Ray's own
detection: 0.3-0.6 s at a 1.8 GB state on a loaded 2-core machine), and the next group cannot
form before that. A link that reads end-of-file without the peer's goodbye means the peer's
process is gone.

Protocol: every member listens on an ephemeral port (:meth:`PeerLinks.listen`) and publishes the
address in the generation's store; once every member arrived, member ``i`` connects to each
``j < i`` and sends its rank (:meth:`PeerLinks.connect`). A thread watches all links. A member
that leaves the generation in an orderly way (:meth:`PeerLinks.close`) first sends ``GOODBYE``,
so its peers do not take it for dead. Hangs and partitions close nothing: those stay with the
heartbeats.
"""
from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Callable, Dict, Optional

__all__ = ["PeerLinks", "GOODBYE"]

GOODBYE = b"E"
_RANK = struct.Struct("!i")


class PeerLinks:
    """One member's links to the other members of one generation."""

    def __init__(self, sock: socket.socket) -> None:
        self._listener = sock
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._peers: Dict[int, socket.socket] = {}
        self._said_goodbye: set = set()
        self._lost: set = set()
        self._on_lost: Optional[Callable[[int, str], None]] = None
        self._closing = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rank = -1

    @classmethod
    def listen(cls, host: str) -> "PeerLinks":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.listen(64)
        return cls(sock)

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def connect(self, rank: int, addresses: Dict[int, str], on_lost: Callable[[int, str], None]) -> None:
        """Connect to every lower rank (``addresses``: rank -> "host:port"), then watch all links;
        ``on_lost(rank, why)`` runs in the watching thread, once per peer, when a peer's link
        ends without its goodbye (a peer that was gone before we connected counts too)."""
        if self._thread is not None:
            raise RuntimeError("PeerLinks.connect was already called for this generation")
        self._rank, self._on_lost = rank, on_lost
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        refused = []
        for peer in sorted(r for r in addresses if r < rank):
            host, port = addresses[peer].rsplit(":", 1)
            try:
                s = socket.create_connection((host, int(port)), timeout=2.0)
                s.sendall(_RANK.pack(rank))
            except OSError as exc:
                refused.append((peer, f"could not connect: {exc}"))
                continue
            self._add(peer, s)
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"gauss-peer-links-{rank}")
        self._thread.start()
        for peer, why in refused:
            self._report(peer, why)

    def _add(self, peer: int, s: socket.socket) -> None:
        s.setblocking(False)
        self._peers[peer] = s
        self._sel.register(s, selectors.EVENT_READ, peer)

    def _accept(self) -> None:
        try:
            s, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        # The rank is 4 bytes sent right after connecting: read it blocking, briefly.
        s.settimeout(5.0)
        try:
            head = b""
            while len(head) < _RANK.size:
                chunk = s.recv(_RANK.size - len(head))
                if not chunk:
                    raise ConnectionError("closed before sending its rank")
                head += chunk
        except OSError:
            s.close()  # a peer that died while connecting: the coordinator learns it another way
            return
        self._add(_RANK.unpack(head)[0], s)

    def _report(self, peer: int, why: str) -> None:
        if peer in self._lost or peer in self._said_goodbye or self._closing.is_set():
            return
        self._lost.add(peer)
        if self._on_lost is not None:
            self._on_lost(peer, why)

    def _watch(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._sel.select():
                if key.fileobj is self._wake_r:
                    return
                if key.fileobj is self._listener:
                    self._accept()
                    continue
                peer, s = key.data, key.fileobj
                try:
                    data = s.recv(64)
                    why = "its link closed without a goodbye (its process ended)"
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    data, why = b"", f"its link failed: {exc}"
                if GOODBYE in data:
                    self._said_goodbye.add(peer)
                if not data:
                    self._sel.unregister(s)
                    s.close()
                    self._report(peer, why)

    def lost(self) -> set:
        """Ranks seen dead so far."""
        return set(self._lost)

    def close(self) -> None:
        """Leave the generation in order: say goodbye on every link, stop watching, close."""
        self._closing.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for s in list(self._peers.values()):
            try:
                s.setblocking(True)
                s.sendall(GOODBYE)
            except OSError:
                pass
            s.close()
        self._peers.clear()
        self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()
