"""The retrieval head ranks as training's evaluation does, through the compiled package.

A tiny HSTU model with a time bias (as the demo's) is trained for a few seconds on sequences
with a learnable rule (each next item is the previous one plus one), exported once with the
default retrieval head, and every held-out user is ranked twice: by the evaluation code
(``model.query`` on the history, ``model.score_corpus`` on the corpus, ``target_ranks``
excluding the history) and by the ``.pt2`` through the Python Predictor with rows from a
snapshot (the whole corpus as candidates). Scores agree within 1e-5 and every held-out
item's rank is the same, over the full corpus and among ten candidates as the demo draws them.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from export_cases import tiny_model  # noqa: E402

from gauss_plugins.export.predictor import Predictor, Request  # noqa: E402
from gauss_plugins.export.snapshot import read_snapshot, write_snapshot  # noqa: E402
from gauss_plugins.models.metrics import target_ranks  # noqa: E402

NUM_ITEMS, MAX_LEN, USERS, EVENTS = 40, 12, 48, 18


def _sequences(seed: int = 0):
    """Per user: ``EVENTS`` items following ``i -> i % NUM_ITEMS + 1`` from a random start, and
    increasing event times (gaps of minutes to days, so the time buckets vary)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, NUM_ITEMS + 1, (USERS,), generator=g)
    items = (starts.unsqueeze(1) - 1 + torch.arange(EVENTS)) % NUM_ITEMS + 1
    gaps = torch.randint(60, 3 * 86400, (USERS, EVENTS), generator=g)
    return items, 10 ** 9 + gaps.cumsum(1)


def _train(model, items, times, steps: int = 120):
    """The sampled-softmax loss the retrieval model is trained with, on everything but each
    user's last event (held out), with the last ``MAX_LEN`` inputs of the training prefix."""
    ids, ts = items[:, -MAX_LEN - 2:-1], times[:, -MAX_LEN - 2:-1]
    inputs, targets, input_times = ids[:, :-1], ids[:, 1:], ts[:, :-1]
    lengths = torch.full((USERS,), MAX_LEN)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        loss = model.sampled_softmax_loss(inputs, lengths, targets, input_times, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gauss_plugins.export.aoti import export_aoti, load_package

    torch.manual_seed(0)
    model = tiny_model(num_items=NUM_ITEMS, max_len=MAX_LEN, num_time_buckets=8)
    model.num_negatives = 16
    items, times = _sequences()
    _train(model, items, times)
    folder = tmp_path_factory.mktemp("retrieval")
    ids = torch.arange(1, NUM_ITEMS + 1)
    with torch.no_grad():
        write_snapshot(str(folder / "items.gsnp"), ids, model.item_embeddings(ids))
    result = export_aoti(model, str(folder / "ranker.pt2"), model_version="trained-tiny", embedding_version="1",
                         embedding_source=f"snapshot:{folder / 'items.gsnp'}")
    # Held out: each user's last event; the history is the MAX_LEN events before it (as the
    # evaluation's HeldOutExamples cut it).
    history, history_times = items[:, -MAX_LEN - 1:-1], times[:, -MAX_LEN - 1:-1]
    return {"model": model, "package": load_package(result.path), "result": result,
            "snapshot": read_snapshot(str(folder / "items.gsnp")), "history": history,
            "history_times": history_times, "target": items[:, -1], "request_time": times[:, -1]}


def _eval_scores(t):
    """What training's evaluation computes: [USERS, NUM_ITEMS + 1], column j = item j."""
    model = t["model"]
    with torch.no_grad():
        queries = model.query(t["history"], torch.full((USERS,), MAX_LEN), t["history_times"])
        return model.score_corpus(queries)


def _served_scores(t, candidates):
    """The same users through the .pt2 (Predictor, snapshot rows), ``candidates[u]`` each."""
    reqs = [Request(tuple(h.tolist()), tuple(c)) for h, c in zip(t["history"], candidates)]
    request_time = t["request_time"].tolist()
    return Predictor(t["package"], t["snapshot"], batch_size=16).rank(
        reqs, t["history_times"].tolist(), [[request_time[u]] * len(c) for u, c in enumerate(candidates)])


@pytest.mark.slow  # one AOTInductor compile for the module: 30-150 s on the 2-core CPU machines
def test_package_is_the_retrieval_head_of_the_trained_model(trained):
    meta = trained["package"].metadata
    assert meta["head"] == "retrieval" and meta["max_seq_len"] == str(MAX_LEN)
    assert "candidate_time" in meta["input_names"] and trained["result"].parity.passed


@pytest.mark.slow
def test_served_scores_and_ranks_equal_the_eval_ones(trained):
    corpus = list(range(1, NUM_ITEMS + 1))
    served = torch.stack(_served_scores(trained, [corpus] * USERS))        # [USERS, NUM_ITEMS]
    expected = _eval_scores(trained)
    torch.testing.assert_close(served, expected[:, 1:], rtol=0, atol=1e-5)
    # Full-corpus ranks with the history excluded, as the evaluation metrics count them.
    served_full = torch.cat([torch.zeros(USERS, 1), served], dim=1)
    eval_ranks = target_ranks(expected, trained["target"], trained["history"])
    served_ranks = target_ranks(served_full, trained["target"], trained["history"])
    assert torch.equal(served_ranks, eval_ranks)
    # The model learned the rule, so the ranks compared are not those of noise.
    assert float((eval_ranks <= 3).float().mean()) >= 0.8


@pytest.mark.slow
def test_ranks_among_ten_candidates_equal_the_eval_ones(trained):
    """The demo's view: the held-out item and nine random items outside the history."""
    g = torch.Generator().manual_seed(2)
    candidates, eval_ranks = [], []
    expected = _eval_scores(trained)
    for u in range(USERS):
        target = int(trained["target"][u])
        pool = [i for i in range(1, NUM_ITEMS + 1) if i not in set(trained["history"][u].tolist()) and i != target]
        picked = [pool[j] for j in torch.randperm(len(pool), generator=g)[:9].tolist()]
        cands = [target] + picked
        candidates.append(cands)
        s = expected[u, cands]
        eval_ranks.append(int((s > s[0]).sum()) + 1)
    served = _served_scores(trained, candidates)
    served_ranks = [int((s > s[0]).sum()) + 1 for s in served]
    assert served_ranks == eval_ranks
    assert sum(r == 1 for r in served_ranks) >= USERS // 2


def test_export_command_passes_the_head(monkeypatch, tmp_path, capsys):
    """`gauss export --head` reaches the export target and its metadata; a bad head is refused
    by argparse before anything is loaded."""
    from gauss_plugins import cli
    from gauss_plugins.export import aoti
    from gauss_plugins.export.aoti import ExportResult, ParityReport, package_metadata
    from gauss_plugins.export.program import build_ranker
    from export_cases import tiny_config, write_checkpoint

    seen = {}

    def fake_export(model, out, head=None, **kwargs):  # the compile is tested above
        seen["head"] = head
        program = build_ranker(model, head)
        return ExportResult(out, package_metadata(program, "m", "e", ""), ParityReport(0.0, 1e-5, 1), 0.0, 0.0)

    monkeypatch.setattr(aoti, "export_aoti", fake_export)
    write_checkpoint(str(tmp_path / "run"), tiny_config())
    for head, max_history in (("mfalcon", "11"), ("retrieval", "12")):
        assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt2"),
                         "--head", head]) == 0
        assert seen["head"] == head
        assert f"({head} head, max history {max_history};" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt2"), "--head", "dot"])
    assert done.value.code == 2 and "invalid choice: 'dot'" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()
