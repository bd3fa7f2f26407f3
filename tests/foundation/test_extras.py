"""A missing extra fails with the exact pip command; the core imports only torch/pluggy/numpy."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gauss_plugins._optional import MissingExtraError, install_hint, require


def test_require_names_the_extra():
    with pytest.raises(MissingExtraError) as info:
        require("surely_not_a_module_xyz", "redis", "the Redis WePS store")
    msg = str(info.value)
    assert 'pip install "gauss-plugins[redis]"' in msg and "the Redis WePS store" in msg
    assert isinstance(info.value, ImportError)


def test_torchrec_hint_includes_no_deps_step():
    assert "--no-deps torchrec" in install_hint("torchrec")


BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def __init__(self, names): self.names = names
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Block(set(sys.argv[1].split(','))))
    """
)


def _run(blocked: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code, blocked], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "blocked,module,extra",
    [
        ("torchrec", "gauss_integrations.torchrec", "torchrec"),
        ("pytorch_lightning,lightning", "gauss_integrations.lightning", "lightning"),
        ("ray", "gauss_integrations.ray", "ray"),
        ("redis", "gauss_integrations.redis", "redis"),
    ],
)
def test_integration_without_its_extra(blocked, module, extra):
    out = _run(blocked, f"\ntry:\n    import {module}\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert out.returncode == 0, out.stderr
    assert f'gauss-plugins[{extra}]' in out.stdout, out.stdout + out.stderr


def test_core_import_pulls_no_extra():
    code = textwrap.dedent(
        """
        import sys, gauss_plugins
        from gauss_plugins import get_registry
        reg = get_registry()
        [c.availability() for c in reg.components()]
        heavy = {'torchrec', 'fbgemm_gpu', 'pytorch_lightning', 'lightning', 'ray', 'torchx', 'triton', 'redis', 'fsspec', 'yaml', 'matplotlib'}
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
