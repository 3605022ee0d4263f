"""examples/transport_config: one TOML line moves the migration from tcp to the rdma_stub transport."""

from __future__ import annotations

import re

import pytest
from readme_runner import readme_blocks, run_block

pytestmark = pytest.mark.slow


def test_readme_runs_over_three_transports() -> None:
    (block,) = readme_blocks("transport_config")
    r = run_block("transport_config", block)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {m.group(1): m for m in re.finditer(
        r"transport (\w+)\s+status (\w+).*?stream\s+([\d,]+) B\s+pages sent\s+(\d+), of them outside the stream\s+"
        r"(\d+)\s+identical (\w+)", r.stdout)}
    assert set(rows) == {"tcp", "rdma", "unix"}, r.stdout
    for name, m in rows.items():
        assert m.group(2) == "completed" and m.group(6) == "True", name
    stream = {k: int(m.group(3).replace(",", "")) for k, m in rows.items()}
    outside = {k: int(m.group(5)) for k, m in rows.items()}
    assert outside["tcp"] == outside["unix"] == 0 and outside["rdma"] >= 16384
    assert stream["rdma"] < 1 << 20 < 64 << 20 < stream["tcp"]
