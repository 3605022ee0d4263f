"""examples/custom_device: version upgrade (v2 stream into v3, file and live), refusal of a newer stream, subsection."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from readme_runner import EXAMPLES, readme_blocks, run_block

pytestmark = pytest.mark.slow


def test_readme_commands(tmp_path: Path) -> None:
    work = tmp_path / "custom_device"
    shutil.copytree(EXAMPLES / "custom_device", work)
    upgrade, live, refuse, subsection = readme_blocks("custom_device")

    r = run_block("custom_device", upgrade, cwd=work)
    assert r.returncode == 0, r.stderr
    assert ("loaded into version 3: {'target': 22, 'current': 21, 'mode': 2, 'history': [0, 0, 0, 0], "
            "'alarm_celsius': 0}") in r.stdout

    r = run_block("custom_device", live, cwd=work)
    assert r.returncode == 0, r.stderr
    dest = json.loads((work / "upgraded.json").read_text())
    src = json.loads((work / "source.json").read_text())
    assert dest["status"] == src["status"] == "completed"
    assert dest["guest"]["device"] == {"target": 22, "current": 21, "mode": 2, "history": [0, 0, 0, 0],
                                       "alarm_celsius": 0}
    assert dest["guest"]["ram-sha256"] == src["guest"]["ram-sha256"]

    r = run_block("custom_device", refuse, cwd=work)
    assert r.returncode == 0, r.stderr
    assert "refused by version 2: VersionMismatchError: section 'thermostat' version 3 is newer than supported 2" \
        in r.stdout
    assert "(exit status 1)" in r.stdout

    r = run_block("custom_device", subsection, cwd=work)
    assert r.returncode == 0, r.stderr
    assert "'history': [0, 0, 0, 0], 'alarm_celsius': 35}" in r.stdout
    # analyze lists the device section (type FULL, instance 0, version 3) in stream order
    assert re.search(r"FULL\s+\d+\s+thermostat\s+0\s+3\s", r.stdout), r.stdout
