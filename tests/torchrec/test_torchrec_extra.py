"""Without torchrec, importing the TorchRec backend names the extra to install."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_missing_torchrec_names_the_extra():
    # A child process, so that hiding torchrec does not leak into other tests.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torchrec"] = None  # makes `import torchrec` fail as if not installed
        from gauss_plugins import MissingExtraError
        try:
            import gauss_integrations.torchrec
        except MissingExtraError as exc:
            print("ERR", exc)
        else:
            print("imported")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR gauss_integrations.torchrec needs the 'torchrec' package" in out.stdout
    assert 'gauss-plugins[torchrec]' in out.stdout and "--no-deps torchrec==1.8.0" in out.stdout
