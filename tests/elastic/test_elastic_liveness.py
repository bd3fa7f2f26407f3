"""Peer links: a SIGKILLed member is seen by its peers within milliseconds; an orderly goodbye is not a death."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from gauss_plugins.elastic.liveness import PeerLinks

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _collector():
    seen, event = [], threading.Event()

    def on_lost(rank, why):
        seen.append((rank, why))
        event.set()

    return seen, event, on_lost


def test_a_sigkilled_peer_is_reported_at_once():
    parent = PeerLinks.listen("127.0.0.1")
    seen, event, on_lost = _collector()
    parent.connect(0, {}, on_lost)
    child_code = ("import sys, time; sys.path.insert(0, sys.argv[2]);"
                  "from gauss_plugins.elastic.liveness import PeerLinks;"
                  "l = PeerLinks.listen('127.0.0.1'); l.connect(1, {0: sys.argv[1]}, lambda r, w: None);"
                  "print('up', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", child_code, parent.address, SRC], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"up"
        time.sleep(0.2)  # let the parent accept the link
        t0 = time.time()
        os.kill(child.pid, signal.SIGKILL)
        assert event.wait(5.0), "the SIGKILLed peer was never reported"
        assert time.time() - t0 < 0.5
        assert seen[0][0] == 1 and "without a goodbye" in seen[0][1]
        assert parent.lost() == {1}
    finally:
        child.kill()
        child.wait()
        parent.close()


def test_an_orderly_close_is_not_a_death_and_each_side_sees_the_other():
    links = [PeerLinks.listen("127.0.0.1") for _ in range(3)]
    addresses = {r: l.address for r, l in enumerate(links)}
    collected = [_collector() for _ in links]
    for r, l in enumerate(links):
        l.connect(r, addresses, collected[r][2])
    time.sleep(0.2)
    links[2].close()  # leaves with a goodbye
    time.sleep(0.3)
    assert collected[0][0] == [] and collected[1][0] == []
    # Rank 1's links end without a goodbye (as a killed process's would): rank 0 reports it.
    for s in list(links[1]._peers.values()):
        s.close()
    assert collected[0][1].wait(5.0)
    assert collected[0][0][0][0] == 1
    for l in links[:2]:
        l.close()


def test_a_peer_gone_before_the_connect_is_reported():
    dead = PeerLinks.listen("127.0.0.1")
    address = dead.address
    dead.close()  # nobody listens there any more
    seen, event, on_lost = _collector()
    me = PeerLinks.listen("127.0.0.1")
    me.connect(1, {0: address}, on_lost)
    try:
        assert event.wait(5.0) and seen[0][0] == 0 and "could not connect" in seen[0][1]
    finally:
        me.close()
