"""The ranker program against the model's own paths (the retrieval head against
``model.query`` / ``score_corpus``, the M-FALCON head against ``MFalcon.score``), checkpoint
loading, and the Python predictor's batching and request handling (on the eager program: no
compile)."""
from __future__ import annotations

import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from export_cases import (mfalcon_reference, padded, retrieval_reference, tiny_config, tiny_model,  # noqa: E402
                          write_checkpoint)

from gauss_plugins.export.aoti import LoadedPackage, package_metadata, parity_check, random_inputs  # noqa: E402
from gauss_plugins.export.checkpoint import CheckpointMismatchError, item_rows, load_trained_model  # noqa: E402
from gauss_plugins.export.predictor import (Predictor, Request, RequestFormatError, StoreRows,  # noqa: E402
                                            format_scores, parse_requests)
from gauss_plugins.export.program import ExportError, build_ranker  # noqa: E402
from gauss_plugins.export.snapshot import Snapshot, UnknownItemError  # noqa: E402

HISTORIES = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], []]
CANDIDATES = [[3, 20, 21], [22, 23, 24, 25], [26], [5, 6]]


@pytest.mark.parametrize("num_time_buckets", [0, 8])
def test_program_equals_mfalcon_on_the_model(num_time_buckets):
    model = tiny_model(num_time_buckets=num_time_buckets)
    program = build_ranker(model, "mfalcon")
    ht = ct = None
    if num_time_buckets:
        ht = [[100, 200, 5000, 90000, 10 ** 6], [50], list(range(0, 11000, 1000)), []]
        ct = [[2 * 10 ** 6] * 3, [60, 70, 80, 10 ** 5], [20000], [7, 9]]
    hs = [h or [] for h in HISTORIES]
    ref = mfalcon_reference(model, hs[:3], CANDIDATES[:3], ht[:3] if ht else None, ct[:3] if ct else None)
    with torch.no_grad():
        got = program(*padded(model, hs[:3], CANDIDATES[:3], ht[:3] if ht else None, ct[:3] if ct else None))
    for i, r in enumerate(ref):
        torch.testing.assert_close(got[i, :len(r)], r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalizer", ["max_seq_len", "seq_len"])
@pytest.mark.parametrize("num_time_buckets", [0, 8])
def test_retrieval_head_equals_the_training_score(num_time_buckets, normalizer):
    """The default head is the score training and evaluation use: <model.query, item_vectors>."""
    model = tiny_model(num_time_buckets=num_time_buckets, normalizer=normalizer)
    program = build_ranker(model)
    assert program.head == "retrieval" and program.max_history == model.max_len
    hs = HISTORIES[:3] + [list(range(21, 33)), []]  # the 4th: max_len items, a full eval history
    cs = CANDIDATES[:3] + [[1, 2, 40], [5, 6]]
    ht = ct = None
    if num_time_buckets:
        ht = [[10 ** 6 + 97 * j * j for j in range(len(h))] for h in hs]
        ct = [[2 * 10 ** 6] * len(c) for c in cs]
    ref = retrieval_reference(model, hs, cs, ht)
    with torch.no_grad():
        got = program(*padded(model, [h or [] for h in hs], cs, ht, ct))
    for i, r in enumerate(ref):
        torch.testing.assert_close(got[i, :len(r)], r, rtol=0, atol=1e-6)
    assert bool((got[4] == 0).all())  # an empty history: the model's query is the zero vector
    if num_time_buckets:  # the query sees the history's times, not the request's
        with torch.no_grad():
            later = program(*padded(model, hs, cs, ht, [[t + 10 ** 7 for t in c] for c in ct]))
        torch.testing.assert_close(later, got, rtol=0, atol=0)


def test_heads_score_differently():
    model = tiny_model()
    args = padded(model, HISTORIES[:2], CANDIDATES[:2])
    with torch.no_grad():
        assert not torch.allclose(build_ranker(model, "retrieval")(*args), build_ranker(model, "mfalcon")(*args))


@pytest.mark.parametrize("head", ["retrieval", "mfalcon"])
def test_candidates_do_not_see_each_other_and_padding_is_inert(head):
    model = tiny_model()
    program = build_ranker(model, head)
    h, lens, c = padded(model, HISTORIES[:2], CANDIDATES[:2])
    with torch.no_grad():
        base = program(h, lens, c)
        perm = torch.tensor([2, 0, 1])
        moved = program(h, lens, c[:, perm])            # candidates in another order
        alone = program(h, lens, c[:, 1:2])               # one candidate alone
        h_noise = h.clone()
        h_noise[1, 1:] = torch.randn_like(h_noise[1, 1:])  # user 1's padding rows
        noisy = program(h_noise, lens, c)
    torch.testing.assert_close(moved, base[:, perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone[:, 0], base[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(noisy, base, rtol=0, atol=0)
    # and the history does matter
    with torch.no_grad():
        other = program(h.flip(0), lens.flip(0), c)
    assert not torch.allclose(other, base)


def test_models_the_program_refuses():
    from gauss_plugins.hstu.modules import HSTUConfig, PaddedHSTUEncoder
    from gauss_plugins.models.item_embeddings import StaticItemEmbeddings
    from gauss_plugins.models.retrieval import SequentialRetrievalModel
    from gauss_plugins.models.sasrec import SASRecConfig, SASRecEncoder

    sasrec = SequentialRetrievalModel(StaticItemEmbeddings(10, 8), SASRecEncoder(SASRecConfig(dim=8)), 12, 10)
    with pytest.raises(ExportError, match="model.arch: hstu"):
        build_ranker(sasrec)
    seq_len = SequentialRetrievalModel(StaticItemEmbeddings(10, 8), PaddedHSTUEncoder(
        HSTUConfig(dim=8, max_seq_len=12, normalizer="seq_len", num_time_buckets=0)), 12, 10)
    with pytest.raises(ExportError, match="mfalcon head: normalizer"):
        build_ranker(seq_len, "mfalcon")
    assert build_ranker(seq_len).head == "retrieval"  # the query divides by the history's own length
    with pytest.raises(ExportError, match="unknown scoring head 'dot'"):
        build_ranker(tiny_model(), "dot")
    windowed = SequentialRetrievalModel(StaticItemEmbeddings(10, 8), PaddedHSTUEncoder(
        HSTUConfig(dim=8, max_seq_len=12, max_attn_len=4, num_time_buckets=0)), 12, 10)
    for head in ("retrieval", "mfalcon"):
        with pytest.raises(ExportError, match=f"{head} head: contextual_len=0, max_attn_len=4"):
            build_ranker(windowed, head)
    with pytest.raises(ExportError, match="SequentialRetrievalModel"):
        build_ranker(torch.nn.Linear(2, 2))


def test_parity_check_reports_a_drift():
    program = build_ranker(tiny_model())
    same = parity_check(program, program, trials=3)
    assert same.passed and same.max_abs_diff == 0.0 and same.trials == 3
    drift = parity_check(program, lambda *a: program(*a) + 3e-5, trials=3)
    assert not drift.passed and drift.max_abs_diff == pytest.approx(3e-5, rel=1e-2)


def test_random_inputs_cover_empty_and_full_histories():
    program = build_ranker(tiny_model(num_time_buckets=8))
    h, lens, c, ht, ct = random_inputs(program, 4, 6, 3, torch.Generator().manual_seed(1))
    assert h.shape == (4, 6, 8) and c.shape == (4, 3, 8) and lens[0] == 6 and lens[1] == 0
    assert bool((ht.diff(dim=1) > 0).all()) and bool((ct > ht[:, -1:]).all())


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_rows(tmp_path):
    config = tiny_config()
    model = write_checkpoint(str(tmp_path / "run"), config, num_items=40, seen=30)
    trained = load_trained_model(str(tmp_path / "run"), config)
    ids, rows, version = item_rows(trained.model)
    assert ids.tolist() == list(range(1, 31)) and version.startswith("dynamic-table-v")
    torch.testing.assert_close(rows, model.item_embeddings(ids), rtol=0, atol=0)
    assert load_trained_model(str(tmp_path / "run" / "model.safetensors")).num_items == 40


def test_checkpoint_that_does_not_match_the_config(tmp_path):
    write_checkpoint(str(tmp_path / "run"), tiny_config(dim=8))
    with pytest.raises(CheckpointMismatchError, match=r"model.dim: checkpoint 8 vs config 16"):
        load_trained_model(str(tmp_path / "run"), tiny_config(dim=16))
    with pytest.raises(CheckpointMismatchError, match="max_len"):
        load_trained_model(str(tmp_path / "run"), tiny_config(max_len=20))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_trained_model(str(tmp_path))


def test_checkpoint_with_tensors_of_another_model(tmp_path):
    from gauss_plugins.serialization import load_tensors, save_tensors

    write_checkpoint(str(tmp_path / "run"), tiny_config())
    path = str(tmp_path / "run" / "model.safetensors")
    tensors, meta = load_tensors(path)
    tensors["pos_emb.weight"] = torch.zeros(5, 8)
    save_tensors(path, tensors, {k: v for k, v in meta.items() if k != "gauss.checksum"})
    with pytest.raises(CheckpointMismatchError, match="pos_emb.weight"):
        load_trained_model(path)


# ---------------------------------------------------------------------- predictor
def _eager_package(model, head=None) -> LoadedPackage:
    """The predictor's view of a package, with the eager program standing in for the
    compiled one (the compiled one is tested in test_export_aoti.py)."""
    program = build_ranker(model, head)
    return LoadedPackage(program, package_metadata(program, "m", "e", ""), "eager.pt2")


def _snapshot(model, ids):
    ids = torch.tensor(sorted(ids))
    with torch.no_grad():
        return Snapshot(ids, model.item_embeddings(ids))


@pytest.mark.parametrize("head", ["retrieval", "mfalcon"])
def test_predictor_batches_like_single_requests(head):
    model = tiny_model()
    snap = _snapshot(model, range(1, 41))
    reqs = [Request(tuple(h), tuple(c)) for h, c in zip(HISTORIES, CANDIDATES)]
    one_batch = Predictor(_eager_package(model, head), snap, batch_size=16).rank(reqs)
    singles = Predictor(_eager_package(model, head), snap, batch_size=1).rank(reqs)
    for a, b, c in zip(one_batch, singles, CANDIDATES):
        assert a.shape == (len(c),)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    reference = mfalcon_reference if head == "mfalcon" else retrieval_reference
    ref = reference(model, HISTORIES[:3], CANDIDATES[:3])
    for a, r in zip(one_batch, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head, keep", [("retrieval", 12), ("mfalcon", 11)])
def test_predictor_keeps_the_most_recent_history(head, keep):
    model = tiny_model()  # max_len 12: the query reads 12 items; M-FALCON's candidates take the 12th slot
    predictor = Predictor(_eager_package(model, head), _snapshot(model, range(1, 41)))
    assert predictor.max_history == keep
    long = tuple(range(1, 31))
    got = predictor.rank([Request(long, (5, 6))])[0]
    want = predictor.rank([Request(long[-keep:], (5, 6))])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, predictor.rank([Request(long[-keep + 1:], (5, 6))])[0])


def test_serve_text_format_and_errors():
    model = tiny_model()
    predictor = Predictor(_eager_package(model), _snapshot(model, range(1, 31)), batch_size=2)
    out = io.StringIO()
    text = "# comment\n1 2 3 | 4 5\n\n7 |  8\n | 9 10 11\n"
    assert predictor.serve(io.StringIO(text), out) == 3
    lines = out.getvalue().splitlines()
    assert [len(line.split()) for line in lines] == [2, 1, 3]
    expected = predictor.rank([Request((1, 2, 3), (4, 5))])[0]
    assert lines[0] == format_scores(expected.tolist())
    assert all(float(x) == pytest.approx(float("%.9g" % v)) for x, v in zip(lines[0].split(), expected.tolist()))
    with pytest.raises(UnknownItemError, match="item id 35"):
        predictor.serve(io.StringIO("1 2 | 3 35\n"), io.StringIO())
    with pytest.raises(UnknownItemError, match="item id 33"):
        predictor.serve(io.StringIO("1 33 | 3\n"), io.StringIO())
    for bad, match in [("1 2 3\n", "line 1: expected"), ("1 | 2 | 3\n", "one '|'"), ("1 x | 2\n", "'x' is not"),
                       ("1 2 |\n", "no candidate"), (f"1 | {2 ** 64}\n", "int64")]:
        with pytest.raises(RequestFormatError, match=match):
            list(parse_requests(io.StringIO(bad)))


def test_package_input_checks():
    model = tiny_model()
    package = _eager_package(model)
    h, lens, c = padded(model, HISTORIES[:2], CANDIDATES[:2])
    package(h, lens, c)
    cases = [((h.double(), lens, c), TypeError, "history must be torch.float32"),
             ((h, lens.int(), c), TypeError, "history_len must be torch.int64"),
             ((h[..., :4], lens, c), ValueError, r"history must be \[B, N, 8\]"),
             ((h, lens, c[:1]), ValueError, "candidates must be"),
             ((h, lens[:1], c), ValueError, "history_len must be"),
             ((h, lens + 20, c), ValueError, "history_len values"),
             ((torch.zeros(2, 13, 8), lens, c), ValueError, "N=13 must be in 1..12"),
             ((h, lens), ValueError, "takes 3 inputs")]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            package(*args)


def test_predictor_from_a_weps_store_and_dim_mismatch():
    from gauss_plugins.stores.weps import WePS

    model = tiny_model()
    ids = torch.arange(1, 31)
    store = WePS(dim=8)
    with torch.no_grad():
        store.put(ids, model.item_embeddings(ids))
    from_store = Predictor(_eager_package(model), store).rank([Request((1, 2), (3, 4))])[0]
    from_snap = Predictor(_eager_package(model), _snapshot(model, range(1, 31))).rank([Request((1, 2), (3, 4))])[0]
    torch.testing.assert_close(from_store, from_snap, rtol=0, atol=0)
    with pytest.raises(UnknownItemError, match="item id 31 is not in WePS"):
        Predictor(_eager_package(model), StoreRows(store)).rank([Request((1, 2), (31,))])
    with pytest.raises(ValueError, match="dim 4 but the package"):
        Predictor(_eager_package(model), WePS(dim=4))


def test_timed_package_needs_times():
    model = tiny_model(num_time_buckets=8)
    predictor = Predictor(_eager_package(model, "mfalcon"), _snapshot(model, range(1, 41)))
    with pytest.raises(ValueError, match="time bias"):
        predictor.rank([Request((1, 2), (3,))])
    with pytest.raises(ValueError, match="text request format carries no times"):
        predictor.serve(io.StringIO("1 | 2\n"), io.StringIO())
    got = predictor.rank([Request((1, 2), (3, 4))], [[10, 20]], [[30, 30]])[0]
    ref = mfalcon_reference(model, [[1, 2]], [[3, 4]], [[10, 20]], [[30, 30]])[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.redis
def test_predictor_from_redis_weps():
    from gauss_plugins.benchmarking import RedisServer, redis_skip_reason

    reason = redis_skip_reason()
    if reason:
        pytest.skip(reason)
    redis_store = pytest.importorskip("gauss_integrations.redis.store")
    model = tiny_model()
    ids = torch.arange(1, 31)
    with RedisServer() as server:
        store = redis_store.RedisWePS(8, port=server.port, model="ranker", table="items")
        with torch.no_grad():
            store.put(ids, model.item_embeddings(ids))
        reqs = [Request((1, 2, 3), (4, 5)), Request((), (6,))]
        from_redis = Predictor(_eager_package(model), store).rank(reqs)
        from_snap = Predictor(_eager_package(model), _snapshot(model, range(1, 31))).rank(reqs)
        for a, b in zip(from_redis, from_snap):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.raises(UnknownItemError, match="item id 40 is not in RedisWePS"):
            Predictor(_eager_package(model), store).rank([Request((1,), (40,))])
        store.close()
