"""A member that dies while its generation forms: the others give the generation up as soon as
the coordinator knows, instead of waiting ``step_timeout_s`` in ``init_process_group``."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest

pytest.importorskip("ray")

import torch.distributed as dist  # noqa: E402

from gauss_integrations.ray.elastic import _Worker  # noqa: E402
from gauss_plugins.elastic.protocol import Generation  # noqa: E402


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _FakeCoordinator:
    """Answers generation_open like the coordinator: open until ``closes_after_s``."""

    def __init__(self, closes_after_s: float) -> None:
        self.closes_at = time.time() + closes_after_s
        self.asked = 0
        self.generation_open = _Remote(self._open)

    def _open(self, gen: int) -> bool:
        self.asked += 1
        return time.time() < self.closes_at


class _Member:
    """The parts of a worker ``_all_reached_store`` uses (no Ray actor needed)."""

    _all_reached_store = _Worker._all_reached_store

    def __init__(self, coord, step_timeout_s: float) -> None:
        self.coord, self.cfg = coord, {"step_timeout_s": step_timeout_s}

    def _call(self, value):
        return value


def _gen(world: int) -> Generation:
    return Generation(gen=4, members=tuple(f"w{i}" for i in range(world)), step0=0, cursor0=0, batch_size=2,
                      source_rank=0, transfer=False)


def _store(world: int):
    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))


def test_a_member_lost_while_forming_ends_the_wait_when_the_coordinator_knows():
    coord = _FakeCoordinator(closes_after_s=0.3)  # the supervisor marks the dead member 0.3 s in
    member = _Member(coord, step_timeout_s=60.0)
    t0 = time.time()
    assert member._all_reached_store(_store(2), _gen(2)) is False  # the other member never arrives
    assert time.time() - t0 < 2.0, "waited for the dead member instead of asking the coordinator"
    assert coord.asked >= 2


def test_every_member_arrived_goes_on_to_the_group():
    store = _store(2)
    store.add("gauss/arrived", 1)  # the other member got there first
    member = _Member(_FakeCoordinator(closes_after_s=60.0), step_timeout_s=60.0)
    assert member._all_reached_store(store, _gen(2)) is True


def test_a_store_nobody_else_reaches_times_out_with_the_setting_named():
    member = _Member(_FakeCoordinator(closes_after_s=60.0), step_timeout_s=0.3)
    with pytest.raises(TimeoutError, match="step_timeout_s=0.3"):
        member._all_reached_store(_store(2), _gen(2))
