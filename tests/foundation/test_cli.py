"""The `gauss` CLI."""
from __future__ import annotations

import json

from gauss_plugins.cli import main


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_plugins_table_lists_kind_name_provider_availability(capsys, fresh_registry):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["kind", "name", "provider", "available"]
    assert "attention_backend" in out and "gauss-plugins" in out


def test_plugins_json_filters_by_kind(capsys, fresh_registry):
    assert main(["plugins", "--json", "--kind", "table_backend"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["components"] and {r["kind"] for r in data["components"]} == {"table_backend"}
    for row in data["components"]:
        assert row["available"] or row["reason"]


# ---------------------------------------------------------------- clear errors, not tracebacks
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The import blocker of test_extras.py (tests import no sibling modules under --import-mode=importlib):
# argv[1] names top-level modules that fail to import, as when their extra is not installed.
BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block(set(filter(None, sys.argv[1].split(',')))))
"""

REPO = Path(__file__).resolve().parents[2]


def _gauss(args, blocked="", cwd=None, env=None, timeout=120):
    """Run `gauss ARGS` in a fresh interpreter, with the named top-level modules unimportable."""
    code = BLOCKER + "\nfrom gauss_plugins.cli import main\nsys.exit(main(sys.argv[2:]))\n"
    return subprocess.run([sys.executable, "-c", code, blocked, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def _one_clear_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args", [["train", "--config", "demo-hstu", "--output-dir", "out"], ["demo"]])
def test_training_without_the_lightning_extra_is_one_line(tmp_path, args):
    out = _gauss(args, blocked="pytorch_lightning,lightning", cwd=tmp_path)
    assert out.returncode == 2
    line = _one_clear_line(out.stderr)
    assert line.startswith(f"gauss {args[0]}: ") and 'pip install "gauss-plugins[lightning]"' in line
    assert "pytorch_lightning not installed" in line
    assert os.listdir(tmp_path) == []  # nothing written


def test_plugins_says_whether_training_is_available(fresh_registry, capsys):
    blocked = _gauss(["plugins", "--kind", "trainer"], blocked="pytorch_lightning,lightning")
    assert blocked.returncode == 0
    assert ('training (gauss train, gauss demo): no: training is not available here: lightning: '
            'pytorch_lightning not installed (pip install "gauss-plugins[lightning]")') in blocked.stdout
    assert main(["plugins", "--json", "--kind", "trainer"]) == 0
    training = json.loads(capsys.readouterr().out)["training"]
    assert training == {"available": True, "status": "yes, with the lightning trainer (gauss-plugins)"}


def test_unknown_plugin_in_the_allow_list_warns(fresh_registry, monkeypatch, capsys):
    monkeypatch.setenv("GAUSS_PLUGINS_LOAD", "kernels,nosuch")
    with pytest.warns(fresh_registry.PluginLoadWarning, match=r"'nosuch'.*entry points here are: integrations, kernels"):
        registry = fresh_registry.get_registry()
    assert "kernels" in dict(registry.pm.list_name_plugin())  # the valid name still loads
    assert main(["plugins"]) == 0
    assert "plugin nosuch (GAUSS_PLUGINS_LOAD) not loaded" in capsys.readouterr().out


def test_known_allow_list_is_silent(fresh_registry, monkeypatch, recwarn):
    monkeypatch.setenv("GAUSS_PLUGINS_LOAD", "kernels")
    fresh_registry.get_registry()
    assert not [w for w in recwarn if issubclass(w.category, fresh_registry.PluginLoadWarning)]


# ---------------------------------------------------------------- gauss build
def _cached_library() -> str:
    from gauss_kernels.hash_table import cpu_ext

    return cpu_ext.build()["path"]  # builds once per machine (cached), as every table test does


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_build_announces_compiles_and_then_reuses(tmp_path):
    """A first build says so on stderr and reports where it cached the library; the next is a
    cache hit. (The compiler is replaced by a copy of the real library: the test takes
    seconds, not the ~20 s of g++.)"""
    real = _cached_library()
    code = (
        "import sys\n"
        "from gauss_kernels.hash_table import cpu_ext\n"
        f"cpu_ext._build_command = lambda cxx, out: ['cp', {real!r}, out]\n"
        "from gauss_plugins.cli import main\n"
        "sys.exit(main(['build']))\n"
    )
    env = {**os.environ, "GAUSS_PLUGINS_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    assert "building the gauss C++ hash index (one time, ~20 s" in first.stderr
    assert "C++ hash index (cpu_hash_index.cpp): built in" in first.stdout
    path = first.stdout.strip().rsplit(": ", 1)[1]
    assert path.startswith(str(tmp_path / "cache" / "cpu_ext")) and os.path.isfile(path)
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout.strip() == f"C++ hash index (cpu_hash_index.cpp): already built (cached): {path}"


def test_build_failure_is_reported_without_traceback(tmp_path):
    env = {"GAUSS_PLUGINS_CACHE": str(tmp_path / "cache"), "CXX": shutil.which("false") or "/bin/false"}
    out = _gauss(["build"], env=env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    announce, error = out.stderr.splitlines()[:2]
    assert announce.startswith("building the gauss C++ hash index (one time, ~20 s")
    assert error.startswith("gauss build: kernels: building cpu_hash_index.cpp with ") and "failed (exit 1)" in error
    leftovers = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
    assert leftovers == []  # no half-written library that a later run would load


def test_build_with_the_kernels_plugin_blocked(fresh_registry, monkeypatch, capsys):
    monkeypatch.setenv("GAUSS_PLUGINS_DENY", "kernels")
    assert main(["build"]) == 0
    assert "no plugin here has anything to build" in capsys.readouterr().out


# ---------------------------------------------------------------- gauss demo, make clean
def test_demo_bad_data_path_is_one_line(tmp_path, capsys):
    assert main(["demo", "--data-path", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has no u.data" in _one_clear_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_from_any_folder_one_epoch_falls_back_and_says_why(tmp_path):
    """Outside the checkout, with no MovieLens in the data folder and --max-epochs 1 (shorter
    than eval_every): trains, selects, and writes strict JSON (std over one seed is null)."""
    pytest.importorskip("pytorch_lightning")
    out = _gauss(["demo", "--max-epochs", "1"], cwd=tmp_path, timeout=300,
                 env={"GAUSS_DATA": str(tmp_path / "nodata"), "GAUSS_PLUGINS_CACHE": os.environ.get(
                     "GAUSS_PLUGINS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gauss_plugins"))})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"gauss demo: data: the synthetic event stream (MovieLens 100K was not found: no "
            f"{tmp_path / 'nodata' / 'ml-100k' / 'u.data'}") in out.stdout
    report = json.loads((tmp_path / "runs" / "demo" / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))
    assert report["summary"]["hstu"]["test/hr@10"]["std"] is None
    assert report["demo"]["why"].startswith("MovieLens 100K was not found")


def test_make_clean_removes_the_egg_info():
    import fnmatch

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "clean"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    removed = out.stdout.split()
    # setuptools writes <name>.egg-info beside pyproject.toml for this package-dir layout
    assert any(fnmatch.fnmatch("gauss_plugins.egg-info", pattern) for pattern in removed), out.stdout
