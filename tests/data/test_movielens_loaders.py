"""Loaders: the real MovieLens 100K file, the other MovieLens formats, sequence files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from gauss_plugins.data import (
    load_dataset,
    load_movielens_100k,
    load_movielens_1m,
    load_movielens_csv,
    load_sequence_file,
)
from gauss_plugins.data.locate import locate_dataset

# The real files come from the data folder every command uses ($GAUSS_DATA, ...: data.locate).
_ML100K = locate_dataset("ml-100k")
ML100K = _ML100K.path or ""
needs_ml100k = pytest.mark.skipif(not _ML100K, reason=f"MovieLens 100K not found: {_ML100K.reason}")
_ML1M = locate_dataset("ml-1m")
ML1M = _ML1M.path or ""
needs_ml1m_sequences = pytest.mark.skipif(
    not os.path.isfile(os.path.join(ML1M, "ml-1m_seq.txt")),
    reason=f"the ML-1M sequence file ml-1m/ml-1m_seq.txt is not in the data folder ({_ML1M.root.path}, from "
           f"{_ML1M.root.source}; set GAUSS_DATA to the folder holding ml-1m/)")


@needs_ml100k
def test_real_ml100k_counts_and_chronology():
    seqs = load_movielens_100k(ML100K)
    assert seqs.num_users == 943
    assert seqs.num_events == 100_000
    assert len(seqs.item_ids()) == 1682 and seqs.max_item_id == 1682
    assert list(seqs.user_ids[:3]) == [1, 2, 3]
    assert seqs.lengths.min() == 20  # every ML-100K user has at least 20 ratings
    # chronological inside every user
    ts = seqs.timestamps
    same_user = np.repeat(np.arange(seqs.num_users), seqs.lengths)
    step_ok = (np.diff(ts) >= 0) | (np.diff(same_user) != 0)
    assert step_ok.all()
    # cross-check one user against the raw file
    rows = [tuple(map(int, line.split())) for line in open(os.path.join(ML100K, "u.data"))]
    raw = sorted([(t, i) for u, i, r, t in rows if u == 7], key=lambda x: x[0])
    items, times = seqs.sequence(6)
    assert sorted(times.tolist()) == [t for t, _ in raw]
    assert sorted(items.tolist()) == sorted(i for _, i in raw)


@needs_ml100k
def test_registry_loads_ml100k_from_folder_or_file():
    a = load_dataset("ml-100k", ML100K)
    b = load_dataset("ml-100k", os.path.join(ML100K, "u.data"))
    assert np.array_equal(a.items, b.items) and a.name == "ml-100k"


def test_ml1m_format_and_stable_ties(tmp_path):
    p = tmp_path / "ratings.dat"
    # user 2 has two ratings at the same second: file order must be kept
    p.write_text("2::30::5::100\n1::10::3::50\n2::20::4::100\n2::40::1::90\n1::11::2::40\n")
    seqs = load_movielens_1m(str(tmp_path))
    assert list(seqs.user_ids) == [1, 2]
    assert seqs.sequence(0)[0].tolist() == [11, 10]
    assert seqs.sequence(1)[0].tolist() == [40, 30, 20]
    assert seqs.sequence(1)[1].tolist() == [90, 100, 100]


def test_ml20m_csv_header_and_fractional_ratings(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n3,5,4.0,1\n")
    seqs = load_movielens_csv(str(p))
    assert seqs.sequence(0)[0].tolist() == [29, 2]
    assert seqs.num_users == 2


def test_ml20m_wrong_header(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("a,b,c,d\n1,2,3,4\n")
    with pytest.raises(ValueError, match="header"):
        load_movielens_csv(str(p))


def test_bad_line_reports_line_number(tmp_path):
    p = tmp_path / "u.data"
    p.write_text("1\t2\t3\t4\n1\t3\tx\t5\n")
    with pytest.raises(ValueError, match="line 2"):
        load_movielens_100k(str(p))
    p.write_text("1\t2\t3\t4\n1\t3\t5\n")
    with pytest.raises(ValueError, match="line 2"):
        load_movielens_100k(str(p))


def test_non_integer_or_zero_ids_refused(tmp_path):
    p = tmp_path / "u.data"
    p.write_text("1\t0\t3\t4\n")
    with pytest.raises(ValueError, match="positive integers"):
        load_movielens_100k(str(p))


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="gauss data download movielens-1m"):
        load_movielens_1m(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither ratings.dat .* nor ml-1m_seq.txt"):
        load_movielens_1m(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no ml-1m data at"):
        load_movielens_1m(str(tmp_path / "absent.txt"))


ML1M_LINES = "1 10 11 12\n2 30 40\n3 5 6 7 8\n"


def test_ml1m_sequence_file_in_a_folder_or_by_name(tmp_path):
    (tmp_path / "ml-1m_seq.txt").write_text(ML1M_LINES)
    for path in (tmp_path, tmp_path / "ml-1m_seq.txt"):
        seqs = load_movielens_1m(str(path))
        assert seqs.name == "ml-1m" and seqs.timestamps is None
        assert list(seqs.user_ids) == [1, 2, 3] and seqs.sequence(2)[0].tolist() == [5, 6, 7, 8]
        assert seqs.info["source"] == str(tmp_path / "ml-1m_seq.txt")
        assert "no timestamps" in seqs.describe()
    # any file name: the format is recognised from the first data line
    other = tmp_path / "mine.txt"
    other.write_text("# users and their items\n" + ML1M_LINES)
    assert load_dataset("ml-1m", str(other)).num_events == 9


def test_ml1m_folder_with_both_files_prefers_ratings(tmp_path):
    (tmp_path / "ml-1m_seq.txt").write_text(ML1M_LINES)
    (tmp_path / "ratings.dat").write_text("1::10::3::50\n1::11::2::40\n")
    seqs = load_movielens_1m(str(tmp_path))
    assert seqs.timestamps is not None and seqs.sequence(0)[0].tolist() == [11, 10]


def test_ml1m_sequence_file_errors_name_the_line(tmp_path):
    p = tmp_path / "ml-1m_seq.txt"
    p.write_text("1 10 11\n2 3 x\n")
    with pytest.raises(ValueError, match="line 2"):
        load_movielens_1m(str(tmp_path))


@needs_ml1m_sequences
def test_real_ml1m_sequence_file():
    """The shared file as its README describes it (6,040 users, 3,706 items, 1,000,209 events)."""
    seqs = load_dataset("ml-1m", ML1M)
    assert seqs.name == "ml-1m" and seqs.timestamps is None
    assert seqs.num_users == 6040 and seqs.num_events == 1_000_209
    assert len(seqs.item_ids()) == 3706 and seqs.max_item_id <= 3952
    assert seqs.lengths.min() == 20 and seqs.lengths.max() == 2314
    assert load_movielens_1m(os.path.join(ML1M, "ml-1m_seq.txt")).num_events == 1_000_209


def test_sequence_file(tmp_path):
    p = tmp_path / "seqs.txt"
    p.write_text("# user items\n10 5 6 7\n\n3 1 2\n")
    seqs = load_sequence_file(str(p))
    assert list(seqs.user_ids) == [10, 3]
    assert seqs.sequence(0)[0].tolist() == [5, 6, 7]
    assert seqs.sequence(1)[0].tolist() == [1, 2]
    assert seqs.timestamps is None
    assert load_dataset("seqfile", str(p)).num_events == 5


@pytest.mark.parametrize("text,match", [
    ("1 2 x\n", "integers"),
    ("1\n", "at least one item"),
    ("1 2 0\n", ">= 1"),
    ("1 2\n1 3\n", "already appeared"),
    ("\n# nothing\n", "no user lines"),
])
def test_sequence_file_errors(tmp_path, text, match):
    p = tmp_path / "s.txt"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_sequence_file(str(p))


TINY_HSTU = """
name: tiny-ml1m
data: {{dataset: ml-1m, max_len: 12}}
model: {{arch: hstu, dim: 16, num_blocks: 1, num_heads: 1, attention_dim: 8, linear_dim: 8, dropout: 0.1,
        num_time_buckets: {buckets}}}
