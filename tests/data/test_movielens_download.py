"""The downloader with a fake network: checksum verification, offline errors, atomicity."""
from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import zipfile
from dataclasses import replace

import pytest

from gauss_plugins.data import download as dl


class _Response:
    def __init__(self, payload: bytes) -> None:
        self._buf = io.BytesIO(payload)
        self.headers = {"Content-Length": str(len(payload))}

    def read(self, n: int) -> bytes:
        return self._buf.read(n)

    def close(self) -> None:
        pass


def _archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::2::3::4\n1::3::3::5\n1::4::3::6\n")
        zf.writestr("ml-1m/README", "research use")
    return buf.getvalue()


def test_official_urls_and_checksums():
    ds = dl.DATASETS["movielens-1m"]
    assert ds.url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert ds.md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert all(d.url.startswith("https://files.grouplens.org/datasets/movielens/") for d in dl.DATASETS.values())


def test_download_verifies_and_extracts(tmp_path, monkeypatch):
    payload = _archive()
    fake = replace(dl.DATASETS["movielens-1m"], md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(dl.DATASETS, "movielens-1m", fake)
    folder = dl.download_dataset("movielens-1m", str(tmp_path), opener=lambda url, timeout: _Response(payload))
    assert folder == str(tmp_path / "ml-1m")
    assert (tmp_path / "ml-1m" / "ratings.dat").read_text().startswith("1::2")
    assert sorted(os.listdir(tmp_path)) == ["ml-1m"]     # no temporary files left
    from gauss_plugins.data import load_movielens_1m
    assert load_movielens_1m(folder).num_events == 3


def test_checksum_mismatch_keeps_nothing(tmp_path):
    payload = _archive()
    with pytest.raises(dl.DownloadError, match="checksum mismatch"):
        dl.download_dataset("movielens-1m", str(tmp_path), opener=lambda url, timeout: _Response(payload))
    assert os.listdir(tmp_path) == []


def test_offline_is_a_clear_error(tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(dl.DownloadError, match="offline.*--data-path"):
        dl.download_dataset("movielens-1m", str(tmp_path), opener=offline)
    assert os.listdir(tmp_path) == []


def test_unknown_dataset():
    with pytest.raises(dl.DownloadError, match="known"):
        dl.download_dataset("movielens-7m", "/nonexistent")


def test_cli_download_writes_where_every_command_looks(tmp_path, monkeypatch, capsys):
    """`gauss data download` without --dest fills the data folder, so `gauss data info` (and
    train, demo) find the dataset with no path given."""
    from gauss_plugins.cli import main
    from gauss_plugins.data.locate import locate_dataset

    payload = _archive()
    monkeypatch.setitem(dl.DATASETS, "movielens-1m",
                        replace(dl.DATASETS["movielens-1m"], md5=hashlib.md5(payload).hexdigest()))
    real = dl.download_dataset
    monkeypatch.setattr(dl, "download_dataset",
                        lambda *a, **kw: real(*a, **kw, opener=lambda url, timeout: _Response(payload)))
    monkeypatch.delenv("GAUSS_DATA", raising=False)
    monkeypatch.setenv("GAUSS_PLUGINS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("gauss_plugins.data.locate._checkout_root", lambda: None)  # as from an installed wheel
    assert not locate_dataset("ml-1m")
    assert main(["data", "download", "movielens-1m"]) == 0
    assert locate_dataset("ml-1m").path == str(tmp_path / "cache" / "data" / "ml-1m")
    assert main(["data", "info", "ml-1m"]) == 0
    assert "3 events" in capsys.readouterr().out


def test_cli_choices_match_the_catalog():
    from gauss_plugins.commands.data import DOWNLOADABLE

    assert set(DOWNLOADABLE) == set(dl.DATASETS)
