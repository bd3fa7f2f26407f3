"""The compiled package end to end: `gauss export` from a checkpoint (one compile shared by
the module; the default retrieval head), metadata, `gauss rank`, corrupted packages, bad
inputs at serving, and an export whose parity check fails. Both heads are compiled and
served by gauss-runner in test_runner_hstu.py; a trained model with a time bias through its
retrieval package in test_export_retrieval.py."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from export_cases import padded, tiny_config, write_checkpoint  # noqa: E402

from gauss_plugins import cli  # noqa: E402
from gauss_plugins.export import aoti  # noqa: E402
from gauss_plugins.export.aoti import PackageError, ParityError, export_aoti, load_package  # noqa: E402
from gauss_plugins.export.checkpoint import load_trained_model  # noqa: E402
from gauss_plugins.export.predictor import Predictor, format_scores, parse_requests  # noqa: E402
from gauss_plugins.export.program import build_ranker  # noqa: E402
from gauss_plugins.export.snapshot import read_snapshot  # noqa: E402

pytestmark = pytest.mark.slow  # one AOTInductor compile: 20-130 s on the 2-core CPU machines

REQUESTS = "1 2 3 | 4 5 6\n7 | 8\n | 9 10\n" + " ".join(str(i) for i in range(1, 31)) + " | 11 12\n"


def _write_yaml(path, config):
    import yaml

    from gauss_plugins.train.config import config_to_dict

    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(config), f)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = str(root / "run")
    write_checkpoint(run, tiny_config(), num_items=40, seen=30)
    paths = {"run": run, "package": str(root / "model.pt2"), "snapshot": str(root / "rows.gsnp"),
             "report": str(root / "export.json"), "config": _write_yaml(root / "cfg.yaml", tiny_config())}
    rc = cli.main(["export", "--checkpoint", run, "--config", paths["config"], "--out", paths["package"],
                   "--snapshot", paths["snapshot"], "--json", paths["report"]])
    assert rc == 0
    return paths


def test_export_report_and_metadata(exported):
    with open(exported["report"]) as f:
        report = json.load(f)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] <= 1e-5
    meta = load_package(exported["package"]).metadata
    assert meta["gauss_format"] == "1" and meta["dim"] == "8" and meta["dtype"] == "float32"
    assert meta["head"] == "retrieval" and meta["max_seq_len"] == "12" and meta["model_max_len"] == "12"
    assert meta["input_names"] == "history,history_len,candidates" and meta["output_names"] == "scores"
    assert meta["embedding_source"] == "snapshot:" + os.path.abspath(exported["snapshot"])
    assert meta["embedding_version"].startswith("dynamic-table-v") and "tiny-hstu" in meta["model_version"]
    assert len(read_snapshot(exported["snapshot"])) == 30


def test_rank_cli_matches_the_eager_model(exported, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(REQUESTS))
    capsys.readouterr()
    assert cli.main(["rank", "--package", exported["package"], "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    model = load_trained_model(exported["run"]).model
    program = build_ranker(model)
    for line, req in zip(lines, parse_requests(io.StringIO(REQUESTS))):
        history = list(req.history[-12:])
        args = padded(model, [history or [1]], [list(req.candidates)])
        if not history:
            args = (args[0], torch.zeros(1, dtype=torch.int64), args[2])
        with torch.no_grad():
            want = program(*args)[0]
        got = torch.tensor([float(x) for x in line.split()])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the same through the Python API: its text parses to the same scores. Not compared as
    # text: the API ranks all requests in one batch, the CLI in batches of 2, and a batch's
    # size may move the last printed digit (different matmul blocking).
    predictor = Predictor(exported["package"], read_snapshot(exported["snapshot"]))
    first = predictor.rank(list(parse_requests(io.StringIO(REQUESTS))))[0]
    api = torch.tensor([float(x) for x in format_scores(first.tolist()).split()])
    cli_first = torch.tensor([float(x) for x in lines[0].split()])
    torch.testing.assert_close(cli_first, api, rtol=0, atol=1e-6)


def test_rank_cli_errors(exported, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2 | 3 35\n"))
    assert cli.main(["rank", "--package", exported["package"]]) == 2
    assert "item id 35 is not in snapshot" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2 3\n"))
    assert cli.main(["rank", "--package", exported["package"]]) == 2
    assert "line 1: expected" in capsys.readouterr().err
    assert cli.main(["rank", "--package", exported["package"] + ".missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "truncate", "not_zip"])
def test_corrupted_package_is_refused(exported, tmp_path, damage):
    data = bytearray(open(exported["package"], "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"this is not a package" * 10)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="corrupted|not a readable"):
        load_package(str(bad))


def test_compiled_package_refuses_bad_inputs(exported):
    package = load_package(exported["package"])
    h, lens, c = torch.zeros(2, 5, 8), torch.tensor([5, 0]), torch.zeros(2, 3, 8)
    assert package(h, lens, c).shape == (2, 3)
    with pytest.raises(TypeError, match="history must be torch.float32"):
        package(h.half(), lens, c)
    with pytest.raises(TypeError, match="history_len must be torch.int64"):
        package(h, lens.float(), c)
    with pytest.raises(ValueError, match=r"candidates must be \[B=2, M, 8\]"):
        package(h, lens, torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match="N=13 must be in 1..12"):
        package(torch.zeros(2, 13, 8), lens, c)


def test_config_mismatch_fails_before_compiling(exported, tmp_path, capsys):
    other = _write_yaml(tmp_path / "other.yaml", tiny_config(dim=16))
    out = str(tmp_path / "m.pt2")
    assert cli.main(["export", "--checkpoint", exported["run"], "--config", other, "--out", out]) == 2
    assert "does not match the config: model.dim: checkpoint 8 vs config 16" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert cli.main(["export", "--checkpoint", exported["run"], "--out", str(tmp_path / "m.zip")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err


def test_parity_failure_writes_nothing(exported, tmp_path, monkeypatch):
    """Compile is replaced by a copy of the module's package, which belongs to another
    model: the parity check must catch it and leave no file behind."""
    import shutil

    import torch._inductor

    def stale_package(exported_program, package_path, inductor_configs):
        shutil.copyfile(exported["package"], package_path)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", stale_package)
    other = write_checkpoint(str(tmp_path / "other"), tiny_config(), seed=1)
    out = tmp_path / "out" / "m.pt2"
    with pytest.raises(ParityError, match="parity check failed: max"):
        export_aoti(other, str(out))
    assert not out.exists() and os.listdir(tmp_path / "out") == []


def test_aoti_is_a_registered_export_target():
    from gauss_plugins.plugins import Registry, create_plugin_manager

    comp = Registry(create_plugin_manager(load_entry_points=False)).select("export_target", "aoti")
    assert comp.load() is aoti.export_aoti