loss: {{num_negatives: 8}}
train: {{max_epochs: 1, batch_size: 16}}
"""


def test_gauss_train_on_an_ml1m_sequence_folder(tmp_path, capsys):
    """`gauss train --dataset ml-1m --data-path FOLDER` on a generated ml-1m_seq.txt: a config
    asking for the time bias is refused with the fix and no output; position-only trains."""
    pytest.importorskip("pytorch_lightning", reason="gauss train needs the lightning extra")
    from gauss_plugins.cli import main

    folder = tmp_path / "ml-1m"
    folder.mkdir()
    lines = [f"{u} " + " ".join(str((u * 7 + k) % 40 + 1) for k in range(10)) for u in range(1, 25)]
    (folder / "ml-1m_seq.txt").write_text("\n".join(lines) + "\n")
    for buckets, want_rc in ((128, 2), (0, 0)):
        config = tmp_path / f"hstu-{buckets}.yaml"
        config.write_text(TINY_HSTU.format(buckets=buckets))
        out = tmp_path / f"run-{buckets}"
        rc = main(["train", "--config", str(config), "--dataset", "ml-1m", "--data-path", str(folder),
                   "--output-dir", str(out), "--no-progress"])
        assert rc == want_rc
        if want_rc:
            err = capsys.readouterr().err
            assert "no timestamps" in err and "num_time_buckets: 0" in err
            assert not out.exists()
        else:
            assert (out / "metrics.json").is_file()
