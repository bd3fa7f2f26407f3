"""Full and incremental checkpoints: atomic, pickle-free files; restoring and continuing
training is bit-identical on CPU to never having stopped."""
from __future__ import annotations

import json

import pytest
import torch

from gauss_plugins.embedding import (
    DynamicEmbeddingTable,
    DynamicTableConfig,
    OptimizerConfig,
    SparseOptimizer,
    load_table,
    save_table,
    table_from_checkpoint,
)
from gauss_plugins.embedding.checkpoint import checkpoint_info


def config(backend, **kw):
    base = dict(name="items", dim=8, initial_capacity=8, max_capacity=24, eviction="lru", evict_fraction=0.1,
                admission="counting", admission_options={"min_count": 2, "width": 256, "depth": 3},
                optimizer=OptimizerConfig("adam", lr=0.05, eps=1e-8), default="unknown", backend=backend)
    base.update(kw)
    return DynamicTableConfig(**base)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(0, 5, (6,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(-40, 40, (int(offsets[-1]),), generator=g) * 1_000_003
    target = torch.randn(6, 8, generator=g)
    return ids, offsets, target


def train(table, opt, steps):
    table.train()
    for step in steps:
        ids, offsets, target = batch(step)
        out = table.lookup_pooled(ids, offsets, mode="mean" if step % 2 else "sum")
        extra = table(ids[:3]).sum() * 0.01
        (((out - target) ** 2).sum() + extra).backward()
        opt.step()
        opt.zero_grad()


def full_view(table):
    """Everything observable, by id (rows may differ between equal tables)."""
    tensors, meta = table.export_state()
    keys = tensors["index.keys"]
    out = {"keys": keys, "weight": tensors["weight"], "stamp": tensors["stamp"], "default": tensors["default.weight"]}
    for k, v in tensors.items():
        if k.startswith(("opt.", "evict.", "admit.", "default.opt")):
            out[k] = v
    return out, {k: meta[k] for k in ("version", "step")}


def assert_identical(a, b):
    (ta, ma), (tb, mb) = full_view(a), full_view(b)
    assert ma == mb
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # bit-identical


def test_full_and_incremental_restore_continue_bit_identical(backend, tmp_path):
    torch.manual_seed(0)
    ref = DynamicEmbeddingTable(config(backend))
    ref_opt = SparseOptimizer(ref)
    train(ref, ref_opt, range(0, 10))
    assert len(ref) > 0 and ref.evicted_since(0).numel() > 0  # eviction happened
    full = tmp_path / "items.full.safetensors"
    v = save_table(ref, full)
    train(ref, ref_opt, range(10, 16))
    inc1 = tmp_path / "items.inc1.safetensors"
    v = save_table(ref, inc1, since_version=v)
    train(ref, ref_opt, range(16, 20))
    inc2 = tmp_path / "items.inc2.safetensors"
    save_table(ref, inc2, since_version=v)
    assert checkpoint_info(inc2)["kind"] == "incremental"
    assert checkpoint_info(full)["config"]["dim"] == 8

    snapshot = DynamicEmbeddingTable(config(backend))
    load_table(snapshot, [full, inc1, inc2])
    assert_identical(ref, snapshot)

    # continue both: identical bits all the way
    train(ref, ref_opt, range(20, 30))
    train(snapshot, SparseOptimizer(snapshot), range(20, 30))
    assert_identical(ref, snapshot)

    # an incremental file holds only the changed rows and the evictions since its base
    from gauss_plugins.serialization import load_tensors

    inc_tensors, meta = load_tensors(inc1)
    assert inc_tensors["ids"].numel() == inc_tensors["weight"].shape[0] <= 24
    assert bool((inc_tensors["tombstones.versions"] > int(meta["base_version"])).all())


def test_full_restore_keeps_rows_and_a_fresh_table_from_config(backend, tmp_path):
    ref = DynamicEmbeddingTable(config(backend))
    opt = SparseOptimizer(ref)
    train(ref, opt, range(8))
    path = tmp_path / "t.safetensors"
    save_table(ref, path)
    other = table_from_checkpoint(path)
    assert other.index.state_dict()["rows"].tolist() == ref.index.state_dict()["rows"].tolist()
    assert_identical(ref, other)
    # the files load with the safetensors package too
    st = pytest.importorskip("safetensors.torch")
    loaded = st.load_file(str(path))
    assert torch.equal(loaded["weight"], ref.export_state()[0]["weight"])


def test_cross_backend_restore(tmp_path):
    from gauss_kernels.hash_table import cpu_ext

    if not cpu_ext.available():
        pytest.skip(cpu_ext.unavailable_reason())
    ref = DynamicEmbeddingTable(config("torch"))
    train(ref, SparseOptimizer(ref), range(6))
    save_table(ref, tmp_path / "a")
    other = table_from_checkpoint(tmp_path / "a", backend="cpu_ext")
    assert type(other.index).__name__ == "CpuHashIndex"
    assert_identical(ref, other)


def test_wrong_order_and_mismatched_configs_are_refused(backend, tmp_path):
    ref = DynamicEmbeddingTable(config(backend))
    opt = SparseOptimizer(ref)
    train(ref, opt, range(3))
    v = save_table(ref, tmp_path / "full")
    train(ref, opt, range(3, 5))
    v2 = save_table(ref, tmp_path / "inc1", since_version=v)
    train(ref, opt, range(5, 7))
    save_table(ref, tmp_path / "inc2", since_version=v2)
    fresh = DynamicEmbeddingTable(config(backend))
    with pytest.raises(ValueError, match="first checkpoint must be a full"):
        load_table(fresh, [tmp_path / "inc1"])
    with pytest.raises(ValueError, match="in the order they were saved"):
        load_table(fresh, [tmp_path / "full", tmp_path / "inc2"])
    with pytest.raises(ValueError, match="dim"):
        load_table(DynamicEmbeddingTable(config(backend, dim=4)), [tmp_path / "full"])
    with pytest.raises(ValueError, match="optimizer"):
        load_table(DynamicEmbeddingTable(config(backend, optimizer="sgd")), [tmp_path / "full"])
    with pytest.raises(ValueError, match="ahead"):
        save_table(ref, tmp_path / "x", since_version=ref.version + 1)


def test_module_state_dict_roundtrip(backend):
    model = torch.nn.Sequential(DynamicEmbeddingTable(config(backend)), torch.nn.Linear(8, 1))
    train(model[0], SparseOptimizer(model), range(5))
    state = model.state_dict()
    assert "0.weight" in state and "1.weight" in state and "0._meta" in state
    other = torch.nn.Sequential(DynamicEmbeddingTable(config(backend)), torch.nn.Linear(8, 1))
    other.load_state_dict(state)
    assert_identical(model[0], other[0])


def strip_checksum(path) -> None:
    """Rewrite a file as it was written before checksums existed (same tensors and data)."""
    from gauss_plugins.serialization import CHECKSUM_KEY

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    del header["__metadata__"][CHECKSUM_KEY]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def _trained_chain(backend, tmp_path):
    ref = DynamicEmbeddingTable(config(backend))
    opt = SparseOptimizer(ref)
    train(ref, opt, range(3))
    v = save_table(ref, tmp_path / "full")
    train(ref, opt, range(3, 5))
    save_table(ref, tmp_path / "inc1", since_version=v)
    return ref


def test_a_flipped_data_byte_is_refused_and_the_table_is_unchanged(backend, tmp_path):
    from gauss_plugins.serialization import ChecksumError

    _trained_chain(backend, tmp_path)
    raw = bytearray((tmp_path / "inc1").read_bytes())
    raw[-5] ^= 0x20  # one bit in the data section of the incremental
    (tmp_path / "inc1").write_bytes(bytes(raw))
    table = DynamicEmbeddingTable(config(backend))
    train(table, SparseOptimizer(table), range(10, 12))  # some state of its own
    before = full_view(table)
    # the intact full checkpoint comes first: the damaged second file must stop the load
    # before the first one is applied
    with pytest.raises(ChecksumError, match="inc1: checksum mismatch"):
        load_table(table, [tmp_path / "full", tmp_path / "inc1"])
    after = full_view(table)
    assert before[1] == after[1] and set(before[0]) == set(after[0])
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_misordered_chain_is_refused_before_touching_the_table(backend, tmp_path):
    ref = _trained_chain(backend, tmp_path)
    table = DynamicEmbeddingTable(config(backend))
    train(table, SparseOptimizer(table), range(10, 12))
    before = full_view(table)
    with pytest.raises(ValueError, match="in the order they were saved"):
        load_table(table, [tmp_path / "full", tmp_path / "inc1", tmp_path / "inc1"])
    assert full_view(table)[1] == before[1]
    assert torch.equal(full_view(table)[0]["weight"], before[0]["weight"])
    assert ref.version > 0


def test_checkpoints_without_a_checksum_load_with_a_warning(backend, tmp_path):
    """Files written before checksums existed: loaded (with a warning) by default, refused
    with require_checksum=True; saving again adds the checksum."""
    from gauss_plugins.serialization import ChecksumError

    ref = _trained_chain(backend, tmp_path)
    for name in ("full", "inc1"):
        strip_checksum(tmp_path / name)
    with pytest.raises(ChecksumError, match="carries no checksum"):
        load_table(DynamicEmbeddingTable(config(backend)), [tmp_path / "full"], require_checksum=True)
    with pytest.warns(UserWarning) as warned:
        old = load_table(DynamicEmbeddingTable(config(backend)), [tmp_path / "full", tmp_path / "inc1"])
    assert sorted(str(w.message).split(" carries no checksum")[0] for w in warned) == \
        [str(tmp_path / "full"), str(tmp_path / "inc1")]
    assert_identical(ref, old)
    save_table(old, tmp_path / "resaved")
    again = load_table(DynamicEmbeddingTable(config(backend)), [tmp_path / "resaved"], require_checksum=True)
    assert_identical(ref, again)
