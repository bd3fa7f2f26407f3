"""The elastic protocol without processes: data assignment, commits, regroups, state messages."""
from __future__ import annotations

import pytest
import torch

from gauss_plugins.elastic.protocol import (NO_STATE, AllReplicasLostError, ElasticState, Generation,
                                            desired_workers, sample_indices)
from gauss_plugins.elastic.state import (load_disaster_checkpoint, latest_disaster_checkpoint, pack_state,
                                         save_disaster_checkpoint, unpack_state)
from gauss_plugins.elastic.synthetic import SyntheticRegressionStream, make_adam, make_mlp, mse_loss


def test_sample_indices_partition_each_step_contiguously():
    g = Generation(gen=2, members=("a", "b", "c"), step0=10, cursor0=500, batch_size=4, source_rank=0,
                   transfer=False)
    got = torch.cat([sample_indices(g, s, r) for s in (11, 12) for r in range(3)])
    assert got.tolist() == list(range(500, 524))
    assert g.cursor_after(12) == 524
    with pytest.raises(ValueError, match="not after"):
        sample_indices(g, 10, 0)
    with pytest.raises(ValueError, match="outside"):
        sample_indices(g, 11, 3)


def _form(state, workers, steps):
    for w in workers:
        state.checkin(w, steps.get(w, NO_STATE))
    return state.try_form()


def _step(state, members, step, dead=()):
    g = state.gen
    for rank, w in enumerate(members):
        if w in dead:
            continue
        idx = torch.cat([sample_indices(g, step, r) for r in range(g.world)]).tolist()
        state.next_action(w, g.gen, step, (idx, 1.0 / step))


def test_abandoned_step_is_reassigned_and_a_survivor_step_commits():
    s = ElasticState(batch_size=2, target=3)
    for w in "abc":
        s.register(w)
    g1 = _form(s, "abc", {})
    assert g1.transfer and g1.source_rank == 0 and g1.world == 3
    s.stop_step = None
    for step in (1, 2):
        assert all(s.next_action(w, 1, step - 1, None) == "step" for w in "abc")
        _step(s, "abc", step)
    assert s.committed == 2 and s.cursor == 12
    # step 3: "a" finished it (its all-reduce completed), "b" did not, "c" died mid-step
    s.next_action("a", 1, 2, None), s.next_action("b", 1, 2, None)
    _step(s, "a", 3)
    assert s.committed == 2  # not every member reported it
    s.mark_dead("c")
    assert s.next_action("b", 1, 2, None) == "regroup"
    g2 = _form(s, "ab", {"a": 3, "b": 2})
    assert (g2.step0, g2.source_rank, g2.transfer, g2.world, g2.cursor0) == (3, 0, True, 2, 18)
    assert s.committed == 3  # a survivor holds step 3: committed, never re-run
    # a step only a dead member reported is dropped and its samples re-assigned
    _step(s, "ab", 4, dead="b")
    s.mark_dead("b")
    g3 = _form(s, "a", {"a": 3})
    assert (g3.step0, g3.cursor0, g3.world) == (3, 18, 1)
    assert sample_indices(g3, 4, 0).tolist() == [18, 19]
    assert sorted(s.ledger) == list(range(18)) and set(s.ledger.values()) == {1}


def test_boundary_regroup_for_a_joiner_and_scale_down():
    s = ElasticState(batch_size=1, target=2)
    for w in "ab":
        s.register(w)
    _form(s, "ab", {})
    s.stop_step = None
    assert s.next_action("a", 1, 0, None) == "step"  # "a" may run step 1; "b" has not asked yet
    s.set_target(3)
    s.register("c")
    assert s.boundary == 1
    assert s.next_action("b", 1, 0, None) == "step"  # "b" must reach the boundary too
    _step(s, "ab", 1)
    assert s.next_action("a", 1, 1, None) == "regroup"
    g = _form(s, "abc", {"a": 1, "b": 1})
    assert g.members == ("a", "b", "c") and g.transfer and g.step0 == 1
    s.set_target(1)
    assert s.leaving == {"b", "c"}
    assert s.next_action("a", g.gen, 1, None) == "regroup"
    g = _form(s, "abc", {"a": 1, "b": 1, "c": 1})
    assert g.members == ("a",) and not g.transfer and s.released == {"b", "c"}
    with pytest.raises(ValueError, match="allows"):
        s.set_target(0)


