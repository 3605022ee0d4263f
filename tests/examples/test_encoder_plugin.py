"""examples/encoder_plugin: installed as its own distribution, it saves bytes and a destination without it refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from readme_runner import EXAMPLES, readme_blocks, run_block

pytestmark = pytest.mark.slow


def _venv(tmp: Path) -> dict[str, str]:
    """A venv that sees this environment's packages, so `pip install -e .` touches nothing outside it.

    ``savevm`` in it is this venv's interpreter running ``python -m savevm`` (the console script
    installed with savevm points at the outer interpreter, which would not see the plugin).
    """
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    shim = venv / "bin" / "savevm"
    shim.write_text(f'#!/bin/sh\nexec "{venv}/bin/python" -m savevm "$@"\n')
    shim.chmod(0o755)
    return {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_readme_install_enable_savings_and_refusal(tmp_path: Path) -> None:
    work = tmp_path / "encoder_plugin"
    shutil.copytree(EXAMPLES / "encoder_plugin", work)
    env = _venv(tmp_path)
    install, savings, refusal = readme_blocks("encoder_plugin")
    assert install == "pip install -e ."
    r = run_block("encoder_plugin", install, cwd=work, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_block("encoder_plugin", savings, cwd=work, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "% less" in r.stdout and "verified=True" in r.stdout
    r = run_block("encoder_plugin", refusal, cwd=work, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the stream uses page codec(s) 'zstd' but no installed plugin" in r.stdout
    assert "destination refused the stream" in (work / "source.txt").read_text()
    # the plugin stayed inside the venv
    outer = subprocess.run([sys.executable, "-c", "import savevm; print(sorted(savevm.PluginHost().names()))"],
                           capture_output=True, text=True, timeout=60)
    assert "zstd" not in outer.stdout
