"""The coordinator's side of the peer links: a member's report that a peer's link died declares
that peer dead at once, so the next group forms without waiting for Ray; stale reports change
nothing; a kill noted after the detection still times the recovery from the kill."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("ray")

from gauss_integrations.ray.elastic import _Coordinator  # noqa: E402


def _two_member_generation():
    c = _Coordinator(batch_size=2, min_workers=1, target=2, max_workers=2, dead_after_s=30.0)
    for w in ("w0", "w1"):
        c.register(w, 100 + int(w[1]), spawned_at=time.time())
    assert c.checkin("w0", -1, 0, timeout=0)["action"] == "wait"
    assert c.checkin("w1", -1, 0, timeout=0)["action"] == "join"
    assert c.checkin("w0", -1, 0, timeout=0) == {"action": "join", "gen": c.s.gen.to_dict(), "rank": 0}
    c.set_stop(None)  # train on
    return c


def _train_step(c, gen, step):
    for w in ("w0", "w1"):
        c.next_action(w, gen, step - 1, None, timeout=0)
    for w in ("w0", "w1"):
        c.next_action(w, gen, step, {"indices": [0, 1, 2, 3], "loss": 1.0}, timeout=0)


def test_a_peer_lost_report_declares_it_dead_and_the_survivor_regroups_at_once():
    c = _two_member_generation()
    _train_step(c, 1, 1)
    assert c.s.committed == 1
    c.peer_lost("w0", 1, 1, "its link closed without a goodbye")
    assert "w1" in c.s.dead and c.s.broken
    assert any("peer w1 lost" in f["reason"] for f in c.failures)
    assert c.errors == []  # a peer's word is a failure record, not a user-code error
    assert c.next_action("w0", 1, 1, None, timeout=0) == "regroup"
    answer = c.checkin("w0", 1, 1, timeout=0)  # no wait for Ray to report w1's actor dead
    assert answer["action"] == "join" and answer["gen"]["members"] == ["w0"] and answer["gen"]["step0"] == 1
    # Ray's own report arrives later: it changes nothing.
    c.mark_dead("w1")
    assert c.s.gen.gen == 2 and c.s.gen.members == ("w0",)


def test_stale_or_foreign_peer_lost_reports_change_nothing():
    c = _two_member_generation()
    c.peer_lost("w0", 7, 1, "a generation that is not this one")
    c.peer_lost("w9", 1, 1, "not a member")
    c.peer_lost("w0", 1, 5, "no such rank")
    assert c.s.dead == set() and not c.s.broken and c.failures == [] and c._open_recovery is None


def test_a_kill_noted_after_the_detection_times_the_recovery_from_the_kill():
    c = _two_member_generation()
    _train_step(c, 1, 1)
    t_kill = time.time()
    time.sleep(0.05)
    c.peer_lost("w0", 1, 1, "its link closed without a goodbye")  # seen before the driver's note came
    c.note_kill("w1", t_kill)
    c.checkin("w0", 1, 1, timeout=0)
    c.next_action("w0", 2, 1, None, timeout=0)
    c.next_action("w0", 2, 2, {"indices": [4, 5], "loss": 0.5}, timeout=0)
    [rec] = c.recoveries
    took = rec["first_step_after_s"]
    assert rec["steps_redone"] == 0 and rec["world"] == 1
    assert rec["first_step_after_s"] >= 0.05  # from the kill, not from the detection
    events = rec["timeline"]
    assert events["peer_lost_reported"] >= 0.05
    assert events["peer_lost_reported"] <= events["generation_formed"] <= events["first_step_committed"]
    # A note that arrives after the recovery ended re-times that recovery.
    c.note_kill("w1", t_kill - 1.0)
    assert c.recoveries[0]["first_step_after_s"] == pytest.approx(took + 1.0, abs=1e-6)