def test_all_replicas_lost_is_an_error_not_a_fresh_model():
    s = ElasticState(batch_size=1, target=1)
    s.register("a")
    _form(s, "a", {})
    s.stop_step = None
    s.next_action("a", 1, 0, None)
    _step(s, "a", 1)
    s.mark_dead("a")
    s.register("b")
    with pytest.raises(AllReplicasLostError, match="from_checkpoint"):
        _form(s, "b", {})


def test_desired_workers_follows_backlog_within_bounds():
    assert desired_workers(0, 100, 1, 8) == 1
    assert desired_workers(250, 100, 1, 8) == 3
    assert desired_workers(10 ** 6, 100, 1, 8) == 8
    with pytest.raises(ValueError):
        desired_workers(5, 0, 1, 8)


def _trained_pair():
    model, stream = make_mlp(8, 16, seed=1), SyntheticRegressionStream(8)
    opt = make_adam(model.parameters())
    for step in range(3):
        opt.zero_grad()
        mse_loss(model, stream.batch(torch.arange(step * 4, step * 4 + 4))).backward()
        opt.step()
    return model, opt


def test_state_message_round_trip_and_disaster_checkpoint(tmp_path):
    model, opt = _trained_pair()
    spec, tensors = pack_state(model, opt)
    other = make_mlp(8, 16, seed=2)
    other_opt = make_adam(other.parameters())
    unpack_state(spec, [t.clone() for t in tensors], other, other_opt)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="tensors"):
        unpack_state(spec, tensors[:-1], other, other_opt)

    for step in (5, 10, 15):
        save_disaster_checkpoint(str(tmp_path), step, step * 8, model, opt, keep=2)
    latest = latest_disaster_checkpoint(str(tmp_path))
    assert latest.endswith("disaster-step0000000015.safetensors")
    assert len(list(tmp_path.glob("disaster-*"))) == 2
    fresh = make_mlp(8, 16, seed=3)
    fresh_opt = make_adam(fresh.parameters())
    assert load_disaster_checkpoint(latest, fresh, fresh_opt) == (15, 120)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    raw = bytearray(open(latest, "rb").read())
    raw[-3] ^= 0xFF
    open(latest, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="(?i)checksum|crc"):
        load_disaster_checkpoint(latest, fresh, fresh_opt)


@pytest.mark.parametrize("kw, match", [(dict(num_workers=0), "min_workers"), (dict(num_workers=9), "max_workers"),
                                       (dict(backend="mpi"), "gloo"), (dict(heartbeat_s=3.0), "dead_after_s"),
                                       (dict(disaster_checkpoint_every=5), "checkpoint_dir"),
                                       (dict(batch_size=0), "batch_size")])
def test_bad_elastic_config_is_refused(kw, match):
    pytest.importorskip("ray")
    from gauss_integrations.ray.elastic import ElasticConfig

    with pytest.raises(ValueError, match=match):
        ElasticConfig(**kw)


def test_trainer_needs_an_index_addressable_stream():
    pytest.importorskip("ray")
    from gauss_integrations.ray.elastic import ElasticTrainer

    with pytest.raises(TypeError, match="batch"):
        ElasticTrainer(make_mlp, make_adam, mse_loss, [1, 2, 3])


def test_surplus_joiners_are_released_when_the_target_dropped():
    s = ElasticState(batch_size=1, target=1, max_workers=4)
    s.register("a")
    _form(s, "a", {})
    s.set_target(3)
    s.register("b"), s.register("c")
    s.set_target(2)  # the backlog shrank while "b" and "c" started
    g = _form(s, "abc", {"a": 0})
    assert g.members == ("a", "b") and s.released == {"c"}
