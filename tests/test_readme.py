"""The README's commands and examples stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)
    run_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert README.lstrip().startswith("# savevm\n\n```sh\n" + run_cmd)
    assert run_cmd.endswith("savevm demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "`.ci/run` must run exactly the README's test command"


def test_snapshot_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = re.findall(r"```python\n(.*?)\n```", README, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), scope)  # our own README, not stream data
    assert (tmp_path / "state.qevm").exists()
    assert scope["reg"].find("counter", 0).device.value == 7  # type: ignore[attr-defined]


def test_license_matches_pyproject() -> None:
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
