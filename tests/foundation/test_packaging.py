"""The one wheel ships the three code folders; the core runs with only torch, pluggy, numpy."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"gauss_plugins": REPO / "src" / "gauss_plugins", "gauss_kernels": REPO / "kernels", "gauss_integrations": REPO / "integrations"}


def _declared_packages():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def _source_packages():
    found = set()
    for name, root in ROOTS.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join((name, *rel.parts)))
    return found


def test_every_source_package_is_declared():
    missing = _source_packages() - _declared_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def _requirement_closure(names):
    """Distributions needed by ``names`` (unconditional requirements only)."""
    seen, todo = {}, list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].strip()
        key = name.lower().replace("_", "-")
        if not name or key in seen:
            continue
        dist = metadata.distribution(name)
        seen[key] = dist
        for req in dist.requires or []:
            if ";" in req and ("extra" in req.split(";", 1)[1] or "sys_platform == \"win32\"" in req):
                continue
            todo.append(req)
    return list(seen.values())


@pytest.mark.slow
def test_core_works_in_a_venv_holding_only_torch_pluggy_numpy(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, timeout=300, capture_output=True)
    wheel = next(wheels.glob("gauss_plugins-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in _declared_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"{package} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gauss_kernels.plugin" in zipfile.ZipFile(wheel).read(entry_points).decode()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # Link torch (with its own requirements), pluggy and numpy from this environment.
    for dist in _requirement_closure(["torch", "pluggy", "numpy"]):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                os.symlink(src, site / top)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    code = textwrap.dedent(
        """
        import json, sys
        import gauss_plugins
        from gauss_plugins import get_registry
        reg = get_registry()
        rows = [dict(kind=c.kind, name=c.name, plugin=c.plugin, ok=c.availability().ok, reason=c.availability().reason)
                for c in reg.components()]
        try:
            import gauss_integrations.redis
            err = None
        except ImportError as e:
            err = str(e)
        extras = [m for m in ('triton', 'torchrec', 'ray', 'redis', 'pytorch_lightning', 'torchx') if m in sys.modules]
        print(json.dumps(dict(rows=rows, redis_error=err, loaded_extras=extras)))
        """
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded_extras"] == []
    rows = {(r["kind"], r["name"]): r for r in report["rows"]}
    triton = rows[("attention_backend", "triton")]
    assert not triton["ok"] and "triton not installed" in triton["reason"] and "gauss-plugins[triton]" in triton["reason"]
    redis_store = rows[("embedding_store", "redis")]
    assert not redis_store["ok"] and "gauss-plugins[redis]" in redis_store["reason"]
    assert report["redis_error"] and 'pip install "gauss-plugins[redis]"' in report["redis_error"]
    # built-in core components are listed and usable with the core alone
    assert any(r["ok"] and r["plugin"].startswith("gauss_plugins.") for r in report["rows"])
