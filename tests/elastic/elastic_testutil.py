"""Checks shared by the elastic tests that run a real local Ray cluster (gloo and NCCL)."""
from __future__ import annotations

import torch


def assert_exactly_once(trainer, start: int = 0) -> dict:
    """Every sample in [start, cursor) was trained exactly once; returns the status."""
    st = trainer.status()
    ledger = trainer.sample_ledger()
    assert sorted(ledger) == list(range(start, st["cursor"])), "a sample below the cursor was never trained"
    assert set(ledger.values()) == {1}, "a sample was trained twice"
    assert st["samples_trained"] == st["cursor"] - start
    return st


def steps_seen(trainer, predicate, timeout_s: float = 90) -> dict:
    """Run until ``predicate(status)``; the step counter must never go back meanwhile."""
    seen = []

    def watch(st):
        seen.append(st["step"])
        return predicate(st)

    st = trainer.run_until(watch, timeout_s=timeout_s)
    assert seen == sorted(seen), f"the step counter went back: {seen}"
    return st


def store_rows(store):
    """(ids, values, optimizer state) of every row a store holds, ordered by id."""
    ids, values, state = [], [], []
    for b in store.export():
        ids.append(b.ids), values.append(b.values), state.append(b.state)
    ids, values, state = torch.cat(ids), torch.cat(values), torch.cat(state)
    order = ids.argsort()
    return ids[order], values[order], state[order]
