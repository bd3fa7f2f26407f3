"""A throwaway third-party plugin distribution, with real entry point metadata on a temporary
path, is discovered, listed by `gauss plugins`, and used."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A third-party eviction policy: evict the oldest inserted ids first."""
    from gauss_plugins import Component, hookimpl


    class OldestFirst:
        def __init__(self, keep=2):
            self.keep = keep

        def victims(self, inserted_ids):
            return list(inserted_ids)[: max(0, len(inserted_ids) - self.keep)]


    @hookimpl
    def gauss_register_eviction_policies():
        return [Component("eviction_policy", "oldest_first", OldestFirst,
                          description="third-party demo: oldest inserted first")]
    '''
)


def make_distribution(root: Path, dist: str = "gauss-demo-plugin", module: str = "gauss_demo_plugin") -> Path:
    """Write an installed-looking distribution: the module plus its .dist-info metadata."""
    (root / f"{module}.py").write_text(PLUGIN_SOURCE)
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[gauss_plugins]\ndemo = {module}\n")
    (info / "RECORD").write_text("")
    return root


def test_discovered_listed_and_used(tmp_path, monkeypatch, fresh_registry, capsys):
    make_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = fresh_registry.get_registry()
    comp = registry.get("eviction_policy", "oldest_first")
    assert comp.provider == "gauss-demo-plugin" and comp.plugin == "demo"
    policy = registry.create("eviction_policy", "oldest_first", keep=1)
    assert policy.victims([5, 6, 7]) == [5, 6]

    from gauss_plugins.cli import main

    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    row = next(r for r in listing["components"] if r["name"] == "oldest_first")
    assert row["provider"] == "gauss-demo-plugin" and row["available"] is True


def test_deny_list_blocks_third_party(tmp_path, monkeypatch, fresh_registry):
    make_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GAUSS_PLUGINS_DENY", "demo")
    assert "oldest_first" not in fresh_registry.get_registry().names("eviction_policy")


def test_broken_plugin_is_reported_by_the_cli(tmp_path):
    make_distribution(tmp_path, dist="gauss-broken-plugin", module="gauss_broken_plugin")
    (tmp_path / "gauss_broken_plugin.py").write_text("raise RuntimeError('plugin import exploded')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "gauss_plugins.cli", "plugins"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gauss-broken-plugin" in out.stdout and "plugin import exploded" in out.stdout


def test_console_script_sees_the_plugin(tmp_path):
    gauss = Path(sys.executable).with_name("gauss")
    if not gauss.exists():
        pytest.skip("the gauss console script is not installed next to this interpreter")
    make_distribution(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([str(gauss), "plugins", "--kind", "eviction_policy"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if "oldest_first" in l)
    assert "gauss-demo-plugin" in line and "yes" in line
