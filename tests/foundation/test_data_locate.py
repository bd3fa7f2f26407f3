"""One data convention: $GAUSS_DATA, else ../shared/data beside the checkout, else the user cache."""
from __future__ import annotations

import os

import pytest

from gauss_plugins.cli import main
from gauss_plugins.data import locate


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $GAUSS_DATA, a private cache, and no checkout (as from an installed wheel)."""
    monkeypatch.delenv("GAUSS_DATA", raising=False)
    monkeypatch.setenv("GAUSS_PLUGINS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(locate, "_checkout_root", lambda: None)
    return tmp_path


def _ml100k(root):
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("1\t10\t5\t100\n1\t11\t4\t101\n1\t12\t3\t102\n2\t10\t5\t100\n2\t13\t1\t105\n")
    return folder


def test_order_env_then_checkout_then_cache(no_env, monkeypatch):
    tmp = no_env
    assert locate.data_root() == locate.DataRoot(str(tmp / "cache" / "data"), "the user cache")
    checkout = tmp / "work" / "main"
    checkout.mkdir(parents=True)
    monkeypatch.setattr(locate, "_checkout_root", lambda: str(checkout))
    assert locate.data_root().source == "the user cache"  # no ../shared/data beside it yet
    (tmp / "work" / "shared" / "data").mkdir(parents=True)
    assert locate.data_root() == locate.DataRoot(str(tmp / "work" / "shared" / "data"),
                                                 "../shared/data beside the checkout")
    monkeypatch.setenv("GAUSS_DATA", str(tmp / "mine"))
    assert locate.data_root() == locate.DataRoot(str(tmp / "mine"), "$GAUSS_DATA")


def test_this_checkout_is_recognised():
    root = locate._checkout_root()
    assert root is not None and os.path.isfile(os.path.join(root, "pyproject.toml"))


def test_found_only_with_its_rating_file(no_env, monkeypatch):
    monkeypatch.setenv("GAUSS_DATA", str(no_env / "data"))
    (no_env / "data" / "ml-100k").mkdir(parents=True)  # an empty (half-extracted) folder does not count
    missing = locate.locate_dataset("ml-100k")
    assert not missing and missing.path is None
    assert "u.data" in missing.reason and "$GAUSS_DATA" in missing.reason
    assert "gauss data download movielens-100k" in missing.reason
    (no_env / "data" / "ml-100k" / "u.data").write_text("1\t2\t3\t4\n")
    found = locate.locate_dataset("ml-100k")
    assert found and found.path == str(no_env / "data" / "ml-100k")


def test_gauss_data_naming_the_dataset_folder_itself_is_explained(no_env, monkeypatch):
    folder = _ml100k(no_env)
    monkeypatch.setenv("GAUSS_DATA", str(folder))
    reason = locate.locate_dataset("ml-100k").reason
    assert "set it to the folder that holds ml-100k/" in reason


def test_resolve_data_path(no_env):
    assert locate.resolve_data_path("ml-100k", "/given") == "/given"
    assert locate.resolve_data_path("synthetic", None) is None
    with pytest.raises(FileNotFoundError, match="seqfile dataset needs --data-path"):
        locate.resolve_data_path("seqfile", None)
    with pytest.raises(FileNotFoundError, match="gauss data download movielens-1m"):
        locate.resolve_data_path("ml-1m", None)


def test_data_info_without_data_is_one_line(no_env, capsys):
    """Was: TypeError: expected str, bytes or os.PathLike object, not NoneType."""
    assert main(["data", "info", "ml-100k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gauss data info: no ") and len(err.strip().splitlines()) == 1
    assert "gauss data download movielens-100k" in err
    assert not os.path.exists(no_env / "cache")  # looking creates nothing


def test_data_info_and_list_use_the_data_folder(no_env, monkeypatch, capsys):
    monkeypatch.setenv("GAUSS_DATA", str(no_env))
    _ml100k(no_env)
    assert main(["data", "info", "ml-100k"]) == 0
    assert "2 users" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    assert f"data folder: {no_env} (from $GAUSS_DATA" in capsys.readouterr().out


def test_unknown_dataset_is_one_line(no_env, capsys):
    assert main(["data", "info", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no dataset named 'nosuch'" in err and len(err.strip().splitlines()) == 1
