"""examples/kv_service: the README's command migrates the service under load, losing no acknowledged write."""

from __future__ import annotations

import re

import pytest
from readme_runner import readme_blocks, run_block

pytestmark = pytest.mark.slow


def test_readme_live_migration_loses_no_acknowledged_write() -> None:
    blocks = readme_blocks("kv_service")
    assert blocks == ["python live_migrate.py"]
    r = run_block("kv_service", blocks[0])
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "RESULT: PASS" in out
    verified = re.search(r"verified\s+(\d+)/(\d+) acknowledged writes .*; lost (\d+), stale reads (\d+)", out)
    assert verified is not None, out
    ok, total, lost, stale = map(int, verified.groups())
    assert ok == total > 500 and lost == 0 and stale == 0
    downtime = int(re.search(r"downtime reported by savevm: (\d+) ms", out).group(1))  # type: ignore[union-attr]
    pause = float(re.search(r"longest request during the migration: ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    assert re.search(r"(\d+) handovers to the destination", out)
    assert "source postmigrate, destination running" in out
    # the figure the example exists for: reported next to the downtime, not asserted against it
    print(f"\nkv_service: client-visible pause {pause} ms, savevm downtime {downtime} ms")
