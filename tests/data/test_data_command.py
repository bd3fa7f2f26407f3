"""`gauss data`: list, info, and the download error path without network."""
from __future__ import annotations

from gauss_plugins.cli import main


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "ml-100k" in out and "synthetic" in out and "movielens-1m" in out


def test_data_info_seqfile(tmp_path, capsys):
    p = tmp_path / "s.txt"
    p.write_text("1 4 5 6\n2 7 8\n")
    assert main(["data", "info", "seqfile", "--data-path", str(p)]) == 0
    assert "2 users" in capsys.readouterr().out


def test_data_info_missing_file(tmp_path, capsys):
    assert main(["data", "info", "ml-1m", "--data-path", str(tmp_path)]) == 2
    assert "gauss data download movielens-1m" in capsys.readouterr().err


def test_data_without_action(capsys):
    assert main(["data"]) == 2
